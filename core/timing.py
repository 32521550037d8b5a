"""One timing loop and one description of the machine, for every measured latency."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CLOCKS = ("wall", "thread")


def time_runs(
    fn: Callable[[], Any],
    device: str | torch.device = "cpu",
    warmup: int = 5,
    repeats: int = 20,
    clock: str = "wall",
) -> list[float]:
    """Milliseconds of each of `repeats` runs of `fn()`, after `warmup` untimed runs.

    On CUDA every run is synchronised, so a time covers the kernels, not their launch.
    ``clock="thread"`` counts the CPU time of the calling thread instead of wall time: on a
    CPU shared with other jobs it is what the run would take alone, provided torch runs
    single-threaded (every op then runs in this thread).
    """
    if clock not in CLOCKS:
        raise ValueError(f"Unknown clock {clock!r}; known: {list(CLOCKS)}.")
    if repeats < 1 or warmup < 0:
        raise ValueError(
            f"`repeats >= 1` and `warmup >= 0` must hold, but got ({repeats=}, {warmup=})."
        )
    device = torch.device(device)
    cuda = device.type == "cuda"
    now = time.thread_time if clock == "thread" else time.perf_counter
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start = now()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append((now() - start) * 1e3)
    return times


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    """The CPU, its cores, the platform and torch, and the GPU's name on a CUDA device."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
