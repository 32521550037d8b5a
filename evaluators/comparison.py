"""A compressed model beside its teacher: accuracy, parameters, FLOPs, measured latency."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.data import Dataset
from vitrank.evaluators.accuracy import evaluate_accuracy
from vitrank.evaluators.latency import measure_latency

# How winners and `vitrank eval` time a model, so their numbers compare.
LATENCY_WARMUP, LATENCY_REPEATS = 5, 30


def compare_with_teacher(
    model: nn.Module,
    teacher: nn.Module,
    config: Any,
    input_size: tuple[int, ...],
    val: Dataset | None = None,
    *,
    device: str = "cpu",
    batch: int | None = None,
) -> dict[str, Any]:
    """Both models measured the same way; ``val`` None leaves accuracy out.

    ``config`` (the model's CompressionConfig) gives the exact FLOP counts of both; the
    teacher must be of the architecture it was made for, or no number would compare.
    """
    from vitrank.core.structure import inspect_vit
    from vitrank.spaces import count_flops, dense_flops

    if batch is not None and batch < 1:
        raise ValueError(f"`batch >= 1` must hold, but got {batch=}.")
    found = inspect_vit(teacher, config.fingerprint.architecture)
    if found != config.fingerprint:
        raise ValueError(
            f"the teacher is not the {config.fingerprint.architecture} this model was "
            f"compressed from (first difference, model's != teacher's: "
            f"{config.fingerprint.describe_difference(found)}), so its parameters, FLOPs and "
            "speed-up would not compare; give the teacher it was made from, or no --model "
            "to use the recorded one."
        )
    rows: dict[str, dict[str, Any]] = {"compressed": {}, "teacher": {}}
    for name, module in (("compressed", model), ("teacher", teacher)):
        row = rows[name]
        row["params"] = sum(p.numel() for p in module.parameters())
        module.to(device).eval()  # accuracy runs where the model is
        if val is not None:
            row["accuracy"] = evaluate_accuracy(
                module, val, batch_size=batch or 256, device=device, progress=False
            )
        latency = measure_latency(
            module,
            input_size,
            batch=batch or 1,
            device=device,
            warmup=LATENCY_WARMUP,
            repeats=LATENCY_REPEATS,
        )
        row["latency_ms"] = latency.median_ms
    rows["compressed"]["flops"] = count_flops(config, batch=1)
    rows["teacher"]["flops"] = dense_flops(config.fingerprint, batch=1)
    return {
        "device": device,
        "latency_batch": batch or 1,
        **rows["compressed"],
        "teacher": rows["teacher"],
        "speedup": rows["teacher"]["latency_ms"] / rows["compressed"]["latency_ms"],
    }
