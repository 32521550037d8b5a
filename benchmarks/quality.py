"""Quality on a workload: vitrank's winner vs every baseline after the same fine-tuning.

For each seed and each budget (fractions of the teacher's parameters), one whole search
(`vitrank.search`, its fidelity ladder included: the proxy over every trial, rung 1's short
distillation of `--promote` candidates and every feasible baseline with successive
halving, rung 2's fine-tuning of the best `--finetune-top`) hands out its winner. Then
every pick is fine-tuned the same way, by the search's own rung 2
(`search.finetune_candidate`: the same distillation images, epochs, seed and learning
rate), and measured on the validation split:

- `vitrank winner`: the config the search hands out (rank 1 of its winners; it may be a
  baseline's config, when nothing the search sampled did better);
- `proxy selection`: the best feasible proxy, what the search handed out before the ladder;
- `vitrank best sampled`: the best feasible config the sampler itself proposed;
- every baseline's config at the same budget (one that cannot meet a parameter budget is
  listed as skipped with its reason).

The uncompressed teacher goes through the same fine-tuning too (`teacher_finetuned`): the
noise floor. Where even the dense teacher ends below a baseline, the recipe's own noise
decides that run's comparison; `noise_floor` counts how often the teacher and the winner
meet the bar.

Every pick is compared with the winner by McNemar's exact test before and after the
fine-tuning. Per run the file records the Kendall τ of the proxy and of rung 1 against the
fine-tuned accuracy (over the distinct picks), and the selection times of the proxy alone
and of the whole ladder (the run's rungs.json).

    python benchmarks/quality.py                    # results/quality.json (3 seeds, 0.5 / 0.35)
    python benchmarks/quality.py --quick            # one seed, fewer trials (run_all --quick)
    python benchmarks/quality.py --workload fashion-vit --epochs 1 --train-images 8000 \
        --rung-images 1024                          # results/quality_fashion-vit.json
    python benchmarks/quality.py ... --lr 6.25e-5   # results/quality[_WORKLOAD]_lr6.25e-05.json
    python benchmarks/quality.py --budgets 0.25,0.2 # results/quality_budgets0.25-0.2.json
    python benchmarks/quality.py --merge A/quality.json B/quality.json
                                                    # one file from runs split over processes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS, comma_list, machine_info, write_result
from vitrank.search import SearchSettings

DEFAULT_LR = SearchSettings.__dataclass_fields__["finetune_lr"].default  # the search's
DEFAULT_BUDGETS = "0.5,0.35"
SELECTED = "selection_accuracy_after"  # a pick's top-1 on the selection images, fine-tuned


def search_run(workload: Any, budget: str, out: Path, args: argparse.Namespace, seed: int) -> Path:
    """One whole search with its fidelity ladder: rung 1 over `--promote` candidates and
    every baseline, rung 2 (the same fine-tuning every pick gets here) over the best K."""
    import vitrank

    kind, value = budget_kind(budget)
    return vitrank.search(
        workload=workload,
        out=str(out),
        **{f"budget_{kind}": value if kind == "params" else float(value)},
        engine=args.engine,
        trials=args.trials,
        parametrization=args.parametrization,
        proxy=args.proxy,
        seed=seed,
        promote=args.promote,
        rung_epochs=args.rung_epochs,
        rung_images=args.rung_images,
        finetune_top=args.finetune_top,
        finetune_epochs=args.epochs,
        finetune_images=args.train_images,
        finetune_lr=args.lr,
        compensate=args.compensate,
        report=True,
    )


def budget_kind(budget: str) -> tuple[str, str]:
    """("params", "0.25") for "0.25" (a fraction of the parameters), ("flops", "0.5") for
    "flops:0.5" (a fraction of the FLOPs)."""
    kind, _, value = budget.rpartition(":")
    if kind not in ("", "params", "flops"):
        raise SystemExit(f"budget {budget!r}: give a fraction (params) or flops:FRACTION")
    return kind or "params", value


def _budget_order(budget: str) -> tuple[str, float]:
    kind, value = budget_kind(budget)
    return kind, -float(value)


def picks(run: Path, every: bool = False) -> dict[str, dict[str, Any]]:
    """Trial rows of the winner, the best sampled config and each baseline of a run (and,
    with `every`, of every other feasible config it scored, as `trial N`)."""
    import pandas as pd

    table = pd.read_parquet(run / "trials.parquet")
    feasible = table[table["feasible"]].sort_values(["proxy", "number"])
    chosen: dict[str, dict[str, Any]] = {}
    ranked = sorted(
        (json.loads(p.read_text()) for p in (run / "winners").glob("*/metrics.json")),
        key=lambda m: m.get("rank", 10**6),
    )
    if ranked:  # rank 1: the winner the search hands out
        number = ranked[0]["number"]
        chosen["vitrank winner"] = table[table["number"] == number].iloc[0].to_dict()
    proxy_best = feasible.iloc[0].to_dict() if len(feasible) else None
    if proxy_best is not None:  # what selection by the proxy alone would hand out
        chosen["proxy selection"] = proxy_best
    sampled = feasible[feasible["baseline"].isna()]
    if len(sampled):
        chosen["vitrank best sampled"] = sampled.iloc[0].to_dict()
    for row in feasible.dropna(subset=["baseline"]).to_dict("records"):
        chosen[f"baseline {row['baseline']}"] = row
    if every:
        seen = {row["config"] for row in chosen.values()}
        for row in feasible.to_dict("records"):
            if row["config"] not in seen:
                seen.add(row["config"])
                chosen[f"trial {int(row['number'])}"] = row
    return chosen


def evaluate_picks(
    run: Path, workload: Any, args: argparse.Namespace
) -> tuple[dict[str, Any], float, torch.Tensor | None]:
    """Accuracy before and after the same fine-tuning of every pick (each trial once).

    The fine-tuning is the search's own rung 2 (`search.finetune_candidate`: the run's
    distillation images, seed and epochs, the last epoch kept); the accuracy is top-1 on
    the validation split.
    """
    from vitrank.evaluators import correct_predictions, mcnemar
    from vitrank.search import finetune_candidate
    from vitrank.search._build import build_candidate
    from vitrank.search._problem import problem
    from vitrank.search._selection import _selection, selection_signals
    from vitrank.spaces import CompressionConfig

    current = problem(run)
    done: dict[int, dict[str, Any]] = {}
    out: dict[str, Any] = {}
    hits: dict[int, dict[str, torch.Tensor]] = {}
    for label, row in picks(run, args.every_config).items():
        number = int(row["number"])
        if number not in done:
            config = CompressionConfig.from_json(row["config"])
            model = build_candidate(current, workload, row, args.compensate)
            before_hits = correct_predictions(model, workload.val, progress=False)
            data = _selection(current, workload)
            built = {n: m.value for n, m in selection_signals(model, data, current.device).items()}
            rung1 = _rung1_signals(current, workload, row) if args.every_config else None
            started = time.perf_counter()
            result = finetune_candidate(current, workload, model, args.epochs, progress=False)
            hits[number] = {
                "before": before_hits,
                "after": correct_predictions(model, workload.val, progress=False),
            }
            done[number] = {
                "trial": number,
                # pandas gives NaN where a trial replays no baseline.
                "baseline": row["baseline"] if isinstance(row["baseline"], str) else None,
                "svd": config.svd,
                "compensated": bool(args.compensate),
                "proxy": float(row["proxy"]),
                # every signal on the selection images: as built, after rung 1's short
                # distillation (every config with --every-config, else the promoted ones)
                # and after the fine-tuning
                **{f"built_{n}": v for n, v in built.items()},
                **{f"rung1_{n}": _value(row, f"rung1_{n}", rung1, n) for n in built},
                **{f"after_{n}": v for n, v in result["selection_signals"].items()},
                "selection_se_after": result["selection_se"],
                "params": int(row["params"]),
                "params_fraction": float(row["params"]) / current.space.dense_params,
                "ops": sorted({f"{b.attn.op}/{b.mlp.op}" for b in config.blocks}),
                "accuracy_before": float(before_hits.double().mean()),
                "accuracy_after": float(hits[number]["after"].double().mean()),
                "selection_accuracy_after": result["selection_accuracy"],
                "selection_score_after": result["selection_score"],
                "finetune_s": round(time.perf_counter() - started, 1),
            }
        out[label] = done[number]
        print(
            f"  {label:>28}: params {out[label]['params_fraction']:.3f}, accuracy "
            f"{out[label]['accuracy_before']:.4f} -> {out[label]['accuracy_after']:.4f}",
            flush=True,
        )
    winner = out.get("vitrank winner")
    if winner is not None:
        mine = hits[winner["trial"]]
        for entry in out.values():
            if entry["trial"] == winner["trial"]:
                continue
            theirs = hits[entry["trial"]]
            entry["vs_winner"] = {
                stage: {
                    "winner_only_right": test.a_only,
                    "pick_only_right": test.b_only,
                    "mcnemar_p": test.p_value,
                }
                for stage in ("before", "after")
                for test in [mcnemar(mine[stage], theirs[stage])]
            }
    skipped = run / "baselines" / "_skipped.json"
    if skipped.exists():
        for name, reason in json.loads(skipped.read_text()).items():
            out[f"baseline {name}"] = {"skipped": reason}
    winner_hits = hits[winner["trial"]]["after"] if winner is not None else None
    return out, float(current.space.dense_params), winner_hits


def _rung1_signals(current: Any, workload: Any, row: dict[str, Any]) -> dict[str, float]:
    """Every signal after rung 1's whole short distillation of one config (as the search
    runs it for a promoted candidate)."""
    from vitrank.search._fidelity import RUNG_REPORTS, Candidate

    candidate = Candidate(current, workload, row)
    candidate.run_to(RUNG_REPORTS)
    return dict(candidate.record()["signals"])


def _value(row: dict[str, Any], key: str, measured: dict[str, float] | None, name: str) -> Any:
    """A rung-1 signal: measured here, else the search's own (None where it has none)."""
    if measured is not None:
        return measured[name]
    value = row.get(key)
    return None if value is None or value != value else float(value)


