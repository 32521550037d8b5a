"""Building a trial's model as the winners are built: compressed, then compensated when
asked, with its validation accuracy as built (rung 1 and the winners share it).

Compensation refines the factors on a few calibration images, and on some configs that
fits them worse to new images than the closed form did (on fashion-vit at 19 % of the
parameters it cost the search's winner 0.44 points). So it is kept by the rule rung 2's
epochs follow: unless the config alone is better by the ladder's signal on the selection
images beyond two standard errors (`Measured.beats`), which the model then is, its config
saying `compensate: false`."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn
    from vitrank.search._problem import Problem
    from vitrank.workloads import Workload


def validation_accuracy(model: nn.Module, workload: Workload, device: str) -> float:
    from vitrank.evaluators import evaluate_accuracy

    return float(evaluate_accuracy(model, workload.val, device=device, progress=False))


def measured_latency(model: nn.Module, workload: Workload, batch: int, device: str) -> float:
    """Median milliseconds of a forward pass at `batch` on `device` (evaluators' timing)."""
    from vitrank.evaluators import LATENCY_REPEATS, LATENCY_WARMUP, measure_latency

    result = measure_latency(
        model,
        workload.input_size,
        batch=batch,
        device=device,
        warmup=LATENCY_WARMUP,
        repeats=LATENCY_REPEATS,
    )
    return float(result.median_ms)


def build_candidate(
    problem: Problem, workload: Workload, row: dict[str, Any], compensate: bool
) -> nn.Module:
    """A trial's model as the winners are built: compressed, then compensated when asked."""
    model, _ = _build(problem, workload, row, compensate, None)
    return model


def build_winner(
    problem: Problem, workload: Workload, row: dict[str, Any], compensate: bool, device: str
) -> tuple[nn.Module, dict[str, Any]]:
    """The winner's model (compensated when asked) and its pre-fine-tuning metrics."""
    return _build(problem, workload, row, compensate, device)


def _build(
    problem: Problem,
    workload: Workload,
    row: dict[str, Any],
    compensate: bool,
    device: str | None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The model, and (when `device` is given) its validation accuracy as built."""
    from vitrank.core.model import compress
    from vitrank.spaces import CompressionConfig

    config = CompressionConfig.from_json(row["config"])
    config = config.replace(
        provenance={
            "run": problem.run.root.name,
            "trial": int(row["number"]),
            "granularity": problem.settings.granularity,  # the grid `vitrank apply` checks
            "baseline": row.get("baseline"),
            "metrics": {k: row[k] for k in ("proxy", "params", "flops") if k in row},
        }
    )
    teacher = problem.teacher
    factors = problem.factor_cache(config.svd)
    model = compress(teacher, config, problem.stats, factors)
    metrics: dict[str, Any] = {
        "number": int(row["number"]),
        "baseline": row.get("baseline"),
        "proxy": row.get("proxy"),
    }
    if device is not None:
        metrics["compressed_accuracy"] = validation_accuracy(model, workload, device)
    if compensate and config.svd == "whitened":
        compensated, kept = _compensated(problem, workload, row["config"], config, model)
        if device is not None:
            metrics["compensated_accuracy"] = validation_accuracy(compensated, workload, device)
        metrics["compensation_kept"] = kept
        if kept:
            model = compensated
    if device is not None:
        kept = metrics.get("compensation_kept", False)
        metrics["initial_accuracy"] = metrics[
            "compensated_accuracy" if kept else "compressed_accuracy"
        ]
    return model, metrics


# Compensated configs kept per process (rung 1, the winners and the baselines' comparison
# build the same ones): the refined parameters on the CPU and the rule's verdict.
_MEMO_SIZE = 16


def _compensated(
    problem: Problem, workload: Workload, key: str, config: Any, model: nn.Module
) -> tuple[nn.Module, bool]:
    """`model` (the config as built) compensated, and whether the rule keeps that (see the
    module docstring). Computed once per config and process, then restored: compensation is
    the costly part of a build (on a CPU at 224 px, tens of seconds)."""
    import copy

    from vitrank.core.compensate import is_factorized
    from vitrank.core.model import CONFIG_ATTRIBUTE, compress

    memo = problem.compensated
    if key in memo:
        refined_state, kept = memo[key]
        compensated = copy.deepcopy(model)
        unexpected = compensated.load_state_dict(refined_state, strict=False).unexpected_keys
        if unexpected:
            raise RuntimeError(f"compensated parameters {unexpected[:3]} do not fit the model")
        setattr(compensated, CONFIG_ATTRIBUTE, config.replace(compensate=True))
        return compensated, kept
    from vitrank.search._selection import _selection, selection_signals

    began = time.perf_counter()
    compensated = compress(
        problem.teacher,
        config.replace(compensate=True),
        problem.stats,
        problem.factor_cache(config.svd),
        images=problem.compensation_images(workload),
        compensation_steps=problem.settings.compensation_steps,
    )
    problem.compensation_seconds += time.perf_counter() - began
    data = _selection(problem, workload)
    signal = problem.settings.ladder_signal
    alone = selection_signals(model, data, problem.device)[signal]
    refined = selection_signals(compensated, data, problem.device)[signal]
    kept = not alone.beats(refined)
    refined_state = {
        f"{name}.{param_name}" if name else param_name: param.detach().to("cpu", copy=True)
        for name, module in compensated.named_modules()
        if is_factorized(module)
        for param_name, param in module.named_parameters()
    }
    while len(memo) >= _MEMO_SIZE:
        memo.pop(next(iter(memo)))
    memo[key] = (refined_state, kept)
    return compensated, kept
