"""Training-free at the knee: the search's winner against every baseline, built alike.

    python benchmarks/training_free.py [--budget 85642] [--seeds 0,1,2] [--shrinkage 0.8,0]
        [--model local-dir:PATH] [--name N]

One `vitrank search` per seed and shrinkage on the fashion workload (its teacher, or
`--model`), with the run's defaults except `--finetune-top 0`: the winner is handed out
compensated, never fine-tuned. The run itself measures every feasible baseline on the
validation split (the 10,000 test images) three ways -- uncompensated, compensated as the
winner is, and against the winner by McNemar's exact test -- and this script collects
them from each run's pareto.json. The default budget is the size FLAR-SVD's released code
reaches at its target 0.25 on the shipped teacher (85,642 parameters, 18.8 %).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import comma_list, machine_info, write_result


def one_run(args: argparse.Namespace, seed: int, shrinkage: float, out: Path) -> dict[str, Any]:
    import vitrank

    began = time.perf_counter()
    run = vitrank.search(
        workload="fashion-vit",
        model=args.model,
        budget_params=args.budget,
        seed=seed,
        shrinkage=shrinkage,
        finetune_top=0,
        trials=args.trials,
        out=str(out),
        report=False,
    )
    seconds = time.perf_counter() - began
    pareto = json.loads((Path(run) / "pareto.json").read_text())
    winner = pareto.get("winner_accuracy") or {}
    baselines = {
        e["baseline"]: {
            "params": e["params"],
            "uncompensated": e["accuracy_built"],
            "compensated": e.get("accuracy_compensated"),
            "p_vs_winner_uncompensated": e["vs_winner_built"]["mcnemar_p"],
            "p_vs_winner_compensated": (e.get("vs_winner_compensated") or {}).get("mcnemar_p"),
            "winner_only_right_compensated": (e.get("vs_winner_compensated") or {}).get(
                "winner_only_right"
            ),
            "baseline_only_right_compensated": (e.get("vs_winner_compensated") or {}).get(
                "baseline_only_right"
            ),
        }
        for e in pareto.get("baselines") or []
    }
    compensated = [b["compensated"] for b in baselines.values() if b["compensated"] is not None]
    uncompensated = [b["uncompensated"] for b in baselines.values()]
    return {
        "seed": seed,
        "shrinkage": shrinkage,
        "seconds": round(seconds, 1),
        "winner": {
            "trial": winner.get("number"),
            "params": next(
                (
                    m["params"]
                    for m in map(
                        json.loads, map(Path.read_text, Path(run).glob("winners/*/metrics.json"))
                    )
                    if m.get("rank") == 1
                ),
                None,
            ),
            "compensated": winner.get("compensated", winner.get("handed_out")),
            "uncompensated": winner.get("built"),
        },
        "baselines": baselines,
        "winner_beats_every_baseline_compensated": bool(compensated)
        and winner.get("compensated", -1) >= max(compensated),
        "winner_beats_every_baseline_uncompensated": bool(uncompensated)
        and winner.get("built", -1) >= max(uncompensated),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="85642", help="params: a count or a fraction")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--shrinkage", default=None, help="comma list (default: the default)")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--model", default=None, help="another teacher for the fashion workload")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="training_free_fashion-vit")
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from vitrank.core.config import DEFAULT_SHRINKAGE

    shrinkages = comma_list(args.shrinkage, float) if args.shrinkage else [DEFAULT_SHRINKAGE]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for shrinkage in shrinkages:
            for seed in comma_list(args.seeds, int):
                out = Path(args.keep or tmp) / f"shrinkage{shrinkage}-seed{seed}"
                runs.append(one_run(args, seed, shrinkage, out))
                last = runs[-1]
                print(
                    f"shrinkage {shrinkage} seed {seed}: winner {last['winner']['compensated']:.4f}"
                    f" compensated, best baseline compensated "
                    f"{max((b['compensated'] or 0) for b in last['baselines'].values()):.4f} "
                    f"({last['seconds']:.0f} s)",
                    flush=True,
                )
    summary = {}
    for shrinkage in shrinkages:
        these = [r for r in runs if r["shrinkage"] == shrinkage]
        names = sorted({n for r in these for n in r["baselines"]})
        summary[str(shrinkage)] = {
            "winner_compensated_mean": statistics.mean(r["winner"]["compensated"] for r in these),
            "winner_uncompensated_mean": statistics.mean(
                r["winner"]["uncompensated"] for r in these
            ),
            "baselines_compensated_mean": {
                n: statistics.mean(
                    r["baselines"][n]["compensated"] for r in these if n in r["baselines"]
                )
                for n in names
            },
            "winner_beats_every_baseline_compensated": sum(
                r["winner_beats_every_baseline_compensated"] for r in these
            ),
            "runs": len(these),
        }
    write_result(
        args.name,
        {
            "machine": machine_info(args.threads),
            "budget": args.budget,
            "model": args.model or "fashion-vit",
            "summary": summary,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
