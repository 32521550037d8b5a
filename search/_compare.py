"""What the search bought, in the user's own run: every feasible baseline against the winner.

Each feasible baseline's config is built from the run's factors as every trial is (before
any error compensation: the configs themselves compared, as the proxy compares them) and
measured on the validation split; McNemar's exact test compares it image by image with the
winner's config built the same way. When the run compensates, each one is also built with
the winner's error compensation and compared with the winner compensated alike, so the
search's own lead (the config) and the compensation's show apart. With
`finetune_baselines`, each compensated baseline is then fine-tuned exactly as the winner was
(rung 2: the same images, seed, epochs and epoch rule) and compared with the winner as
handed out. The figures go into `pareto.json` under ``baselines`` (the report and
summary.md read them there).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from vitrank.search._rundir import atomic_write_json

if TYPE_CHECKING:
    from torch import Tensor
    from vitrank.search._problem import Problem
    from vitrank.workloads import Workload


def _winner(problem: Problem) -> dict[str, Any] | None:
    """metrics.json of the winner the search hands out (rank 1), or None."""
    ranked = []
    for path in problem.run.winners.glob("*/metrics.json"):
        try:
            ranked.append(json.loads(path.read_text()) | {"_dir": str(path.parent)})
        except ValueError:
            continue
    ranked = [m for m in ranked if m.get("rank") is not None]
    return min(ranked, key=lambda m: int(m["rank"])) if ranked else None


def _versus(winner: Tensor, baseline: Tensor) -> dict[str, Any]:
    from vitrank.evaluators import mcnemar

    test = mcnemar(winner, baseline)
    return {
        "winner_only_right": test.a_only,
        "baseline_only_right": test.b_only,
        "mcnemar_p": test.p_value,
    }


def compare_baselines(
    problem: Problem,
    workload: Workload,
    rows: list[dict[str, Any]],
    *,
    finetune: bool,
    epochs: int,
    log: Any = print,
) -> list[dict[str, Any]]:
    """Every feasible baseline's validation accuracy beside the winner's (see the module
    docstring); written into pareto.json, and returned."""
    from vitrank.core.model import load
    from vitrank.core.progress import progress
    from vitrank.evaluators import correct_predictions
    from vitrank.search._build import build_candidate
    from vitrank.search._winners import finetune_candidate

    pareto = json.loads(problem.run.pareto.read_text())
    winner = _winner(problem)
    baselines: dict[str, dict[str, Any]] = {}
    for row in rows:  # one per config: a sampled repeat of a baseline counts once
        if row["baseline"] and row["feasible"] and row["baseline"] not in baselines:
            baselines[row["baseline"]] = row
    if winner is None or not baselines:
        pareto["baselines"] = []
        atomic_write_json(problem.run.pareto, pareto)
        return []
    device, compensate = problem.device, problem.settings.compensates
    tuned = finetune and epochs > 0
    key = {
        "winner": winner["number"],
        "compensated": compensate,
        "finetuned": tuned,
        "epochs": epochs if tuned else 0,
    }
    done = {e["baseline"]: e for e in pareto.get("baselines") or [] if e.get("key") == key}
    by_number = {int(r["number"]): r for r in rows}
    what = "as built" + (", compensated" if compensate else "") + (", fine-tuned" if tuned else "")
    log(f"baselines: {len(baselines)} measured on the validation split {what} against the winner")
    with progress("baselines against the winner", len(baselines) + 1) as advance:
        winner_row = by_number[int(winner["number"])]
        winner_built = correct_predictions(
            build_candidate(problem, workload, winner_row, False),
            workload.val, device=device, progress=False,
        )  # fmt: skip
        winner_compensated = None
        if compensate:
            winner_compensated = correct_predictions(
                build_candidate(problem, workload, winner_row, True),
                workload.val, device=device, progress=False,
            )  # fmt: skip
        handed_out = correct_predictions(
            load(winner["_dir"]).to(device), workload.val, device=device, progress=False
        )
        advance()
        out = []
        for name, row in baselines.items():
            if name in done:
                out.append(done[name])
                advance()
                continue
            model = build_candidate(problem, workload, row, False)
            built = correct_predictions(model, workload.val, device=device, progress=False)
            entry: dict[str, Any] = {
                "baseline": name,
                "trial": int(row["number"]),
                "params": row["params"],
                "flops": row["flops"],
                "cost": row["cost"],
                "proxy": row["proxy"],
                "accuracy_built": float(built.double().mean()),
                "vs_winner_built": _versus(winner_built, built),
                "key": key,
            }
            if winner_compensated is not None:
                model = build_candidate(problem, workload, row, True)
                compensated = correct_predictions(
                    model, workload.val, device=device, progress=False
                )
                entry["accuracy_compensated"] = float(compensated.double().mean())
                entry["vs_winner_compensated"] = _versus(winner_compensated, compensated)
            if tuned:
                finetune_candidate(problem, workload, model, epochs, progress=False)
                after = correct_predictions(model, workload.val, device=device, progress=False)
                entry["accuracy_finetuned"] = float(after.double().mean())
                entry["vs_winner_finetuned"] = _versus(handed_out, after)
            out.append(entry)
            # Kept as each is done: a stopped run resumes with the rest.
            pareto["baselines"] = out
            atomic_write_json(problem.run.pareto, pareto)
            advance()
    pareto["winner_accuracy"] = {
        "number": int(winner["number"]),
        "built": float(winner_built.double().mean()),
        "handed_out": float(handed_out.double().mean()),
    }
    if winner_compensated is not None:
        pareto["winner_accuracy"]["compensated"] = float(winner_compensated.double().mean())
    pareto["baselines"] = out
    atomic_write_json(problem.run.pareto, pareto)
    return out
