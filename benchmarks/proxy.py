"""How fast and how faithful the proxies are: writes benchmarks/results/proxy.json.

    python benchmarks/proxy.py [--configs 60] [--heldout 64] [--threads 2] [--skip-deit]

On the digits teacher (`vitrank.load_workload("digits-vit")`):
- candidates per second of the spectral and the logits proxy (wall clock, `--threads`
  torch threads, over random configs drawn uniformly from `spaces.build_space` with the
  raw parametrization);
- the rank correlation (Spearman, Kendall) between each proxy and the true validation
  accuracy of the same configs without fine-tuning;
- a 3-epoch distillation fine-tune of a 50 %-parameter config (accuracy before / after).
On a random-weight deit_small_patch16_224 (224 px): candidates per second of each proxy.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import optuna
import torch
from _common import machine_info, write_result
from vitrank.core.apply import apply_specs
from vitrank.core.factorize import FactorCache
from vitrank.evaluators import evaluate_accuracy, finetune, rank_fidelity
from vitrank.evaluators.calibration import calibrate
from vitrank.evaluators.proxies import (
    LogitsProxy,
    SpectralProxy,
    heldout_batch,
    measure_sensitivity,
)
from vitrank.spaces import allocate, build_space, count_params, parse_budget, suggest_raw


def random_configs(space: Any, count: int, seed: int) -> list:
    """Configs drawn uniformly from the space (the raw parametrization, random sampler)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [suggest_raw(study.ask(), space) for _ in range(count)]


def rate(evaluate: Any, configs: list, min_seconds: float) -> dict[str, float]:
    """Candidates per second (wall clock and this process's CPU time) over `configs`."""
    done, wall, cpu = 0, time.perf_counter(), time.process_time()
    while True:
        for config in configs:
            evaluate(config)
        done += len(configs)
        elapsed = time.perf_counter() - wall
        if elapsed >= min_seconds:
            break
    return {
        "candidates_per_s": done / elapsed,
        "cpu_candidates_per_s": done / (time.process_time() - cpu),
        "candidates": done,
        "seconds": elapsed,
    }


def speeds(proxies: dict[str, Any], configs: list, thread_counts: list[int]) -> dict[str, Any]:
    """Candidates per second of each proxy at each torch thread count (restored after)."""
    before = torch.get_num_threads()
    result: dict[str, Any] = {}
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for name, proxy in proxies.items():
                seconds = 2.0 if name == "spectral" else 0.0
                result.setdefault(name, {})[f"threads_{threads}"] = rate(
                    proxy.evaluate, configs, seconds
                )
    finally:
        torch.set_num_threads(before)
    for by_threads in result.values():
        by_threads["candidates_per_s"] = max(
            r["candidates_per_s"] for r in by_threads.values() if isinstance(r, dict)
        )
    return result


def digits(args: argparse.Namespace) -> dict[str, Any]:
    from vitrank import load_workload

    workload = load_workload("digits-vit")
    teacher = workload.model
    start = time.perf_counter()
    stats = calibrate(teacher, workload.calib, progress=False)
    factors = FactorCache(teacher, stats)
    setup_s = time.perf_counter() - start
    images, labels = heldout_batch(workload, size=args.heldout, seed=args.seed)
    start = time.perf_counter()
    sensitivity = measure_sensitivity(teacher, factors, stats, images)
    sensitivity_s = time.perf_counter() - start
    space = build_space(teacher, model_name=workload.model_name, model_args=workload.model_args)
    configs = random_configs(space, args.configs, args.seed)

    spectral = SpectralProxy(factors, sensitivity, teacher=teacher, stats=stats)
    logits = LogitsProxy(teacher, factors, stats, images, labels)
    speed = speeds({"spectral": spectral, "logits": logits}, configs, args.thread_counts)
    rows = []
    for config in configs:
        candidate = apply_specs(teacher, config.blocks, factors, stats)
        row = {
            "params_fraction": count_params(config) / space.dense_params,
            "spectral": spectral.score(config),
            **{f"logits_{k}": v for k, v in logits.evaluate(config).items()},
            "val_accuracy": evaluate_accuracy(candidate, workload.val, progress=False),
        }
        rows.append(row)
    accuracy = [r["val_accuracy"] for r in rows]
    fidelity = {
        "logits_kl": rank_fidelity([r["logits_kl"] for r in rows], accuracy).to_dict(),
        "spectral": rank_fidelity([r["spectral"] for r in rows], accuracy).to_dict(),
        "logits_agreement": rank_fidelity(
            [r["logits_agreement"] for r in rows], accuracy, lower_is_better=False
        ).to_dict(),
        "spectral_vs_logits_kl": rank_fidelity(
            [r["spectral"] for r in rows], [-r["logits_kl"] for r in rows]
        ).to_dict(),
    }
    teacher_accuracy = evaluate_accuracy(teacher, workload.val, progress=False)
    return {
        "teacher": workload.model_name,
        "model_args": workload.model_args,
        "teacher_val_accuracy": teacher_accuracy,
        "val_images": len(workload.val),
        "heldout_images": len(images),
        "calibration_images": len(workload.calib),
        "setup_seconds": {"calibration_and_factors": setup_s, "sensitivity": sensitivity_s},
        "configs": len(configs),
        "speed": speed,
        "fidelity_vs_val_accuracy": fidelity,
        "val_accuracy_range": [min(accuracy), max(accuracy)],
        "rows": rows,
        "finetune": finetune_half(args, workload, space, factors, stats, teacher_accuracy),
    }


