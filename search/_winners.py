"""Winners: the top K of the feasible front, built, compensated, fine-tuned, measured, saved.

Each winner lands in `winners/<id>/` as `config.json` + `model.safetensors` (loadable with
`vitrank.load`) and `metrics.json` (accuracy before and after fine-tuning, parameters,
FLOPs, predicted and measured latency). With the ray engine the fine-tuning runs as Ray
Tune trials (in parallel where the cluster has room); otherwise in this process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search._pareto import pick_winners
from search._rundir import RunDir, atomic_write_json
from search._table import front_rows

if TYPE_CHECKING:
    from torch import nn

    from search._problem import Problem
    from vitrank.workloads import Workload


def winner_id(number: int) -> str:
    return f"trial-{number:04d}"


def choose(rows: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The top `k` feasible rows: best proxy first, the rest spread along the front."""
    front = front_rows(rows)
    points = [(r["proxy"], r["cost"]) for r in front]
    return [front[i] for i in pick_winners(points, list(range(len(front))), k)]


def _accuracy(model: nn.Module, workload: Workload, device: str) -> float:
    from evaluators import evaluate_accuracy

    return float(evaluate_accuracy(model, workload.val, device=device, progress=False))


def _latency(model: nn.Module, workload: Workload, batch: int, device: str) -> float:
    from evaluators import LATENCY_REPEATS, LATENCY_WARMUP, measure_latency

    result = measure_latency(
        model,
        workload.input_size,
        batch=batch,
        device=device,
        warmup=LATENCY_WARMUP,
        repeats=LATENCY_REPEATS,
    )
    return float(result.median_ms)


def build_winner(
    problem: Problem, workload: Workload, row: dict[str, Any], compensate: bool, device: str
) -> tuple[nn.Module, dict[str, Any]]:
    """The winner's model (compensated when asked) and its pre-fine-tuning metrics."""
    from spaces import CompressionConfig
    from vitrank.core.model import compress

    config = CompressionConfig.from_json(row["config"])
    config = config.replace(
        provenance={
            "run": problem.run.root.name,
            "trial": int(row["number"]),
            "granularity": problem.settings.granularity,  # the grid `vitrank apply` checks
            "baseline": row["baseline"],
            "metrics": {"proxy": row["proxy"], "params": row["params"], "flops": row["flops"]},
        }
    )
    teacher = problem.teacher
    factors = problem.factor_cache(config.svd)
    model = compress(teacher, config, problem.stats, factors)
    metrics: dict[str, Any] = {
        "number": int(row["number"]),
        "baseline": row["baseline"],
        "proxy": row["proxy"],
        "compressed_accuracy": _accuracy(model, workload, device),
    }
    if compensate and config.svd == "whitened":
        compensated = config.replace(compensate=True)
        model = compress(
            teacher,
            compensated,
            problem.stats,
            factors,
            images=problem.compensation_images(workload),
        )
        metrics["compensated_accuracy"] = _accuracy(model, workload, device)
    metrics["initial_accuracy"] = metrics.get(
        "compensated_accuracy", metrics["compressed_accuracy"]
    )
    return model, metrics


def finetune_winner(config: dict[str, Any]) -> None:
    """Ray Tune trainable: fine-tune the model saved in `winner_dir` and save it back there."""
    from evaluators.finetune import finetune_trainable

    config = dict(config)
    directory = config.pop("winner_dir")
    finetune_trainable({**config, "student_dir": directory, "output_dir": directory})


