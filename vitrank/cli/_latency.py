"""`vitrank latency`: the per-operator latency table of a teacher on a device."""

from __future__ import annotations

import argparse

from ._options import add_device, add_workload, workload_from_args

HELP = "measure the per-operator latency table on a device"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_workload(p, calib=False)
    add_device(p, "batch size (default: 1)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads pinned")
    p.add_argument("--repeats", type=int, default=None, metavar="N", help="timed runs per op")
    p.add_argument("--out", default=None, metavar="FILE", help="where to save the table")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vitrank.core.device import resolve_device
    from vitrank.spaces import build_space, measure_latency_table, predict_latency

    device, batch = str(resolve_device(args.device)), args.batch or 1
    workload = workload_from_args(args)
    threads = args.threads or (1 if device == "cpu" else None)
    space = build_space(
        workload.model, model_name=workload.model_name, model_args=dict(workload.model_args)
    )
    table = measure_latency_table(
        workload.model,
        space.fingerprint,
        device=device,
        batch=batch,
        threads=threads,
        space=space,
        repeats=args.repeats or 20,
    )
    out = Path(args.out or f"latency_{workload.name}_{device.replace(':', '')}_b{batch}.json")
    table.save(out)
    smallest = min(predict_latency(space.smallest(c), table) for c in ("params", "flops"))
    print(
        f"saved {out}: {len(table.entries)} operators on {device} at batch {batch}, "
        f"{table.threads} threads ({table.clock} clock); dense model {table.dense_ms:.3f} ms, "
        f"smallest config predicted {smallest:.3f} ms."
    )
    return 0
