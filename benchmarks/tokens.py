"""Token merging: FLOPs, measured CPU throughput and (on digits) accuracy per schedule.

For the digits teacher and a random-weight deit_small_patch16_224 at 224 px, each merge
schedule (per-block merge ratios; constant and decreasing) is applied with dense
attention and MLP, and compared with its teacher in the same run: FLOPs at batch 1
(torch's FlopCounterMode on the real models), throughput at batch 1 and 32 (median of
repeated runs after warm-up, teacher and merged model timed alternately so both see the
same machine load, torch threads fixed) and, on digits, validation accuracy.

    python benchmarks/tokens.py                 # writes benchmarks/results/tokens.json
    python benchmarks/tokens.py --quick         # fewer repeats, to check it runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import timm
import torch
from _common import command_line, machine_info
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from vitrank.core.apply import apply_specs
from vitrank.core.spec import BlockSpec, token_schedule
from vitrank.core.structure import inspect_vit

RESULTS = Path(__file__).parent / "results" / "tokens.json"


def _decreasing(top: float, depth: int) -> list[float]:
    """Ratios falling linearly from ``top`` in the first block towards 0 after the last."""
    return [round(top * (1 - i / depth), 4) for i in range(depth)]


def schedules(depth: int, digits: bool) -> dict[str, list[float]]:
    if digits:  # 16 patch tokens: ratios that merge whole tokens
        return {
            "constant-0.125": [0.125] * depth,
            "constant-0.25": [0.25] * depth,
            "decreasing-0.5": _decreasing(0.5, depth),
            "first-block-0.5": [0.5] + [0.0] * (depth - 1),
        }
    return {
        "constant-0.05": [0.05] * depth,
        "constant-0.09": [0.09] * depth,
        "constant-0.15": [0.15] * depth,
        "decreasing-0.12": _decreasing(0.12, depth),
        "decreasing-0.25": _decreasing(0.25, depth),
    }


def count_flops(model: nn.Module, images: torch.Tensor) -> int:
    # The fused CPU attention kernel is invisible to FlopCounterMode; the math path runs
    # the same attention as matmuls that it counts.
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
        model(images)
    return counter.get_total_flops()


def _seconds(model: nn.Module, images: torch.Tensor) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one forward pass."""
    wall, cpu = time.perf_counter(), time.process_time()
    model(images)
    return time.perf_counter() - wall, time.process_time() - cpu


def paired_throughput(
    teacher: nn.Module, merged: nn.Module, images: torch.Tensor, warmup: int, repeats: int
) -> dict[str, float]:
    """Images per second of both models, timed alternately; ratios are merged / teacher.

    ``ratio`` is from median wall-clock times (what a user sees); ``cpu_time_ratio`` from
    median process CPU times, which other processes on a shared machine disturb far less
    (with one torch thread, CPU time is the wall time the pass would take on a quiet core).
    """
    models = {"teacher": teacher, "merged": merged}
    wall: dict[str, list[float]] = {"teacher": [], "merged": []}
    cpu: dict[str, list[float]] = {"teacher": [], "merged": []}
    with torch.inference_mode():
        for _ in range(warmup):
            teacher(images)
            merged(images)
        for repeat in range(repeats):
            # Alternate who goes first so neither always runs on a warmer cache.
            order = ("teacher", "merged") if repeat % 2 == 0 else ("merged", "teacher")
            for name in order:
                seconds, cpu_seconds = _seconds(models[name], images)
                wall[name].append(seconds)
                cpu[name].append(cpu_seconds)
    batch = images.shape[0]
    teacher_ips = batch / statistics.median(wall["teacher"])
    merged_ips = batch / statistics.median(wall["merged"])
    return {
        "teacher_images_per_s": round(teacher_ips, 2),
        "merged_images_per_s": round(merged_ips, 2),
        "ratio": round(merged_ips / teacher_ips, 3),
        "cpu_time_ratio": round(
            statistics.median(cpu["teacher"]) / statistics.median(cpu["merged"]), 3
        ),
        "teacher_cpu_images_per_s": round(batch / statistics.median(cpu["teacher"]), 2),
        "merged_cpu_images_per_s": round(batch / statistics.median(cpu["merged"]), 2),
    }


