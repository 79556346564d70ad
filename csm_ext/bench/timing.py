"""Timing and machine facts shared by every benchmark (verify first, then time with these)."""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn: Callable[[], object], device, repeats: int, warmup: int) -> tuple[float, float]:
    """``(median, IQR)`` in seconds of ``repeats`` calls of ``fn`` after ``warmup`` calls (CUDA
    events on a GPU, wall clock on the CPU)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return median_iqr(times)


def median_iqr(times: list[float]) -> tuple[float, float]:
    """``(median, interquartile range)`` of a list of timings (IQR 0 for one timing)."""
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times), q[2] - q[0]


def machine_info(device) -> dict:
    """What the numbers were measured on: CPU model (or GPU), cores, threads, torch, csm_ext."""
    import csm_ext

    device = torch.device(device)
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "csm_ext": csm_ext.build_info()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        try:
            model = [line for line in open("/proc/cpuinfo") if line.startswith("model name")][0]
            info["cpu"] = model.split(":", 1)[1].strip()
        except (OSError, IndexError):
            info["cpu"] = platform.processor()
        info["cores"] = os.cpu_count()
    return info


def fmt_time(s: float | None) -> str:
    """Seconds for a table cell: ms below 10 s, "-" for None."""
    return "-" if s is None else (f"{s * 1e3:.2f} ms" if s < 10 else f"{s:.1f} s")


def fmt_bytes(b: int | None) -> str:
    """Bytes for a table cell, in MiB; "-" for None."""
    return "-" if b is None else f"{b / 2 ** 20:.1f} MiB"
