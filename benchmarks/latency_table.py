"""How well a latency table predicts the latency of whole compressed models on CPU.

Measures a latency table for a random-weight timm ViT (per-operator medians after
warm-up, one pinned thread), then draws random configs from the raw search space (every
operator family, token merging included), builds each with `apply_specs`, measures its
whole forward pass and compares with `predict_latency`. The figure is the median relative
error |predicted - measured| / measured (goal: <= 15 %).

Both the table and the whole models are timed with the same clock. With one thread the
default is the thread's CPU time, which is what the run takes on an idle core even when
the machine is shared with other jobs (as this one often is); `--clock wall` times wall
clock instead (meaningful on an otherwise idle machine).

    python benchmarks/latency_table.py            # writes benchmarks/results/latency_table.json
    python benchmarks/latency_table.py --quick    # fewer configs and repeats, to check it runs
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import time
from pathlib import Path

import optuna
import timm
import torch
from _common import command_line
from vitrank.spaces import (
    CompressionConfig,
    SpaceFunction,
    build_space,
    count_flops,
    count_params,
    measure_latency_table,
    predict_latency,
)
from vitrank.spaces._latency import machine_info, random_weight_model, time_ms

RESULTS = Path(__file__).parent / "results" / "latency_table.json"


def random_configs(space, count: int, seed: int) -> list[CompressionConfig]:
    """Configs drawn from the raw parametrization by Optuna's random sampler (what a search
    starts from); the table's own calibration models are drawn separately."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fn = SpaceFunction(space, None, "raw")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    study.optimize(lambda trial: fn(trial) and 0.0, n_trials=count)
    return [CompressionConfig.from_json(t.user_attrs["config"]) for t in study.trials]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--configs", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--clock", choices=("auto", "wall", "thread"), default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.configs, args.repeats = 4, 5

    load_before = os.getloadavg()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model_args = {"img_size": args.img_size}
    model = timm.create_model(args.model, pretrained=False, **model_args).eval()
    space = build_space(model, model_name=args.model, model_args=model_args)
    started = time.time()
    table = measure_latency_table(
        model,
        space.fingerprint,
        device="cpu",
        batch=args.batch,
        threads=args.threads,
        space=space,
        repeats=args.repeats,
        clock=args.clock,
    )
    table_s = time.time() - started
    print(
        f"table: {len(table.entries)} operators in {table_s:.0f} s, {table.clock} clock, "
        f"dense {table.dense_ms:.2f} ms (offset {table.offset_ms:.2f} ms)"
    )
    images = torch.randn(args.batch, 3, args.img_size, args.img_size)
    dense = random_weight_model(model, space.dense()).eval()
    rows = []
    for index, config in enumerate(random_configs(space, args.configs, args.seed + 1000)):
        student = random_weight_model(model, config).eval()
        with torch.inference_mode():
            # The dense model right before each config: how far the machine has drifted
            # since the table was measured (a secondary, drift-corrected figure).
            dense_now = time_ms(
                functools.partial(dense, images), warmup=2, repeats=args.repeats, clock=table.clock
            )
            measured = time_ms(
                functools.partial(student, images),
                warmup=5,
                repeats=args.repeats,
                clock=table.clock,
            )
        predicted = predict_latency(config, table)
        error = abs(predicted - measured) / measured
        corrected = predicted * dense_now / table.dense_ms
        rows.append(
            {
                "predicted_ms": round(predicted, 4),
                "measured_ms": round(measured, 4),
                "relative_error": round(error, 4),
                "dense_measured_before_ms": round(dense_now, 4),
                "relative_error_drift_corrected": round(abs(corrected - measured) / measured, 4),
                "params": count_params(config),
                "flops": count_flops(config),
                "tokens_out": config.token_schedule[-1],
                "ops": [f"{b.attn.op}/{b.mlp.op}/{b.merge_ratio:g}" for b in config.blocks],
            }
        )
        print(
            f"config {index:2d}: predicted {predicted:8.3f} ms, measured {measured:8.3f} ms "
            f"(dense now {dense_now:.3f} ms)"
        )
    errors = [row["relative_error"] for row in rows]
    result = {
        "what": "median relative error of predict_latency vs measured whole-model latency",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info("cpu"),
        "model": args.model,
        "model_args": model_args,
        "device": "cpu",
        "batch": args.batch,
        "threads": args.threads,
        "clock": table.clock,
        "repeats": args.repeats,
        # Other jobs on the machine (1-minute load average at start and end): on a shared
        # CPU they move timings between the table and the whole-model measurements.
        "load_average": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "configs": len(rows),
        "median_relative_error": round(statistics.median(errors), 4),
        "mean_relative_error": round(statistics.fmean(errors), 4),
        "max_relative_error": round(max(errors), 4),
        # Prediction scaled by (dense model measured just before) / (dense in the table):
        # the error left once the machine's drift between table and measurement is removed.
        "median_relative_error_drift_corrected": round(
            statistics.median(row["relative_error_drift_corrected"] for row in rows), 4
        ),
        "goal": 0.15,
        "table": {
            "operators": len(table.entries),
            "tokens": table.tokens,
            "dense_ms": round(table.dense_ms, 4),
            "offset_ms": round(table.offset_ms, 4),
            "outside_ms": round(table.outside_ms, 4),
            "scale": round(table.scale, 4),
            "calibration_operator_sum_vs_measured_ms": [
                [round(x, 3), round(y, 3)] for x, y in table.calibration
            ],
            "seconds_to_measure": round(table_s, 1),
        },
        "rows": rows,
    }
    result["command"] = command_line()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(
        f"median relative error {result['median_relative_error']:.1%} over {len(rows)} configs "
        f"(goal <= 15 %), {result['median_relative_error_drift_corrected']:.1%} drift-corrected; "
        f"wrote {args.out}"
    )


if __name__ == "__main__":
    main()
