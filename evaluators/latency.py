"""Measured latency of a model's forward pass on a device."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from vitrank.core.timing import time_runs


@dataclass(frozen=True)
class LatencyResult:
    median_ms: float  # median of the timed runs
    p90_ms: float  # 90th percentile of the timed runs
    threads: int  # torch intra-op threads the runs used
    device: str
    batch: int
    input_size: tuple[int, ...]  # (channels, height, width) of one image
    repeats: int  # timed runs (after warm-up)

    def to_dict(self) -> dict:
        return asdict(self)


def _image_shape(input_size: int | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    if isinstance(input_size, int):
        return (3, input_size, input_size)
    shape = tuple(int(s) for s in input_size)
    if len(shape) == 2:
        return (3, *shape)
    if len(shape) != 3:
        raise ValueError(
            f"`input_size` must be an int, (height, width) or (channels, height, width), "
            f"but got {input_size=}."
        )
    return shape


def measure_latency(
    model: nn.Module,
    input_size: int | tuple[int, ...],
    batch: int = 1,
    device: str | torch.device = "cpu",
    warmup: int = 10,
    repeats: int = 50,
    threads: int | None = None,
) -> LatencyResult:
    """Median and 90th-percentile wall time of `model(x)` for a random batch, in ms.

    Runs `warmup` untimed passes, then `repeats` timed ones, under `torch.inference_mode`
    in eval mode; on CUDA each pass is synchronised so the time covers the kernels, not
    their launch. `threads` pins torch's intra-op thread count for the measurement (the
    count used is recorded either way) and the previous count is restored afterwards.
    The model is moved to `device` for the measurement and moved back.
    """
    if batch < 1 or repeats < 1 or warmup < 0:
        raise ValueError(
            f"`batch >= 1`, `repeats >= 1` and `warmup >= 0` must hold, but got "
            f"({batch=}, {repeats=}, {warmup=})."
        )
    if threads is not None and threads < 1:
        raise ValueError(f"`threads >= 1` must hold, but got {threads=}.")
    device = torch.device(device)
    first = next(iter(model.parameters()), None)
    home = first.device if first is not None else device
    previous_threads = torch.get_num_threads()
    was_training = model.training
    # the images follow the model's floating dtype (fp16 and bf16 models get fp16/bf16 inputs)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    x = torch.randn(batch, *_image_shape(input_size), device=device, dtype=dtype)
    times: list[float] = []
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        used_threads = torch.get_num_threads()
        model.to(device).eval()
        with torch.inference_mode():
            times = time_runs(lambda: model(x), device, warmup, repeats)
    finally:
        torch.set_num_threads(previous_threads)
        model.to(home).train(was_training)
    return LatencyResult(
        median_ms=float(np.median(times)),
        p90_ms=float(np.percentile(times, 90)),
        threads=used_threads,
        device=str(device),
        batch=batch,
        input_size=_image_shape(input_size),
        repeats=repeats,
    )
