"""Reading a run directory (`runs/<name>/`, see search's `RunDir`) into tables.

Everything a report shows comes from the files a search leaves behind: run.yaml, the
trials (read from study.db, else trials.parquet), pareto.json and
winners/<id>/{config.json, metrics.json}. Nothing is
recomputed here except what the files imply (the budget line in the cost's units).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import yaml

# Columns of search's trials table (search/_table.py) that a report cannot do without.
REQUIRED_COLUMNS = ("number", "state", "proxy", "params", "feasible")
# Keys of a winner's metrics.json (search/_winners.py) the report reads; absent ones are NaN.
WINNER_METRICS = (
    "number",
    "proxy",
    "finetuned_accuracy",
    "initial_accuracy",
    "latency_ms",
    "predicted_latency_ms",
    "rank",
    "rung1_accuracy",
    "selection_accuracy",
)


class Winner(NamedTuple):
    id: str  # the folder name under winners/
    directory: Path
    config: Any  # spaces.CompressionConfig, or None when config.json is missing
    metrics: dict[str, Any]


class RunData(NamedTuple):
    root: Path
    name: str
    settings: dict[str, Any]  # run.yaml
    trials: pd.DataFrame  # one row per trial, flat columns
    pareto: dict[str, Any]  # pareto.json
    winners: list[Winner]


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested metrics as flat `a.b` keys (tables have flat columns)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, f"{name}."))
        elif not isinstance(value, list):
            flat[name] = value
    return flat


def load_run(root: str | Path) -> RunData:
    """Every file of a run directory a report reads; missing optional files read as empty."""
    from vitrank.spaces import CompressionConfig

    root = Path(root)
    trials_path = root / "trials.parquet"
    if not root.is_dir():
        raise FileNotFoundError(f"Run directory {root} does not exist; pass the --out of a search.")
    if not trials_path.is_file() and not (root / "study.db").is_file():
        raise FileNotFoundError(
            f"{root} has no trials.parquet; pass a search's run directory (the --out of "
            "`vitrank search`)."
        )
    settings: dict[str, Any] = {}
    if (root / "run.yaml").is_file():
        settings = yaml.safe_load((root / "run.yaml").read_text()) or {}
    pareto: dict[str, Any] = {}
    if (root / "pareto.json").is_file():
        loaded = json.loads((root / "pareto.json").read_text())
        pareto = loaded if isinstance(loaded, dict) else {"front": loaded}
    winners = []
    for directory in sorted((root / "winners").glob("*/")):
        if not directory.is_dir():
            continue
        config = None
        if (directory / "config.json").is_file():
            config = CompressionConfig.load(directory / "config.json")
        metrics = {}
        if (directory / "metrics.json").is_file():
            metrics = json.loads((directory / "metrics.json").read_text())
        winners.append(Winner(directory.name, directory, config, metrics))
    # W1 is the winner: rank 1 of the fidelity ladder (older runs: the best proxy).
    winners.sort(
        key=lambda w: (
            _sort_key(w.metrics.get("rank")),
            _sort_key(w.metrics.get("proxy")),
            w.id,
        )
    )
    trials = trials_table(_trials(root, trials_path), trials_path)
    return RunData(root, root.name, settings, trials, pareto, winners)


def _trials(root: Path, parquet: Path) -> pd.DataFrame:
    """The study's trials, else trials.parquet: a search killed or interrupted between two
    writes of the table leaves it behind the study, which records every trial."""
    from vitrank.search import read_trials

    frame = read_trials(root)
    if frame is None:
        if not parquet.is_file():
            raise FileNotFoundError(
                f"{root} has no trials.parquet and its study.db holds no search; pass a "
                "search's run directory (the --out of `vitrank search`)."
            )
        return pd.read_parquet(parquet)
    return frame


def _sort_key(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.inf
    return number if math.isfinite(number) else math.inf


def trials_table(raw: pd.DataFrame, source: str | Path = "trials.parquet") -> pd.DataFrame:
    """Search's trials table, by trial number, with each trial's hover text added."""
    missing = [column for column in REQUIRED_COLUMNS if column not in raw.columns]
    if missing:
        raise ValueError(
            f"{source} lacks the columns {missing}; was it written by another vitrank version? "
            "Rewrite it with `vitrank search --resume` on the run."
        )
    table = raw.copy()
    table["feasible"] = table["feasible"].fillna(False).astype(bool)
    table["hover"] = [trial_summary(row) for row in table.to_dict("records")]
    return table.sort_values("number").reset_index(drop=True)


def trial_summary(row: dict[str, Any]) -> str:
    """What hovering a trial shows: its number, scores and its config in a few lines."""
    lines = [f"<b>trial {row.get('number', '?')}</b>"]
    if _present(row.get("baseline")):
        lines[0] += f" (baseline {row['baseline']})"
    for key in ("proxy", "params", "flops", "latency_ms", "violation"):
        value = row.get(key)
        if _present(value):
            lines.append(f"{key}: {_format(value)}")
    # A trial that never ran (an enqueued baseline left waiting) has no config: NaN cells.
    if _present(row.get("summary")):
        lines.append(str(row["summary"]).replace("\n", "<br>"))
    elif _present(row.get("config")):
        lines.append(config_summary(row["config"]))
    return "<br>".join(lines)


def _present(value: Any) -> bool:
    """False for a missing table cell: None, NaN or an empty string."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return value != ""