def teacher_reference(
    run: Path,
    workload: Any,
    configs: dict[str, Any],
    winner_hits: torch.Tensor | None,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The uncompressed teacher, fine-tuned exactly as every pick is: the noise floor.

    A copy of the dense teacher (every parameter, a strict superset of any pick's
    capacity) goes through the same `finetune_candidate`. Where it, too, ends below a
    baseline after fine-tuning, the recipe's own noise decides that comparison, not the
    config: the run's picks sit at the fine-tuning's ceiling.
    """
    import copy

    from vitrank.evaluators import correct_predictions, mcnemar
    from vitrank.search import finetune_candidate
    from vitrank.search._problem import problem

    current = problem(run)
    model = copy.deepcopy(current.teacher)
    before = correct_predictions(model, workload.val, progress=False)
    started = time.perf_counter()
    finetune_candidate(current, workload, model, args.epochs, progress=False)
    after = correct_predictions(model, workload.val, progress=False)
    accuracy = float(after.double().mean())
    baselines = baseline_accuracies(configs)
    out: dict[str, Any] = {
        "accuracy_before": float(before.double().mean()),
        "accuracy_after": accuracy,
        "finetune_s": round(time.perf_counter() - started, 1),
        "meets_bar": meets_bar(accuracy, configs),
        "best_baseline_after": max(baselines) if baselines else None,
    }
    if winner_hits is not None:
        test = mcnemar(winner_hits, after)
        out["vs_winner"] = {
            "winner_only_right": test.a_only,
            "teacher_only_right": test.b_only,
            "mcnemar_p": test.p_value,
        }
    print(
        f"  {'teacher (dense), fine-tuned':>28}: accuracy {out['accuracy_before']:.4f} -> "
        f"{accuracy:.4f}; >= every baseline: {out['meets_bar']}",
        flush=True,
    )
    return out


def ladder_figures(run: Path, configs: dict[str, Any]) -> dict[str, Any]:
    """The rungs' Kendall τ against the fine-tuned accuracy over the distinct picks, and the
    selection times (rungs.json) of the ladder beside the proxy alone."""
    from vitrank.evaluators.signals import signal_names
    from vitrank.search._fidelity import rank_agreement

    distinct = {c["trial"]: c for c in configs.values() if "accuracy_after" in c}
    rungs = json.loads((run / "rungs.json").read_text()) if (run / "rungs.json").exists() else {}
    finals = sorted((c["accuracy_after"] for c in distinct.values()), reverse=True)
    winner = configs.get("vitrank winner")
    # Every signal on the selection images as built, after rung 1 and after the
    # fine-tuning, the proxy and the validation accuracy as built (τ-b counts ties).
    signals = [("proxy", "proxy", -1.0), ("accuracy_before", "accuracy_before", 1.0)]
    signals += [
        (f"{stage}_{name}", f"{stage}_{name}", 1.0)
        for stage in ("built", "rung1", "after")
        for name in signal_names()
    ]
    return {
        "kendall_tau_vs_finetuned": rank_agreement(
            list(distinct.values()), final="accuracy_after", signals=signals
        ),
        "configs_finetuned": len(distinct),
        "finetuned_range_points": round(100 * (finals[0] - finals[-1]), 2) if finals else None,
        # 1 + how many distinct configs ended more accurate than the winner
        "winner_place_after": None
        if winner is None
        else 1 + sum(a > winner["accuracy_after"] for a in finals),
        "selection_seconds": rungs.get("seconds"),
        "winner_beats_every_baseline": _beats(configs),
        "winner_beats_every_baseline_built": _beats(configs, "accuracy_before"),
        "lead_over_best_baseline": lead_over_best_baseline(configs),
        "lead_over_best_baseline_built": lead_over_best_baseline(configs, "accuracy_before"),
        "baselines_significantly_better": significantly_better(configs),
        "full_rung2": full_rung2(configs, selection_images(run)),
    }


def significantly_better(configs: dict[str, Any], alpha: float = 0.05) -> list[str] | None:
    """The baselines more accurate than the winner after fine-tuning by McNemar's exact
    test at `alpha` (a figure beside the strict bar, which it does not replace)."""
    if configs.get("vitrank winner") is None:
        return None
    return [
        label
        for label, c in configs.items()
        if label.startswith("baseline ")
        and "vs_winner" in c
        and c["vs_winner"]["after"]["pick_only_right"]
        > c["vs_winner"]["after"]["winner_only_right"]
        and c["vs_winner"]["after"]["mcnemar_p"] < alpha
    ]


def full_rung2(configs: dict[str, Any], images: int) -> dict[str, Any] | None:
    """What the widest rung 2 would hand out: every pick (baselines included) fully
    fine-tuned and ranked as rung 2 ranks its winners (`by_evidence` on the `images`
    selection images: within their noise, the better proxy), and whether that meets the
    bar on the validation split."""
    from vitrank.search._fidelity import by_evidence

    tuned = [
        {**c, "number": c["trial"]}
        for c in {c["trial"]: c for c in configs.values() if "selection_se_after" in c}.values()
    ]
    if not tuned:
        return None
    best = by_evidence(tuned, "selection_score_after", "selection_se_after")[0]
    return {
        "trial": best["trial"],
        "baseline": best["baseline"],
        "selection_accuracy_after": best[SELECTED],
        "selection_images": images,
        "accuracy_after": best["accuracy_after"],
        "meets_bar": meets_bar(best["accuracy_after"], configs),
    }


def selection_images(run: Path) -> int:
    """How many selection images a run's rungs scored on (its trials table records it)."""
    import pandas as pd

    table = pd.read_parquet(run / "trials.parquet")
    if "rung1_images" not in table or table["rung1_images"].isna().all():
        return 0
    return int(table["rung1_images"].max())


def recompute(path: Path) -> None:
    """Re-derive every run's `ladder` figures in a result file (its runs must be kept)."""
    result = json.loads(path.read_text())
    for entry in result["runs"].values():
        entry["ladder"] = ladder_figures(Path(entry["run"]), entry["configs"])
    result["all_met"] = all_met(result["runs"])
    result["noise_floor"] = noise_floor(result["runs"])
    result.setdefault("recomputed", []).append(
        f"python benchmarks/quality.py --recompute {path} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})"
    )
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"rewrote {path}")


