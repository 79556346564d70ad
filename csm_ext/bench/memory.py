"""Peak-memory probes for the CPU benchmarks (Linux /proc), shared by every benchmark script.

Every CPU memory figure in BENCHMARKS.md is :func:`peak_extra_rss` of one step (or of a whole
call), measured the same way: the rise of the process's peak resident set (VmHWM) above its
resident set just before, after a reset of the peak mark. Benchmarks run it in a fresh process
where earlier work could otherwise leave freed pages resident.
"""
from __future__ import annotations

from typing import Callable


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


def peak_extra_rss(fn: Callable[[], object], warmup: int = 1) -> int:
    """Bytes by which the peak resident set rose above the resident set while ``fn()`` ran,
    after ``warmup`` calls (optimizer state, allocator caches and compiled code are then in
    place, so the figure is that of a steady-state step) and a garbage collection."""
    import gc

    for _ in range(warmup):
        fn()
    gc.collect()
    base = status_bytes("VmRSS")
    reset_peak_rss()
    fn()
    return max(0, status_bytes("VmHWM") - base)
