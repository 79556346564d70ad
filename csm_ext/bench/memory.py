"""Peak-memory probes for the CPU benchmarks (Linux /proc), shared by every benchmark script."""
from __future__ import annotations


def status_bytes(key: str, pid: str | int = "self") -> int:
    """A memory field of /proc/<pid>/status in bytes (e.g. ``VmRSS``, ``VmHWM``); 0 if the
    process is gone or holds no memory any more (a zombie's status has no Vm fields)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


def reset_peak_rss() -> None:
    """Reset this process's peak-RSS mark (VmHWM) to its current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