def noise_floor(runs: dict[str, Any]) -> dict[str, Any]:
    """Over the runs with a bar (at least one baseline) and the teacher's reference: how
    often the winner, the dense teacher fine-tuned like every pick and the widest rung 2
    meet it, how often no baseline is significantly ahead of the winner, and the best
    baseline's lead over the fine-tuned teacher (in points)."""
    entries = [
        e
        for e in runs.values()
        if e.get("teacher_finetuned") and e["ladder"].get("winner_beats_every_baseline") is not None
    ]
    teachers = [e["teacher_finetuned"] for e in entries]
    return {
        "runs": len(entries),
        "winner_meets_bar": sum(
            e["ladder"]["winner_beats_every_baseline"] is True for e in entries
        ),
        "teacher_meets_bar": sum(t["meets_bar"] is True for t in teachers),
        "full_rung2_meets_bar": sum(
            (e["ladder"].get("full_rung2") or {}).get("meets_bar") is True for e in entries
        ),
        "no_baseline_significantly_better": sum(
            e["ladder"].get("baselines_significantly_better") == [] for e in entries
        ),
        "best_baseline_minus_teacher_points": [
            round(100 * (t["best_baseline_after"] - t["accuracy_after"]), 2) for t in teachers
        ],
    }


def all_met(runs: dict[str, Any]) -> bool:
    """Whether the winner met the bar in every run (a run without a baseline has no bar:
    it does not count as met)."""
    return bool(runs) and all(
        e["ladder"]["winner_beats_every_baseline"] is True for e in runs.values()
    )


