"""The trials table and the Pareto set, both derived from the Optuna study (the one truth).

`trials.parquet` is rebuilt from the study whenever it is written, so the table and the
study always agree, also after a killed search resumes.
"""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING, Any

from vitrank.evaluators.signals import signal_names
from vitrank.search._engines import INTERRUPTED_ATTR, METRICS_ATTR, VIOLATION_ATTR
from vitrank.search._pareto import pareto_front
from vitrank.search._rundir import RunDir, atomic_write_bytes, atomic_write_json

# The fidelity ladder's results (search._fidelity) are study user attrs, one per trial
# ("rung1:0017"): Optuna refuses to change a finished trial's attributes.
RUNG1_ATTR = "rung1"
RUNG2_ATTR = "rung2"


def rung_key(rung: str, number: int) -> str:
    return f"{rung}:{number:04d}"


def rung_records(study_attrs: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """{(rung, trial number): record} from a study's user attrs."""
    out = {}
    for key, value in study_attrs.items():
        rung, _, number = key.partition(":")
        if rung in (RUNG1_ATTR, RUNG2_ATTR) and number.isdigit() and isinstance(value, dict):
            out[(rung, int(number))] = value
    return out


if TYPE_CHECKING:
    import optuna
    import pandas as pd


def trial_rows(
    trials: list[optuna.trial.FrozenTrial], cost: str, study_attrs: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """One flat row per trial (every state), numbers ascending; `study_attrs` (the study's
    user attrs) add each trial's rung results."""
    rungs = rung_records(study_attrs or {})
    from vitrank.spaces import CONFIG_ATTR

    rows = []
    for t in sorted(trials, key=lambda t: t.number):
        attrs = t.user_attrs
        costs = attrs.get("costs") or {}
        metrics = attrs.get(METRICS_ATTR) or {}
        violation = attrs.get(VIOLATION_ATTR)
        complete = t.state.name == "COMPLETE"
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "proxy": float(metrics["proxy"]) if "proxy" in metrics else float("nan"),
            "params": costs.get("params", float("nan")),
            "flops": costs.get("flops", float("nan")),
            "latency_ms": costs.get("latency_ms", float("nan")),
            "cost": costs.get(cost, float("nan")),
            "violation": float("nan") if violation is None else float(violation),
            "feasible": bool(complete and violation is not None and violation <= 0),
            "baseline": attrs.get("baseline") or None,
            "interrupted": bool(attrs.get(INTERRUPTED_ATTR, False)),
            "config": attrs.get(CONFIG_ATTR),
            "sampled": json.dumps(t.params, sort_keys=True),
            "datetime_start": t.datetime_start,
            "datetime_complete": t.datetime_complete,
            "duration_s": t.duration.total_seconds() if t.duration else float("nan"),
        }
        for key, value in metrics.items():
            if key not in ("proxy", "params", "flops", "latency_ms"):
                row[f"proxy.{key}"] = float(value)
        # The fidelity ladder (search._fidelity): None where a trial did not get that far.
        rung1 = rungs.get((RUNG1_ATTR, t.number), {})
        rung2 = rungs.get((RUNG2_ATTR, t.number), {})
        row["rung1_signal"] = rung1.get("signal")
        row["rung1_score"] = rung1.get("score")
        row["rung1_se"] = rung1.get("se")
        row["rung1_accuracy"] = rung1.get("accuracy")
        row["rung1_units"] = rung1.get("units")
        row["rung1_images"] = rung1.get("images")
        row["rung1_curve"] = rung1.get("curve")
        row["rung1_initial"] = rung1.get("initial")
        row["rung2_selection_score"] = rung2.get("selection_score")
        row["rung2_selection_accuracy"] = rung2.get("selection_accuracy")
        # Every registered signal, rung 1's at its best milestone and rung 2's after it.
        for name in signal_names():
            row[f"rung1_{name}"] = (rung1.get("signals") or {}).get(name)
            row[f"rung2_{name}"] = (rung2.get("signals") or {}).get(name)
        row["final_accuracy"] = rung2.get("accuracy")
        rows.append(row)
    return rows


def trials_frame(
    trials: list[optuna.trial.FrozenTrial], cost: str, study_attrs: dict[str, Any] | None = None
) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(trial_rows(trials, cost, study_attrs))


def write_trials(run: RunDir, study: optuna.Study, cost: str) -> list[dict[str, Any]]:
    """Rebuild trials.parquet from the study (atomic); its rows."""
    import pandas as pd

    rows = trial_rows(study.get_trials(deepcopy=False), cost, study.user_attrs)
    buffer = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buffer, index=False)
    atomic_write_bytes(run.trials, buffer.getvalue())
    return rows


def front_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The feasible, complete rows on the (proxy, cost) Pareto front, by rising cost."""
    feasible = [r for r in rows if r["feasible"] and r["proxy"] == r["proxy"]]
    front = pareto_front([(r["proxy"], r["cost"]) for r in feasible])
    return [feasible[i] for i in front]


def progress_summary(trials: list[optuna.trial.FrozenTrial], cost: str) -> tuple[int, Any, int]:
    """(scored trials, best feasible proxy or None, front size) for the live display.

    Only complete trials count toward `--trials`: a failed or interrupted one is run again.
    """
    rows = trial_rows([t for t in trials if t.state.is_finished()], cost)
    done = sum(1 for r in rows if r["state"] == "COMPLETE")
    front = front_rows(rows)
    best = min((r["proxy"] for r in front), default=None)
    return done, best, len(front)


def write_pareto(
    run: RunDir,
    rows: list[dict[str, Any]],
    objectives: tuple[str, str],
    budget: dict[str, Any],
    teacher: dict[str, Any],
) -> list[dict[str, Any]]:
    """pareto.json: the feasible front (trial numbers and scores) with its context."""
    front = front_rows(rows)
    atomic_write_json(
        run.pareto,
        {
            "objectives": list(objectives),
            "front": [int(r["number"]) for r in front],
            "points": [
                {
                    "number": int(r["number"]),
                    "proxy": r["proxy"],
                    objectives[1]: r["cost"],
                    "params": r["params"],
                    "flops": r["flops"],
                    "baseline": r["baseline"],
                    "config": json.loads(r["config"]) if r["config"] else None,
                }
                for r in front
            ],
            "budget": budget,
            "teacher": teacher,
            "trials": len(rows),
            "feasible": sum(1 for r in rows if r["feasible"]),
        },
    )
    return front