def config_summary(config: Any, width: int = 4) -> str:
    """Per-block choices in a few short lines: 'b0 heads 4/4 | mlp prune 96 | merge .25'."""
    from vitrank.core.operators import of
    from vitrank.spaces import CompressionConfig

    if isinstance(config, str):
        try:
            config = CompressionConfig.from_json(config)
        except ValueError:
            return config[:200]
    if isinstance(config, dict):
        config = CompressionConfig.from_dict(config)
    parts = []
    for index, block in enumerate(config.blocks):
        attn, mlp = block.attn, block.mlp
        text = f"b{index}: attn {of(attn).brief(attn)}, mlp {of(mlp).brief(mlp)}"
        if block.merge_ratio:
            text += f", merge {block.merge_ratio:g}"
        parts.append(text)
    return "<br>".join(parts)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def winners_table(run: RunData) -> pd.DataFrame:
    """One row per winner: its id, trial number, label, scores and fine-tuned accuracy."""
    rows = []
    for index, winner in enumerate(run.winners):
        row: dict[str, Any] = {"id": winner.id, "label": f"W{index + 1}"}
        row.update({key: math.nan for key in WINNER_METRICS})
        row.update(_flat(winner.metrics))
        if _missing(row["number"]) and winner.config is not None:
            row["number"] = winner.config.provenance.get("trial", math.nan)
        row["directory"] = str(winner.directory)
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=["id", "label", *WINNER_METRICS, "directory"])
    for column in WINNER_METRICS:
        table[column] = pd.to_numeric(table[column], errors="coerce")
    # Scores the search gave the winner's trial, where the metrics file does not repeat them.
    if table["number"].notna().all():
        table["number"] = table["number"].astype(int)
        known = run.trials.set_index("number")
        for column in ("proxy", "params", "flops"):
            if column in known.columns:
                missing = table[column].isna() if column in table else pd.Series(True, table.index)
                table.loc[missing, column] = table.loc[missing, "number"].map(known[column])
    return table


# Settings of run.yaml that name the teacher and its images, as `load_workload` takes them.


def recorded_workload(config: Any, directory: str | Path) -> dict[str, Any]:
    """The workload a saved config or model was made with, as `load_workload` keywords.

    `vitrank apply` records it in the config's provenance; a search's winner
    (`runs/<name>/winners/<id>/`) has it in its run's run.yaml. Empty when neither says.
    """
    from vitrank.workloads import WorkloadSettings

    keys = WorkloadSettings.names()
    recorded = config.provenance.get("workload")
    if isinstance(recorded, dict):
        return {k: v for k, v in recorded.items() if k in keys and v is not None}
    saved = _winner_run_settings(directory)
    return {k: saved[k] for k in keys if saved.get(k) is not None}


def recorded_granularity(config: Any, directory: str | Path) -> int | None:
    """The rank granularity a config was searched at: its provenance's, else its run's
    run.yaml (a winner's folder); None when neither says."""
    value = config.provenance.get("granularity", _winner_run_settings(directory).get("granularity"))
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _winner_run_settings(directory: str | Path) -> dict[str, Any]:
    """run.yaml of the search whose winner `directory` (runs/<name>/winners/<id>/) is."""
    settings = Path(directory).resolve().parent.parent / "run.yaml"
    if Path(directory).resolve().parent.name == "winners" and settings.is_file():
        saved = yaml.safe_load(settings.read_text()) or {}
        return saved if isinstance(saved, dict) else {}
    return {}