def _result_file(path: Path) -> dict[str, Any]:
    """A result file of this script, or a clear exit naming what is wrong with it."""
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise SystemExit(f"cannot read {path}: {error.strerror or error}") from None
    except ValueError as error:
        raise SystemExit(f"{path} is not JSON ({error}); give quality.py's result files") from None
    needed = {"runs", "settings", "workload", "command", "machine", "wall_s"}
    needed |= {"teacher_accuracy", "val_images"}
    if not isinstance(data, dict) or not needed <= set(data):
        raise SystemExit(f"{path} is not a result file of benchmarks/quality.py")
    if not all(
        isinstance(e, dict) and {"budget", "seed", "ladder"} <= set(e)
        for e in data["runs"].values()
    ):
        raise SystemExit(f"{path} holds a run without its budget, seed or figures; rerun it")
    data["settings"].setdefault("every_config", False)  # files from before --every-config
    return data


def merge(parts: list[Path], out_dir: Path) -> Path:
    """One result file from several that ran the same settings on other seeds or budgets
    (say, one process per core), each part's command, machine and times kept."""
    loaded = [_result_file(p) for p in parts]
    first = loaded[0]
    ignored = {"seeds", "budgets", "out_dir", "threads", "keep"}
    for other, path in zip(loaded[1:], parts[1:], strict=True):
        mine = {k: v for k, v in first["settings"].items() if k not in ignored}
        theirs = {k: v for k, v in other["settings"].items() if k not in ignored}
        if other["workload"] != first["workload"] or mine != theirs:
            raise SystemExit(f"{path} ran other settings than {parts[0]}; cannot merge them")
    runs: dict[str, Any] = {}
    for part in loaded:
        overlap = set(runs) & set(part["runs"])
        if overlap:
            raise SystemExit(f"the parts repeat the runs {sorted(overlap)}; cannot merge them")
        runs.update(part["runs"])
    runs = dict(sorted(runs.items()))  # the file's order, which noise_floor's list follows
    seeds = sorted({int(e["seed"]) for e in runs.values()})
    budgets = {str(e["budget"]) for e in runs.values()}
    settings = {
        **first["settings"],  # the same in every part but for these:
        "seeds": ",".join(map(str, seeds)),
        "budgets": ",".join(sorted(budgets, key=_budget_order)),
    }
    result = {
        **{k: first[k] for k in ("workload", "teacher_accuracy", "val_images")},
        "settings": settings,
        "command": " && ".join(part["command"] for part in loaded)
        + " && python benchmarks/quality.py --merge "
        + " ".join(str(p) for p in parts),
        "parts": [
            {"command": part["command"], "machine": part["machine"], "wall_s": part["wall_s"]}
            for part in loaded
        ],
        "machine": first["machine"],
        "wall_s": max(part["wall_s"] for part in loaded),
        "runs": runs,
    }
    result["all_met"] = all_met(runs)
    result["noise_floor"] = noise_floor(runs)
    lr = float(first["settings"].get("lr", DEFAULT_LR))
    every = bool(first["settings"].get("every_config"))
    name = first["settings"].get("name") or result_name(first["workload"], lr, budgets, every)
    return write_result(name, result, out_dir)


