"""Peak-memory probes for the CPU benchmarks (Linux /proc), shared by every benchmark script.

Two figures, each measured one way for every benchmark:

* :func:`peak_extra_rss` — the rise of the process's peak resident set (VmHWM) above its resident
  set during one steady-state step (after a warm-up step), measured in a fresh process started
  with :data:`PROBE_ENV`, so that glibc serves large blocks by mmap and returns them at once:
  otherwise the warm-up step's freed heap is reused and hides the step's peak.
* :func:`saved_bytes` — the bytes of the tensors autograd saves for the backward (unique
  storages, inputs included), in process, through saved-tensor hooks; exact and independent of
  the allocator.
"""
from __future__ import annotations

import os
from typing import Callable

# Environment of the fresh processes that measure peak_extra_rss.
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def probe_env() -> dict:
    """``os.environ`` with :data:`PROBE_ENV`: pass as ``env`` to the memory-probe process."""
    return dict(os.environ, **PROBE_ENV)


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


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd saves for the backward while ``fn()`` builds (and
    runs) its graph; works through ``torch.compile`` too (AOTAutograd honours the hooks)."""
    import torch

    seen: dict = {}

    def pack(t):
        s = t.untyped_storage()
        seen[(t.device, s.data_ptr())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


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
