"""Search quality (and engine overhead) on a workload -> results/search_quality*.json.

1. At budgets 0.5 and 0.35 of the parameters: the validation accuracy (no fine-tuning,
   no compensation) of the best searched config (lowest proxy among feasible non-baseline
   trials) against every baseline's config at the same budget, with McNemar's exact test
   of the searched config against each baseline on the validation images (the images on
   which exactly one of the two is right, and the two-sided p-value).
2. On digits-vit: the wall time of the same 200-trial search with the ray engine over the
   optuna engine (both start from the same prepared cache, so calibration and
   factorization are not counted; baselines are computed in both).

    python benchmarks/search_quality.py [--workload digits-vit|fashion-vit] [--trials 200]
        [--seeds 0,1,2] [--refine 0.5]

digits-vit writes results/search_quality.json, fashion-vit results/search_quality_fashion-vit.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import command_line, machine_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def results_path(workload: str) -> Path:
    name = "search_quality" if workload == "digits-vit" else f"search_quality_{workload}"
    return RESULTS / f"{name}.json"


def _settings(out: Path, budget: str, engine: str, seed: int, args: argparse.Namespace) -> Any:
    from vitrank.search import SearchSettings

    optional = {"parametrization": args.parametrization, "refine": args.refine}
    return SearchSettings(
        out=str(out),
        budget_params=budget,
        engine=engine,
        trials=args.trials,
        proxy=args.proxy,
        seed=seed,
        finetune_top=0,
        finetune_epochs=0,
        compensate=False,
        **{k: v for k, v in optional.items() if v is not None},
    )


def _accuracies(run: Path, workload: Any) -> dict[str, Any]:
    """Validation accuracy of every baseline and of the best searched config of a run."""
    import pandas as pd
    from vitrank.evaluators import correct_predictions, mcnemar
    from vitrank.search._problem import problem
    from vitrank.spaces import CompressionConfig

    import vitrank

    current = problem(run)
    table = pd.read_parquet(run / "trials.parquet")
    feasible = table[table["feasible"]]
    searched = feasible[feasible["baseline"].isna()].sort_values("proxy")
    picks = {
        f"baseline:{r['baseline']}": r
        for r in feasible.dropna(subset=["baseline"]).to_dict("records")
    }
    if len(searched):
        picks["searched"] = searched.iloc[0].to_dict()
    out: dict[str, Any] = {}
    hits: dict[str, torch.Tensor] = {}
    for label, row in picks.items():
        config = CompressionConfig.from_json(row["config"])
        model = vitrank.compress(
            current.teacher, config, current.stats, current.factor_cache(config.svd)
        )
        hits[label] = correct_predictions(
            model, workload.val, device=current.device, progress=False
        )
        out[label] = {
            "trial": int(row["number"]),
            "val_accuracy": float(hits[label].double().mean()),
            "proxy": float(row["proxy"]),
            "params": int(row["params"]),
            "params_fraction": float(row["params"]) / current.space.dense_params,
        }
    if "searched" in hits:
        for label in hits:
            if label.startswith("baseline:"):
                # a_only: images only the searched config gets right; b_only: only the baseline
                test = mcnemar(hits["searched"], hits[label])
                out[label]["vs_searched"] = {
                    "searched_only_right": test.a_only,
                    "baseline_only_right": test.b_only,
                    "disagreements": test.disagreements,
                    "mcnemar_p": test.p_value,
                }
    skipped = run / "baselines" / "_skipped.json"
    if skipped.exists():
        for name, reason in json.loads(skipped.read_text()).items():
            out[f"baseline:{name}"] = {"skipped": reason}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--budgets", default="0.5,0.35")
    parser.add_argument(
        "--seeds",
        default="0",
        help="comma separated; the first seed's run is the detailed one and the engines' "
        "timing, the others add one searched-vs-baselines line each",
    )
    parser.add_argument("--parametrization", default=None, help="default: the search's (raw)")
    parser.add_argument("--refine", type=float, default=None, help="default: the search's")
    parser.add_argument("--proxy", default="logits")
    parser.add_argument("--keep", default=None, help="keep the run directories here")
    parser.add_argument("--workload", default="digits-vit", choices=("digits-vit", "fashion-vit"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--engine-timing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the ray engine against optuna (default: on digits-vit only)",
    )
    args = parser.parse_args()
    if args.engine_timing is None:
        args.engine_timing = args.workload == "digits-vit"
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from vitrank.evaluators import evaluate_accuracy
    from vitrank.search import run_search
    from vitrank.search._problem import prepare
    from vitrank.search._rundir import RunDir, atomic_write_json, atomic_write_text

    from vitrank import load_workload

    root = Path(args.keep or tempfile.mkdtemp(prefix="vitrank-bench-"))
    budgets = [b.strip() for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]

    def prepared(seed: int, workload: Any) -> RunDir:
        """One prepared cache (calibration, factors, held-out batch) per seed, for every run."""
        base = RunDir(root / f"prepared-s{seed}")
        base.root.mkdir(parents=True, exist_ok=True)
        settings = _settings(base.root, budgets[0], "optuna", seed, args)
        atomic_write_text(base.settings, settings.to_yaml())
        prepare(base, settings, workload, log=print)
        return base

    def run(name: str, budget: str, engine: str, seed: int, workload: Any) -> tuple[Path, float]:
        out = root / name
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(prepared(seed, workload).cache, out / "cache")
        start = time.perf_counter()
        run_search(_settings(out, budget, engine, seed, args), workload)
        return out, time.perf_counter() - start

    workloads = {seed: load_workload(args.workload, seed=seed) for seed in seeds}
    first = workloads[seeds[0]]
    defaults = _settings(root, budgets[0], "optuna", seeds[0], args)
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine_info(), "load_average": os.getloadavg()},
        "workload": args.workload,
        "val_images": len(first.val),
        "teacher_val_accuracy": float(evaluate_accuracy(first.model, first.val, progress=False)),
        "settings": {
            "trials": args.trials,
            "parametrization": defaults.parametrization,
            "refine": defaults.refine if defaults.parametrization == "raw" else 0.0,
            "proxy": args.proxy,
            "seeds": seeds,
            "fine_tuning": "none",
        },
        "budgets": {},
    }
    timings: dict[str, float] = {}
    for budget in budgets:
        entry: dict[str, Any] = {"seeds": {}}
        for seed in seeds:
            path, seconds = run(f"optuna-{budget}-s{seed}", budget, "optuna", seed, workloads[seed])
            if seed == seeds[0]:
                timings.setdefault("optuna_s", seconds)
            scores = _accuracies(path, workloads[seed])
            verdict = _verdict(scores)
            entry["seeds"][str(seed)] = verdict
            if seed == seeds[0]:
                entry.update(configs=scores, **{k: verdict[k] for k in VERDICT_KEYS})
            print(json.dumps({budget: {seed: verdict}}, indent=1))
        result["budgets"][budget] = entry
    if args.engine_timing:
        _, ray_seconds = run(f"ray-{budgets[0]}", budgets[0], "ray", seeds[0], first)
        timings["ray_s"] = ray_seconds
        result["engines"] = {
            "budget": budgets[0],
            "trials": args.trials,
            **timings,
            "ray_over_optuna": timings["ray_s"] / timings["optuna_s"],
            "target": "<= 1.5",
        }
        print(json.dumps(result["engines"], indent=1))
    result["command"] = command_line()
    path = results_path(args.workload)
    atomic_write_json(path, result)
    print(f"wrote {path}")


VERDICT_KEYS = ("searched_beats_every_baseline", "searched_at_least_every_baseline")


def _verdict(scores: dict[str, Any]) -> dict[str, Any]:
    """The searched config's accuracy against the best baseline's, and the two checks."""
    searched = scores.get("searched", {}).get("val_accuracy", float("nan"))
    baselines = {
        k: v["val_accuracy"]
        for k, v in scores.items()
        if k.startswith("baseline:") and "val_accuracy" in v
    }
    best = max(baselines, key=baselines.__getitem__) if baselines else None
    verdict = {
        "searched_val_accuracy": searched,
        "best_baseline": best,
        "best_baseline_val_accuracy": baselines[best] if best else float("nan"),
        "searched_beats_every_baseline": all(searched > v for v in baselines.values()),
        "searched_at_least_every_baseline": all(searched >= v for v in baselines.values()),
    }
    if best is not None and "vs_searched" in scores[best]:
        # against the strongest baseline: how many images decide it, and how surely
        verdict["vs_best_baseline"] = scores[best]["vs_searched"]
        verdict["largest_p_against_any_baseline"] = max(
            v["vs_searched"]["mcnemar_p"] for v in scores.values() if "vs_searched" in v
        )
    return verdict


if __name__ == "__main__":
    main()