def result_name(workload: str, lr: float, budgets: set[str], every: bool = False) -> str:
    """results/quality[_WORKLOAD][_lrLR][_budgetsB1-B2][_every].json: the default settings
    keep the plain name; another learning rate, other budgets or every config are named."""
    name = "quality" if workload == "digits-vit" else f"quality_{workload}"
    if lr != DEFAULT_LR:
        name += f"_lr{lr:g}"
    if budgets != set(DEFAULT_BUDGETS.split(",")):
        name += "_budgets" + "-".join(sorted(budgets, key=_budget_order)).replace(":", "")
    return name + ("_every" if every else "")


def baseline_accuracies(configs: dict[str, Any], key: str = "accuracy_after") -> list[float]:
    """The fine-tuned (or, `key="accuracy_before"`, as built) validation accuracy of every
    baseline a run compared (the bar)."""
    return [c[key] for label, c in configs.items() if label.startswith("baseline ") and key in c]


def meets_bar(accuracy: float, configs: dict[str, Any], key: str = "accuracy_after") -> bool | None:
    """Whether an `accuracy` is at least every baseline's of the run at the same stage (the
    bar); None where the run has no baseline to compare with."""
    baselines = baseline_accuracies(configs, key)
    return all(accuracy >= a for a in baselines) if baselines else None


