"""`vitrank space`: a teacher's blocks and what the search may change in them."""

from __future__ import annotations

import argparse
import sys

from ._options import add_ops, add_workload, workload_from_args

HELP = "show a teacher's blocks and shapes (what the search can change)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_workload(p, calib=False)
    add_ops(p)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from vitrank.core.spec import BlockSpec
    from vitrank.core.structure import inspect_vit
    from vitrank.spaces import block_params, build_space

    workload = workload_from_args(args)
    fp = inspect_vit(workload.model, workload.model_name)
    total = sum(p.numel() for p in workload.model.parameters())
    table = Table(title=f"{workload.name}: {fp.architecture}")
    for column in ("block", "dim", "heads", "head dim", "mlp hidden", "biases", "qk norm"):
        table.add_column(column, justify="left" if column in ("block", "biases") else "right")
    table.add_column("params", justify="right")
    for b in fp.blocks:
        biases = "".join(
            flag if on else "-"
            for flag, on in zip(
                "qpfF", (b.qkv_bias, b.proj_bias, b.fc1_bias, b.fc2_bias), strict=True
            )
        )
        table.add_row(
            b.name,
            str(b.dim),
            str(b.num_heads),
            str(b.head_dim),
            str(b.mlp_hidden),
            biases,
            "yes" if b.qk_norm else "no",
            f"{block_params(b, BlockSpec()):,}",
        )
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table)
    console.print(
        f"tokens {fp.num_tokens} ({fp.num_prefix_tokens} prefix), classes {fp.num_classes}, "
        f"input {tuple(workload.input_size)}, params {total:,} "
        f"({fp.other_params:,} outside the blocks)"
    )
    console.print("biases: q = qkv, p = proj, f = fc1, F = fc2 (- = none)")
    space = build_space(
        workload.model,
        ops=args.ops or None,
        granularity=args.granularity or 8,
        model_name=workload.model_name,
        model_args=dict(workload.model_args),
    )
    console.print(space.describe(), soft_wrap=True, highlight=False, markup=False)
    return 0
