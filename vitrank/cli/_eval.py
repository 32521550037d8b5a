"""`vitrank eval`: a saved compressed model beside its teacher."""

from __future__ import annotations

import argparse
import sys

from ._options import (
    add_device,
    add_workload,
    saved_model_dir,
    use_recorded_workload,
    workload_from_args,
)

HELP = "accuracy, parameters, FLOPs and latency of a saved compressed model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="DIR", help="a saved compressed model")
    add_workload(p, calib=False)
    add_device(p, "batch size for accuracy and latency (default: 1 for latency)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    import json

    import timm
    from rich.console import Console
    from rich.table import Table
    from timm.data.model_config import resolve_input_data_config

    from vitrank.core.model import CONFIG_ATTRIBUTE, load
    from vitrank.evaluators import compare_with_teacher

    directory = saved_model_dir(args.model_dir)
    model = load(directory)
    config = getattr(model, CONFIG_ATTRIBUTE)
    from vitrank.core.device import resolve_device

    device, batch = str(resolve_device(args.device)), args.batch
    workload = workload_from_args(args) if use_recorded_workload(args, config, directory) else None
    # Latency does not depend on the weights: without a workload, time the bare architecture.
    teacher = workload.model if workload else timm.create_model(config.model, **config.model_args)
    input_size = tuple(resolve_input_data_config(model)["input_size"])
    measured = compare_with_teacher(
        model,
        teacher,
        config,
        input_size,
        workload.val if workload else None,
        device=device,
        batch=batch,
    )
    result = {
        "model_dir": str(directory),
        "model": config.model,
        "workload": workload.name if workload else None,
        **measured,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    table = Table(title=f"{directory} ({config.model}, {result['workload'] or 'no data given'})")
    for column in ("", "compressed", "teacher", "ratio"):
        table.add_column(column, justify="left" if not column else "right")
    for key, label, form in (
        ("accuracy", "accuracy", "{:.2%}"),
        ("params", "parameters", "{:,}"),
        ("flops", "FLOPs (batch 1)", "{:,}"),
        ("latency_ms", f"latency ms (batch {batch or 1}, {device})", "{:.3f}"),
    ):
        mine, theirs = result.get(key), result["teacher"].get(key)
        if mine is None or theirs is None:
            continue
        ratio = f"{mine / theirs:.2f}" if theirs else "-"
        table.add_row(label, form.format(mine), form.format(theirs), ratio)
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table)
    note = "" if workload else "; give --workload/--model/--data to measure accuracy"
    console.print(f"speed-up {result['speedup']:.2f}x{note}")
    return 0