def _beats(configs: dict[str, Any], key: str = "accuracy_after") -> bool | None:
    """Whether the winner's accuracy is at least every baseline's at the same stage."""
    winner = configs.get("vitrank winner")
    if winner is None:
        return None
    return meets_bar(winner[key], configs, key)


def lead_over_best_baseline(configs: dict[str, Any], key: str = "accuracy_after") -> float | None:
    """The winner's accuracy minus the best baseline's (points of accuracy, as a fraction)."""
    winner, baselines = configs.get("vitrank winner"), baseline_accuracies(configs, key)
    if winner is None or not baselines:
        return None
    return winner[key] - max(baselines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budgets", default=DEFAULT_BUDGETS,
        help="fractions of the params, or flops:FRACTION for a FLOPs budget (comma separated)",
    )  # fmt: skip
    parser.add_argument("--seeds", default="0,1,2", help="one search per seed and budget")
    parser.add_argument("--trials", type=int, default=40, help="search trials per budget")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (<= 10)")
    parser.add_argument("--engine", default="optuna", choices=("optuna", "ray"))
    parser.add_argument("--promote", type=int, default=6, help="rung-1 candidates (+ baselines)")
    parser.add_argument("--rung-epochs", type=float, default=1.0)
    parser.add_argument("--rung-images", type=int, default=None)
    parser.add_argument("--finetune-top", type=int, default=2, help="rung-2 winners (K)")
    parser.add_argument("--parametrization", default="raw", choices=("raw", "budgeted"))
    parser.add_argument("--proxy", default="logits", choices=("logits", "spectral"))
    parser.add_argument("--compensate", action="store_true", help="compensate before tuning")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs here")
    parser.add_argument(
        "--name", default=None, help="the result file's name (default: from the settings)"
    )
    parser.add_argument("--quick", action="store_true", help="one seed, 20 trials, 1 epoch")
    parser.add_argument(
        "--every-config",
        action="store_true",
        help="fine-tune every feasible config a search scored, not only the picks: how well "
        "each rung predicts the fine-tuned order, over the whole run (result file *_every)",
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where quality.json goes")
    parser.add_argument("--workload", default="digits-vit", choices=("digits-vit", "fashion-vit"))
    parser.add_argument(
        "--model",
        default=None,
        help="another teacher for the workload's images (local-dir:PATH, e.g. the second "
        "fashion shape of benchmarks/train_fashion_teacher.py); give --name with it",
    )
    parser.add_argument(
        "--train-images",
        type=int,
        default=None,
        help="distil on this many (seeded) training images per epoch, the same for every pick",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=DEFAULT_LR,
        help="peak learning rate of every distillation (the search's --finetune-lr); a "
        f"value other than its default {DEFAULT_LR:g} names the result file after it",
    )
    parser.add_argument(
        "--recompute",
        type=Path,
        default=None,
        help="re-derive the ladder figures of an existing result file from its runs, and exit",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="merge result files of the same settings on other seeds or budgets, and exit",
    )
    args = parser.parse_args(argv)
    if args.recompute is not None:
        recompute(args.recompute)
        return
    if args.merge is not None:
        print(f"wrote {merge(args.merge, args.out_dir)}")
        return
    if args.model is not None and args.name is None:
        raise SystemExit(
            "--model: give --name too (the result file must not pass for the shipped teacher's)"
        )
    if args.quick:
        args.seeds, args.trials, args.epochs = "0", 20, 1
    if not 1 <= args.epochs <= 10:
        raise SystemExit(f"`1 <= --epochs <= 10` must hold (a short fine-tune), got {args.epochs}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from vitrank.evaluators import evaluate_accuracy

    import vitrank

    started = time.perf_counter()
    root = args.keep or Path(tempfile.mkdtemp(prefix="vitrank-quality-"))
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    seeds = comma_list(args.seeds, int)
    budgets = comma_list(args.budgets, str)
    result: dict[str, Any] = {
        "machine": {**machine_info(args.threads), "load_average_at_start": os.getloadavg()},
        "command": command.strip(),
        "workload": args.workload,
        "settings": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "keep"
        },
        "runs": {},
    }
    for seed in seeds:
        workload = vitrank.load_workload(args.workload, model=args.model, seed=seed)
        result["teacher_accuracy"] = float(
            evaluate_accuracy(workload.model, workload.val, progress=False)
        )
        result["val_images"] = len(workload.val)
        for budget in budgets:
            kind, value = budget_kind(budget)
            print(f"seed {seed}, {value} of the {kind}: {args.trials} trials ...", flush=True)
            t0 = time.perf_counter()
            run = search_run(workload, budget, root / f"seed{seed}-{kind}-{value}", args, seed)
            search_s = time.perf_counter() - t0
            configs, dense, winner_hits = evaluate_picks(run, workload, args)
            teacher = teacher_reference(run, workload, configs, winner_hits, args)
            entry: dict[str, Any] = {
                "seed": seed,
                "budget": budget,
                "run": str(run),
                "search_s": round(search_s, 1),
                "dense_params": dense,
                "ladder": ladder_figures(run, configs),
                "teacher_finetuned": teacher,
                "configs": configs,
            }
            result["runs"][f"seed{seed}/{budget}"] = entry
            print(f"  winner >= every baseline: {entry['ladder']['winner_beats_every_baseline']}")
    result["all_met"] = all_met(result["runs"])
    result["noise_floor"] = noise_floor(result["runs"])
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    name = args.name or result_name(args.workload, args.lr, set(budgets), args.every_config)
    print(f"wrote {write_result(name, result, args.out_dir)}")


if __name__ == "__main__":
    main()
