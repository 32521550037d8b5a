"""Factorization speed on CPU: building a full `FactorCache`, whitened and plain.

For random-weight deit_small_patch16_224 and deit_base_patch16_224 at 224 px, calibrated
on a few random images with `evaluators.calibration.calibrate`: the wall time of
`FactorCache(model, stats, whitening=True)` and of `FactorCache(model, None,
whitening=False)` (every Linear and every head product of every block), median of a few
repeats, with the machine's load average before and after (the figures are only as quiet
as the machine was).

On a shared 2-core machine, two torch threads with OpenMP's default (spinning) wait
policy run several times slower than one thread whenever another process is busy (each
waits out the other's time slice); OMP_WAIT_POLICY=PASSIVE avoids that, and is recorded.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/factorize_speed.py   # results/factorize_speed.json
    python benchmarks/factorize_speed.py --models deit_small --repeats 1 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch
from _common import machine_info, write_result
from speed import INPUT, MODELS, random_teacher, timed
from vitrank.core.factorize import FactorCache
from vitrank.evaluators.calibration import calibrate

KINDS = {"whitened": True, "plain": False}


def factorization_times(name: str, images: int, repeats: int, seed: int) -> dict[str, Any]:
    """Calibration once, then each kind of FactorCache `repeats` times."""
    teacher = random_teacher(name, seed)
    calib = torch.randn(images, *INPUT, generator=torch.Generator().manual_seed(seed))
    stats, calib_s, _ = timed(lambda: calibrate(teacher, [(calib, None)], progress=False))
    row: dict[str, Any] = {
        "model": f"{name} (random weights)",
        "calibration_images": images,
        "calibration_s": round(calib_s, 2),
    }
    for kind, whitening in KINDS.items():
        walls, cpus = [], []
        for _ in range(repeats):
            factors, wall, cpu = timed(
                lambda w=whitening: FactorCache(teacher, stats if w else None, whitening=w)
            )
            walls.append(wall)
            cpus.append(cpu)
        row[kind] = {
            "median_s": round(statistics.median(walls), 2),
            "runs_s": [round(t, 2) for t in walls],
            "median_cpu_s": round(statistics.median(cpus), 2),
            "layers_factorized": len(factors.layer_keys()),
        }
        print(f"{name} {kind}: {row[kind]['median_s']} s (runs {row[kind]['runs_s']})", flush=True)
    row["both_median_s"] = round(row["whitened"]["median_s"] + row["plain"]["median_s"], 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--images", type=int, default=8, help="calibration images (one batch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads throughout")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = os.getloadavg()
    began = time.perf_counter()
    models = {
        key: factorization_times(MODELS[key], args.images, args.repeats, args.seed)
        for key in args.models
    }
    result = {
        "machine": {
            **machine_info(args.threads),
            "load_average_at_start": start,
            "load_average_at_end": os.getloadavg(),
        },
        "settings": {**vars(args), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
        "models": models,
        "total_s": round(time.perf_counter() - began, 1),
    }
    print(write_result("factorize_speed", result))


if __name__ == "__main__":
    main()