def run_model(
    name: str,
    teacher: nn.Module,
    input_size: tuple[int, int, int],
    ratios_by_schedule: dict[str, list[float]],
    repeats: dict[int, int],
    val=None,
) -> dict:
    from vitrank.evaluators.accuracy import evaluate_accuracy

    fingerprint = inspect_vit(teacher)
    generator = torch.Generator().manual_seed(0)
    inputs = {batch: torch.randn(batch, *input_size, generator=generator) for batch in repeats}
    teacher_flops = count_flops(teacher, inputs[1][:1])
    result: dict = {
        "model": name,
        "input_size": list(input_size),
        "tokens": fingerprint.num_tokens,
        "num_prefix_tokens": fingerprint.num_prefix_tokens,
        "teacher_flops": teacher_flops,
        "repeats": repeats,
        "schedules": {},
    }
    if val is not None:
        result["teacher_accuracy"] = round(evaluate_accuracy(teacher, val, progress=False), 4)
    for schedule, ratios in ratios_by_schedule.items():
        merged = apply_specs(teacher, [BlockSpec(merge_ratio=r) for r in ratios], None).eval()
        flops = count_flops(merged, inputs[1][:1])
        row: dict = {
            "merge_ratios": ratios,
            "tokens_per_block": token_schedule(
                ratios, fingerprint.num_tokens, fingerprint.num_prefix_tokens
            ),
            "flops": flops,
            "flops_ratio": round(flops / teacher_flops, 4),
        }
        for batch, count in repeats.items():
            warmup = max(1, count // 5)
            row[f"throughput_batch{batch}"] = paired_throughput(
                teacher, merged, inputs[batch], warmup, count
            )
        if val is not None:
            row["accuracy"] = round(evaluate_accuracy(merged, val, progress=False), 4)
        result["schedules"][schedule] = row
        _print_row(name, schedule, row)
    return result


def _print_row(model: str, schedule: str, row: dict) -> None:
    parts = [f"{model:>14} {schedule:>16}  FLOPs x{row['flops_ratio']:.3f}"]
    for key, value in row.items():
        if key.startswith("throughput_batch"):
            batch = key.removeprefix("throughput_batch")
            parts.append(f"b{batch} x{value['ratio']:.2f} (cpu x{value['cpu_time_ratio']:.2f})")
    if "accuracy" in row:
        parts.append(f"acc {row['accuracy']:.4f}")
    print("  ".join(parts), flush=True)


def _digits(repeats: dict[int, int]) -> dict:
    from vitrank import load_workload

    workload = load_workload("digits-vit")
    # A pass takes about a millisecond: many more repeats cost nothing and steady the medians.
    return run_model(
        "digits-vit",
        workload.model,
        workload.input_size,
        schedules(len(inspect_vit(workload.model).blocks), digits=True),
        {batch: 20 * count for batch, count in repeats.items()},
        val=workload.val,
    )


def _deit_small(repeats: dict[int, int]) -> dict:
    torch.manual_seed(0)
    deit = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
    return run_model(
        "deit_small_patch16_224 (random weights)",
        deit,
        (3, 224, 224),
        schedules(len(inspect_vit(deit).blocks), digits=False),
        repeats,
    )


MODELS = {"digits-vit": _digits, "deit_small": _deit_small}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (fixed)")
    parser.add_argument("--repeats-batch1", type=int, default=20)
    parser.add_argument("--repeats-batch32", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 repeats each; not for figures")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(MODELS),
        default=list(MODELS),
        help="models to (re)measure; others already in --out are kept",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    repeats = {1: args.repeats_batch1, 32: args.repeats_batch32}
    if args.quick:
        repeats = {1: 3, 32: 3}
    report: dict = {"models": {}}
    if args.out.exists():
        report = json.loads(args.out.read_text())
    for name in args.models:
        # Each model's figures carry the machine and its load while they were measured.
        load_start = [round(v, 2) for v in os.getloadavg()]
        result = MODELS[name](repeats)
        result["machine"] = machine_info(torch.get_num_threads())
        result["load_average"] = {
            "start": load_start,
            "end": [round(v, 2) for v in os.getloadavg()],
        }
        report["models"][name] = result

    report["command"] = command_line()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