def _finetune_ray(
    run: RunDir, directories: list[Path], problem: Problem, epochs: int, session: str
) -> dict[str, dict[str, Any]]:
    from ray import tune

    from search._engines import init_ray

    settings = problem.settings
    init_ray(settings.ray_address)
    from vitrank.workloads import WorkloadSettings

    space = {
        "winner_dir": tune.grid_search([str(d.resolve()) for d in directories]),
        **WorkloadSettings.of(settings).teacher_keys(),
        "epochs": epochs,
        "seed": settings.seed,
        "device": "cuda" if settings.trial_gpus() > 0 else "cpu",
    }
    tuner = tune.Tuner(
        tune.with_resources(
            finetune_winner, {"cpu": settings.cpus_per_trial, "gpu": settings.trial_gpus()}
        ),
        param_space=space,
        run_config=tune.RunConfig(
            name=session, storage_path=str(run.tune.resolve()), verbose=0, log_to_file=False
        ),
    )
    results = tuner.fit()
    out: dict[str, dict[str, Any]] = {}
    for index in range(len(results)):
        result = results[index]
        directory = (result.config or {})["winner_dir"]
        if result.error is not None:
            raise RuntimeError(f"fine-tuning {directory} failed: {result.error}")
        metrics = result.metrics or {}
        out[directory] = {
            "finetuned_accuracy": float(metrics.get("best_accuracy", float("nan"))),
            "finetune_epochs_run": int(metrics.get("epoch", 0)),
        }
    return out


def save_winners(
    problem: Problem,
    workload: Workload,
    rows: list[dict[str, Any]],
    *,
    top: int,
    epochs: int,
    ray: bool,
    log: Any = print,
) -> list[Path]:
    """Build, (compensate,) fine-tune, measure and save the top winners; their folders."""
    from spaces import count_flops, count_params, predict_latency
    from vitrank.core.model import CONFIG_ATTRIBUTE, save

    settings = problem.settings
    device = str(problem.device)
    chosen = choose(rows, max(top, 1))
    run = problem.run
    directories, records = [], []
    for row in chosen:
        directory = run.winners / winner_id(int(row["number"]))
        log(
            f"building winner {directory.name} on {device}"
            + (" with error compensation ..." if settings.compensate else " ...")
        )
        model, metrics = build_winner(problem, workload, row, settings.compensate, device)
        config = getattr(model, CONFIG_ATTRIBUTE)
        metrics.update(
            params=int(count_params(config)),
            params_built=int(sum(p.numel() for p in model.parameters())),
            flops=int(count_flops(config)),
        )
        if problem.latency_table is not None:
            metrics["predicted_latency_ms"] = float(predict_latency(config, problem.latency_table))
        # Measured before any fine-tuning (which keeps the structure, hence the latency), so
        # that Ray fine-tuning workers never share the cores with the measurement.
        metrics["latency_ms"] = _latency(model, workload, settings.batch, device)
        metrics["latency_batch"], metrics["latency_device"] = settings.batch, device
        save(model, directory)
        directories.append(directory)
        records.append((directory, model, metrics))
    # Fine-tune only the first `top` (the best proxy first); the others are kept as built.
    tune_these = [d for d, _, _ in records][: top if epochs > 0 else 0]
    tuned: dict[str, dict[str, Any]] = {}
    if tune_these and ray:
        log(f"fine-tuning {len(tune_these)} winner(s) for {epochs} epoch(s) as Ray Tune trials ...")
        sessions = sorted(run.tune.glob("finetune-*")) if run.tune.exists() else []
        tuned = _finetune_ray(run, tune_these, problem, epochs, f"finetune-{len(sessions)}")
    elif tune_these:
        from evaluators import finetune

        for directory, model, _ in records:
            if directory not in tune_these:
                continue
            log(f"fine-tuning {directory.name} for {epochs} epoch(s) ...")
            result = finetune(
                model,
                problem.teacher,
                workload.train,
                workload.val,
                epochs=epochs,
                seed=settings.seed,
                device=device,
                progress=True,
            )
            save(model, directory)
            tuned[str(directory.resolve())] = {
                "finetuned_accuracy": float(result.best_accuracy),
                "finetune_history": result.history,
            }
    for directory, _, metrics in records:
        extra = tuned.get(str(directory.resolve()))
        if extra is not None:
            metrics.update(extra, finetune_epochs=epochs)
        atomic_write_json(
            directory / "metrics.json", json.loads(json.dumps(metrics, default=float))
        )
    return directories
