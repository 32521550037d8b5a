"""`vitrank search`: the Pareto search under a budget (the main job)."""

from __future__ import annotations

import argparse
from typing import Any

from ._options import RegistryChoices, add_device, add_ops, add_workload

HELP = "search the Pareto front of compressed models under a budget (the main job)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_workload(p)
    p.add_argument("--config", default=None, metavar="YAML", help="settings file (run.yaml)")
    budget = p.add_argument_group("budget (default: --budget-params 0.5)")
    budget.add_argument(
        "--budget-params",
        default=None,
        metavar="P",
        help="parameters kept: a fraction of the teacher's, 0 < P < 1 (0.5), or a whole "
        "count below the teacher's (11M, 11000)",
    )
    budget.add_argument(
        "--budget-latency", type=float, default=None, metavar="MS", help="latency in ms"
    )
    budget.add_argument(
        "--budget-flops",
        type=float,
        default=None,
        metavar="F",
        help="FLOPs kept: a fraction of the teacher's, 0 < F < 1 (0.4)",
    )
    add_device(budget, "batch size the latency budget is measured at (default: 1)")
    budget.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16", "float16"),
        help="dtype of the forward passes of proxies, winners and latency (statistics and "
        "factorization stay fp64; default: float32)",
    )
    p.add_argument(
        "--objectives",
        default=None,
        help="comma separated objectives (default: proxy,params; proxy,latency with a "
        "latency budget)",
    )
    add_ops(p)
    p.add_argument(
        "--proxy",
        choices=RegistryChoices("vitrank.evaluators.proxies", "PROXIES"),
        default=None,
        metavar="NAME",
        help="%(choices)s (default: logits)",
    )
    p.add_argument(
        "--parametrization",
        choices=RegistryChoices("vitrank.spaces", "PARAMETRIZATIONS"),
        default=None,
        metavar="NAME",
        help="%(choices)s (default: raw)",
    )
    p.add_argument("--svd", choices=("whitened", "plain"), default=None, help="default: whitened")
    p.add_argument(
        "--heldout-size",
        type=int,
        default=None,
        metavar="N",
        help="held-out training images the proxy scores on (default: 256, fewer for large "
        "models on a CPU)",
    )
    p.add_argument(
        "--baseline-seconds",
        type=float,
        default=None,
        metavar="S",
        help="leave out baselines expected to take longer than S seconds (default: 120 on a "
        "CPU, no limit on a GPU; 0: run every baseline)",
    )
    p.add_argument("--trials", type=int, default=None, metavar="N", help="default: 40")
    p.add_argument(
        "--sampler",
        default=None,
        help="tpe, nsga2, gp, random or baseline:NAME (default: tpe)",
    )
    p.add_argument(
        "--refine",
        type=float,
        default=None,
        metavar="F",
        help="fraction of the trials that refine the best feasible trials by local moves "
        "(raw parametrization; default: 0.75, 0 turns it off)",
    )
    p.add_argument("--seed", type=int, default=None, help="default: 0")
    p.add_argument(
        "--engine",
        choices=RegistryChoices("vitrank.search", "ENGINES"),
        default=None,
        metavar="NAME",
        help="%(choices)s (default: ray)",
    )
    p.add_argument(
        "--ray-address", default=None, metavar="ADDR", help="join an existing Ray cluster"
    )
    p.add_argument("--cpus-per-trial", type=float, default=None, metavar="N")
    p.add_argument("--gpus-per-trial", type=float, default=None, metavar="N")
    p.add_argument(
        "--promote",
        type=int,
        default=None,
        metavar="N",
        help="rung 1: candidates (plus every feasible baseline) given a short distillation, "
        "the weaker halved away (default: 6; 0 ranks by the proxy alone)",
    )
    p.add_argument(
        "--rung-epochs",
        type=float,
        default=None,
        metavar="E",
        help="rung 1: epochs of the short distillation (default: 1)",
    )
    p.add_argument(
        "--rung-images",
        type=int,
        default=None,
        metavar="N",
        help="rung 1: distil on a seeded subset of N training images per epoch (default: 2048, fewer for DeiT-sized models on a CPU)",
    )
    p.add_argument(
        "--finetune-top",
        type=int,
        default=None,
        metavar="K",
        help="rung 2: the best K of rung 1 fine-tuned in full; the best of them wins",
    )
    p.add_argument("--finetune-epochs", type=int, default=None, metavar="E")
    p.add_argument(
        "--finetune-images",
        type=int,
        default=None,
        metavar="N",
        help="rung 2: distil on a seeded subset of N training images per epoch (default: all)",
    )
    p.add_argument(
        "--finetune-lr",
        type=float,
        default=None,
        metavar="LR",
        help="peak AdamW learning rate of rungs 1 and 2 (default 5e-4; warm-up, then cosine)",
    )
    p.add_argument(
        "--finetune-alpha",
        type=float,
        default=None,
        metavar="A",
        help="weight of the teacher's soft targets in rungs 1 and 2; the rest is "
        "cross-entropy with the labels (default 0.7; 1: the teacher only)",
    )
    p.add_argument("--out", default=None, metavar="DIR", help="run directory (default: runs/…)")
    p.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue the search in --out where it stopped",
    )


def _rank(directory: Any) -> int:
    """A winner's rank in its metrics.json (1 is the winner); unranked ones last."""
    import json

    try:
        return int(json.loads((directory / "metrics.json").read_text()).get("rank", 10**6))
    except (OSError, ValueError, AttributeError):
        return 10**6


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vitrank.api import search
    from vitrank.search import SearchSettings

    known = set(SearchSettings.__dataclass_fields__)
    given = {k: v for k, v in vars(args).items() if k in known and v is not None}
    run_dir = Path(search(args.config, **given))
    winners = sorted(p for p in (run_dir / "winners").glob("*") if p.is_dir())
    winners.sort(key=lambda p: _rank(p))
    print(f"run: {run_dir}")
    if (run_dir / "report.html").exists():
        print(f"report: {run_dir / 'report.html'}")
    for winner in winners:
        print(f"winner: {winner}")
    return 0
