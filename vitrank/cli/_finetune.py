"""`vitrank finetune`: more winners of a finished search, fine-tuned by distillation."""

from __future__ import annotations

import argparse
import sys

HELP = "fine-tune more winners of a finished search by distillation"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN_DIR", help="a finished search's directory")
    p.add_argument("--top", type=int, default=None, metavar="K", help="winners to fine-tune")
    p.add_argument("--epochs", type=int, default=None, metavar="E")
    p.add_argument("--device", default=None, metavar="D")


def run(args: argparse.Namespace) -> int:
    from vitrank import reports
    from vitrank.search import finetune_winners

    directories = finetune_winners(
        args.run,
        top=args.top,
        epochs=args.epochs,
        device=args.device,
        log=lambda message: print(message, file=sys.stderr),
    )
    paths = reports.build(args.run)
    where = directories[0].parent if directories else args.run
    print(f"fine-tuned the top {len(directories)} winner(s) in {where}; report: {paths.html}")
    return 0