def finetune_half(
    args: argparse.Namespace,
    workload: Any,
    space: Any,
    factors: Any,
    stats: Any,
    teacher_acc: float,
) -> dict[str, Any]:
    """3 epochs of distillation for a config at 50 % of the teacher's parameters.

    Heads and MLP hidden units pruned: on the digits teacher the factorized configs at 50 %
    keep the teacher's accuracy without fine-tuning (nothing to recover), pruning does not.
    """
    ops = {(i, kind): "prune" for i in range(len(space.blocks)) for kind in ("attn", "mlp")}
    shares = dict.fromkeys(ops, 1.0)
    config = allocate(space, parse_budget(0.5), ops, shares, [0.0] * len(space.blocks))
    student = apply_specs(workload.model, config.blocks, factors, stats)
    result = finetune(
        student, workload.model, workload.train, workload.val, epochs=3, lr=args.lr,
        seed=args.seed, progress=False,
    )  # fmt: skip
    return {
        "params_fraction": count_params(config) / space.dense_params,
        "config": [
            {"attn": vars(b.attn), "mlp": vars(b.mlp), "merge_ratio": b.merge_ratio}
            for b in config.blocks
        ],
        "teacher_val_accuracy": teacher_acc,
        "val_accuracy_before": result.initial_accuracy,
        "val_accuracy_after": result.best_accuracy,
        "epochs": 3,
        "lr": args.lr,
        "history": result.history,
    }


def deit(args: argparse.Namespace) -> dict[str, Any]:
    import timm

    torch.manual_seed(args.seed)
    name = "deit_small_patch16_224"
    teacher = timm.create_model(name, pretrained=False).eval()
    generator = torch.Generator().manual_seed(args.seed)
    calib = torch.randn(args.deit_calib, 3, 224, 224, generator=generator)
    images = torch.randn(args.deit_heldout, 3, 224, 224, generator=generator)
    start = time.perf_counter()
    stats = calibrate(teacher, [(calib, None)], batch_size=8, progress=False)
    factors = FactorCache(teacher, stats)
    setup_s = time.perf_counter() - start
    space = build_space(teacher, model_name=name)
    configs = random_configs(space, args.deit_configs, args.seed)
    # Random weights: unit sensitivities (the speed of a score does not depend on them).
    spectral = SpectralProxy(factors, None, teacher=teacher, stats=stats)
    logits = LogitsProxy(teacher, factors, stats, images)
    return {
        "teacher": f"{name} (random weights)",
        "heldout_images": len(images),
        "calibration_images": len(calib),
        "setup_seconds": {"calibration_and_factors": setup_s},
        "configs": len(configs),
        "speed": speeds({"spectral": spectral, "logits": logits}, configs, args.thread_counts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=60, help="random digits configs")
    parser.add_argument("--heldout", type=int, default=64, help="held-out images (logits)")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (speed is also measured at 1)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=5e-4, help="fine-tuning learning rate")
    parser.add_argument("--skip-deit", action="store_true")
    parser.add_argument("--deit-configs", type=int, default=8)
    parser.add_argument("--deit-heldout", type=int, default=8)
    parser.add_argument("--deit-calib", type=int, default=32)
    args = parser.parse_args()
    # Speed at one thread too: on 2 cores a search runs two single-threaded trials at once.
    args.thread_counts = sorted({1, args.threads})
    # Untimed work (calibration, accuracy, fine-tuning) single-threaded: on a shared
    # 2-core machine oversubscribed threads are far slower than one.
    torch.set_num_threads(1)
    result: dict[str, Any] = {
        "machine": {**machine_info(args.threads), "load_average_at_start": os.getloadavg()},
        "note": "candidates_per_s: wall clock, best over the thread counts measured; "
        "cpu_candidates_per_s: per second of this process's CPU time (what an unloaded "
        "machine would give at one thread).",
        "settings": vars(args),
        "digits": digits(args),
    }
    if not args.skip_deit:
        result["deit_small"] = deit(args)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    d = result["digits"]
    result["must_show"] = {
        "logits_candidates_per_s_digits >= 30": d["speed"]["logits"]["candidates_per_s"] >= 30,
        "spectral_candidates_per_s_digits >= 10000": d["speed"]["spectral"]["candidates_per_s"]
        >= 10_000,
        "logits_kl_spearman_vs_accuracy >= 0.8": d["fidelity_vs_val_accuracy"]["logits_kl"][
            "spearman_rho"
        ]
        >= 0.8,
        "finetune_raises_accuracy": d["finetune"]["val_accuracy_after"]
        > d["finetune"]["val_accuracy_before"],
    }
    path = write_result("proxy", result)
    print(f"wrote {path}")
    for key, value in result["must_show"].items():
        print(f"  {key}: {value}")
    print(
        f"  speed digits: { ({k: round(v['candidates_per_s'], 1) for k, v in d['speed'].items()}) }"
    )
    print(f"  fidelity: {d['fidelity_vs_val_accuracy']}")


if __name__ == "__main__":
    main()
