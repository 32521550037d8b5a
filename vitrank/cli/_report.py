"""`vitrank report`: report.html, summary.md and trials tables for runs."""

from __future__ import annotations

import argparse

HELP = "write report.html, summary.md and trials tables for one or more runs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="one run, or several to compare")
    p.add_argument(
        "--out", default=None, metavar="DIR", help="where to write (default: the run directory)"
    )


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vitrank import reports

    if len(args.runs) == 1:
        paths = reports.build(args.runs[0], out=args.out)
    else:
        names = "-vs-".join(Path(run).name for run in args.runs)
        out = Path(args.out) if args.out else Path(args.runs[0]).parent / f"compare-{names}"
        paths = reports.compare(args.runs, out)
    print(f"wrote {paths.html}\n      {paths.summary}\n      {paths.csv}")
    return 0
