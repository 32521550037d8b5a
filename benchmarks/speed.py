"""Speed on CPU: calibration + factorization time, and measured speed-ups against FLOPs.

1. For random-weight deit_small_patch16_224 and deit_base_patch16_224 at 224 px: the wall
   (and process CPU) time of `evaluators.calibration.calibrate` over random images and of
   building the full `vitrank.core.factorize.FactorCache` (every SVD a search needs,
   done once).
2. On deit_small: at each budget, the best of a few budgeted configs (drawn by Optuna's
   random sampler from `spaces`' budgeted parametrization, ranked by the spectral proxy on
   the cached factors) is built with `vitrank.compress` and timed with
   `evaluators.measure_latency` at batch 1 and 32, each right after the dense teacher, so
   both see the same machine load. The figure is the measured speed-up (teacher ms /
   compressed ms) next to 1 / FLOPs ratio (`spaces.count_flops`, exact, batch 1).
   With random weights the ranking says nothing about accuracy; what is timed is the
   structure the search would hand out at that budget.

    python benchmarks/speed.py            # writes benchmarks/results/speed.json
    python benchmarks/speed.py --quick    # fewer images, configs and repeats (run_all --quick)

Models not measured in a run (``--models``) keep their earlier figures in speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import timm
import torch
from _common import RESULTS, comma_list, machine_info, write_result
from torch import nn
from vitrank.core.factorize import FactorCache
from vitrank.evaluators import measure_latency
from vitrank.evaluators.calibration import calibrate
from vitrank.evaluators.proxies import SpectralProxy
from vitrank.spaces import SpaceFunction, build_space, count_flops, count_params, parse_budget

MODELS = {"deit_small": "deit_small_patch16_224", "deit_base": "deit_base_patch16_224"}
INPUT = (3, 224, 224)


def timed(fn: Any) -> tuple[Any, float, float]:
    """`fn()`'s result, wall seconds and this process's CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def random_teacher(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False).eval()


def setup_times(
    name: str, images: int, batch_size: int, seed: int
) -> tuple[dict[str, Any], nn.Module, Any, FactorCache]:
    """Calibration and full factorization of one random-weight model."""
    teacher = random_teacher(name, seed)
    generator = torch.Generator().manual_seed(seed)
    calib = torch.randn(images, *INPUT, generator=generator)
    data = [(chunk, None) for chunk in calib.split(batch_size)]
    stats, calib_s, calib_cpu = timed(lambda: calibrate(teacher, data, progress=False))
    factors, factor_s, factor_cpu = timed(lambda: FactorCache(teacher, stats))
    row = {
        "model": f"{name} (random weights)",
        "params": sum(p.numel() for p in teacher.parameters()),
        "calibration_images": images,
        "calibration_batch": batch_size,
        "calibration_s": round(calib_s, 2),
        "calibration_cpu_s": round(calib_cpu, 2),
        "factorization_s": round(factor_s, 2),
        "factorization_cpu_s": round(factor_cpu, 2),
        "layers_factorized": len(factors.layer_keys()),
        "total_s": round(calib_s + factor_s, 2),
    }
    print(
        f"{name}: calibration {calib_s:.1f} s ({images} images), "
        f"factorization {factor_s:.1f} s ({row['layers_factorized']} layers)",
        flush=True,
    )
    return row, teacher, stats, factors


def best_of_samples(
    space: Any, budget_text: str, samples: int, proxy: SpectralProxy, seed: int
) -> tuple[Any, float]:
    """The lowest-proxy config of `samples` budgeted draws at `budget_text`."""
    kind, value = budget_text.split("=")
    budget = parse_budget(float(value), kind=kind)
    fn = SpaceFunction(space, budget, "budgeted")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    drawn = [fn.suggest(study.ask()) for _ in range(samples)]
    scored = sorted(((proxy.score(c), i) for i, c in enumerate(drawn)), key=lambda t: t[0])
    score, index = scored[0]
    return drawn[index], score


def paired_latency(
    teacher: nn.Module, student: nn.Module, batch: int, warmup: int, repeats: int, threads: int
) -> dict[str, float]:
    """Teacher and student timed back to back (teacher first) at one batch size."""
    kwargs = {"batch": batch, "warmup": warmup, "repeats": repeats, "threads": threads}
    dense = measure_latency(teacher, INPUT, **kwargs).median_ms
    compressed = measure_latency(student, INPUT, **kwargs).median_ms
    return {
        "teacher_ms": round(dense, 3),
        "compressed_ms": round(compressed, 3),
        "speedup": round(dense / compressed, 3),
    }


def speedups(
    teacher: nn.Module, stats: Any, factors: FactorCache, args: argparse.Namespace
) -> dict[str, Any]:
    import vitrank

    space = build_space(teacher, model_name=MODELS["deit_small"])
    # Random weights: unit sensitivities (a ranking of structures, not of accuracy).
    proxy = SpectralProxy(factors, None, teacher=teacher, stats=stats)
    rows = []
    for budget_text in args.budgets:
        config, score = best_of_samples(space, budget_text, args.samples, proxy, args.seed)
        student = vitrank.compress(teacher, config, stats, factors).eval()
        flops_ratio = count_flops(config) / space.dense_flops
        row: dict[str, Any] = {
            "budget": budget_text,
            "spectral_proxy": score,
            "params_fraction": round(count_params(config) / space.dense_params, 4),
            "flops_ratio": round(flops_ratio, 4),
            "inverse_flops_ratio": round(1 / flops_ratio, 3),
            "tokens_out": config.token_schedule[-1],
            "ops": [f"{b.attn.op}/{b.mlp.op}/{b.merge_ratio:g}" for b in config.blocks],
        }
        for batch, repeats in ((1, args.repeats_batch1), (32, args.repeats_batch32)):
            row[f"batch{batch}"] = paired_latency(
                teacher, student, batch, max(1, repeats // 5), repeats, args.threads
            )
        rows.append(row)
        print(
            f"{budget_text}: FLOPs x{flops_ratio:.3f} (1/ratio {1 / flops_ratio:.2f}), "
            f"speed-up b1 x{row['batch1']['speedup']:.2f}, b32 x{row['batch32']['speedup']:.2f}",
            flush=True,
        )
    return {
        "model": f"{MODELS['deit_small']} (random weights)",
        "selection": f"best spectral proxy of {args.samples} budgeted random-sampler draws",
        "threads": args.threads,
        "repeats": {"batch1": args.repeats_batch1, "batch32": args.repeats_batch32},
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="deit_small,deit_base", help="of " + ",".join(MODELS))
    parser.add_argument("--calib-images", type=int, default=32)
    parser.add_argument("--calib-batch", type=int, default=8)
    parser.add_argument(
        "--budgets",
        default="params=0.7,params=0.5,params=0.35,flops=0.5",
        help="budgets of the speed-up configs (kind=value)",
    )
    parser.add_argument("--samples", type=int, default=16, help="budgeted draws per budget")
    parser.add_argument("--repeats-batch1", type=int, default=30)
    parser.add_argument("--repeats-batch32", type=int, default=6)
    # One thread by default, as tokens.py and latency_table.py: on a shared 2-core machine
    # two threads oversubscribe and the figures swing; process CPU time is recorded too.
    parser.add_argument("--threads", type=int, default=1, help="torch threads throughout")
    parser.add_argument("--skip-speedups", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer images/configs/repeats")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where speed.json goes")
    args = parser.parse_args(argv)
    if args.quick:
        args.calib_images, args.samples = 8, 6
        args.budgets = "params=0.5,flops=0.5"
        args.repeats_batch1, args.repeats_batch32 = 10, 2
    args.budgets = comma_list(args.budgets, str)
    names = comma_list(args.models, str)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise SystemExit(f"unknown --models {unknown}; known: {list(MODELS)}")
    torch.set_num_threads(args.threads)

    path = args.out_dir / "speed.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    command = "python benchmarks/speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    setup = dict(previous.get("setup", {}))
    result: dict[str, Any] = {
        "machine": {**machine_info(args.threads), "load_average_at_start": os.getloadavg()},
        "command": command.strip(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "setup": setup,
        "speedups": previous.get("speedups"),
    }
    for short in names:
        row, teacher, stats, factors = setup_times(
            MODELS[short], args.calib_images, args.calib_batch, args.seed
        )
        # Each model's row carries when and how it was measured (rows may be kept).
        setup[short] = {**row, "date": machine_info()["date"], "command": result["command"]}
        if short == "deit_small" and not args.skip_speedups:
            result["speedups"] = speedups(teacher, stats, factors, args)
            result["speedups"]["date"] = machine_info()["date"]
        del teacher, stats, factors
    result["machine"]["load_average_at_end"] = os.getloadavg()
    print(f"wrote {write_result('speed', result, args.out_dir)}")


if __name__ == "__main__":
    main()
