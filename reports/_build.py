"""`build(run_dir)`: report.html, summary.md and the trials tables of one run; `compare(...)`."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from . import _data, _figures
from ._run import RunData, load_run, winners_table


class ReportPaths(NamedTuple):
    html: Path
    summary: Path
    parquet: Path
    csv: Path


def _atomic_write_text(path: Path, text: str) -> None:
    from vitrank.core.files import atomic_write_text

    atomic_write_text(path, text)


# Files that only a search writes: a directory holding one is that search's run.
RUN_MARKERS = ("run.yaml", "study.db")


def refuse_another_run(out: Path, own: Path | None) -> None:
    """Refuse to write a report into a run directory other than `own`.

    A report writes trials.parquet, report.html and summary.md: in another run's directory
    they would replace that run's own, and `vitrank finetune` would then pick its winners
    from the wrong trials.
    """
    marks = [name for name in RUN_MARKERS if (out / name).exists()]
    if not marks or (own is not None and out.resolve() == own.resolve()):
        return
    default = f", or leave out --out to write into {own}" if own is not None else ""
    raise FileExistsError(
        f"{out} holds a run of its own ({', '.join(marks)}); a report there would overwrite "
        f"that run's trials and report. Choose a new or empty --out{default}."
    )


def objectives(run: RunData) -> tuple[str, str]:
    """The run's (score, cost) objectives: pareto.json's, else run.yaml's budget kind."""
    named = run.pareto.get("objectives")
    if isinstance(named, (list, tuple)) and len(named) == 2:
        return str(named[0]), str(named[1])
    if run.settings.get("budget_latency") is not None:
        return "proxy", "latency_ms"
    return "proxy", "params"


def _fingerprint(run: RunData) -> Any:
    for winner in run.winners:
        if winner.config is not None:
            return winner.config.fingerprint
    if "config" in run.trials.columns and len(run.trials):
        from vitrank.spaces import CompressionConfig

        return CompressionConfig.from_json(str(run.trials["config"].iloc[0])).fingerprint
    return None


def teacher_costs(run: RunData) -> dict[str, float]:
    """The teacher's params and FLOPs (from the fingerprint), plus what pareto.json records."""
    from vitrank.spaces import dense_flops, dense_params

    costs: dict[str, float] = {}
    fingerprint = _fingerprint(run)
    if fingerprint is not None:
        costs.update(params=float(dense_params(fingerprint)), flops=float(dense_flops(fingerprint)))
    recorded = run.pareto.get("teacher")
    if isinstance(recorded, dict):
        costs.update({k: v for k, v in recorded.items() if isinstance(v, (int, float))})
    return costs


def budget_limit(run: RunData, cost: str) -> float | None:
    """The budget in the units of `cost` (params, FLOPs or ms), when the run was budgeted in it."""
    recorded = run.pareto.get("budget")
    if isinstance(recorded, dict) and recorded.get("limit") is not None:
        kind = {"latency": "latency_ms"}.get(str(recorded.get("kind")), recorded.get("kind"))
        return float(recorded["limit"]) if kind == cost else None
    settings = run.settings
    if cost == "latency_ms" and settings.get("budget_latency") is not None:
        return float(settings["budget_latency"])
    fraction_key = {"params": "budget_params", "flops": "budget_flops"}.get(cost)
    if fraction_key is None or settings.get(fraction_key) is None:
        return None
    if cost == "params" and settings.get("budget_flops") is not None:
        return None
    from vitrank.spaces import parse_budget

    budget = parse_budget(str(settings[fraction_key]), kind=cost)
    if budget.absolute:
        return float(budget.value)
    dense = teacher_costs(run).get(cost)
    return budget.value * dense if dense else None


def _measured(trials: pd.DataFrame, column: str) -> bool:
    return column in trials.columns and bool(np.isfinite(trials[column].astype(float)).any())


def _figures_html(figures: Sequence[tuple[str, Any]]) -> str:
    parts = []
    for index, (heading, figure) in enumerate(figures):
        body = figure.to_html(
            full_html=False,
            include_plotlyjs=index == 0,  # plotly.js once, embedded: the page opens offline
            div_id=f"figure-{index}",
            config={"displaylogo": False},
        )
        parts.append(f"<section><h2>{html.escape(heading)}</h2>{body}</section>")
    return "\n".join(parts)


def _page(title: str, intro: str, figures: Sequence[tuple[str, Any]], tables: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}
section{{margin-bottom:2em}}pre{{white-space:pre-wrap}}</style></head>
<body><h1>{html.escape(title)}</h1>{intro}
{_figures_html(figures)}
{tables}
</body></html>
"""


def build(run_dir: str | Path, out: str | Path | None = None) -> ReportPaths:
    """Write report.html, summary.md, trials.parquet and trials.csv of one run (into `out`)."""
    run = load_run(run_dir)
    out = Path(out) if out is not None else run.root
    refuse_another_run(out, own=run.root)
    out.mkdir(parents=True, exist_ok=True)
    score, cost = objectives(run)
    winners = winners_table(run)
    figures: list[tuple[str, Any]] = []
    axes = [cost] + [c for c in ("params", "latency_ms") if c != cost and _measured(run.trials, c)]
    for x in axes:
        if not _measured(run.trials, x):
            continue
        data = _data.front_data(run.trials, x, score, winners, budget_limit(run, x))
        figures.append(
            (
                f"Pareto front: {score} vs {x}",
                _figures.front_figure(data, f"{run.name}: {score} vs {x}"),
            )
        )
    configs = {
        label: winner.config
        for label, winner in zip(winners.get("label", []), run.winners, strict=False)
        if winner.config is not None
    }
    grid = _data.block_map_grid(_data.block_map(configs))
    if grid.rows:
        figures.append(
            ("Winners' choices per block", _figures.block_map_figure(grid, "fraction kept"))
        )
    fidelity = _data.proxy_fidelity(winners, proxy=score)
    if fidelity.n >= 2:
        figures.append(
            ("Proxy vs fine-tuned accuracy", _figures.fidelity_figure(fidelity, "winners"))
        )
    if "rung1_accuracy" in run.trials.columns or len(winners):
        promoted = run.trials
        if "rung1_accuracy" in promoted.columns:
            promoted = promoted[promoted["rung1_accuracy"].notna()]
        else:
            promoted = promoted.iloc[0:0].assign(rung1_accuracy=[])
        for x in axes:
            if x not in promoted.columns and x not in winners.columns:
                continue
            figure = _figures.accuracy_front_figure(
                promoted,
                winners,
                x,
                teacher_costs(run),
                budget_limit(run, x),
                f"{run.name}: accuracy vs {x}",
                baselines=_baseline_points(run),
            )
            figures.append((f"Accuracy vs {x}: as built, after rung 1 and fine-tuned", figure))
    trace = _data.hypervolume_over_trials(run.trials, (score, cost))
    figures.append(
        ("Hypervolume of the front over trials", _figures.hypervolume_figure(trace, "hypervolume"))
    )

    summary = summary_markdown(run, winners, (score, cost), fidelity)
    intro = "".join(f"<p>{_inline(line)}</p>" for line in _head_lines(run, (score, cost), fidelity))
    tables = summary_html(run, winners, (score, cost), fidelity)
    paths = ReportPaths(
        out / "report.html", out / "summary.md", out / "trials.parquet", out / "trials.csv"
    )
    _atomic_write_text(paths.html, _page(f"vitrank report: {run.name}", intro, figures, tables))
    _atomic_write_text(paths.summary, summary)
    # The search owns its run's trials.parquet (a resume appends to it): never rewrite it.
    own = paths.parquet.resolve() == (run.root / "trials.parquet").resolve()
    write_trials(run.trials, paths.parquet, paths.csv, parquet_too=not own)
    return paths


def write_trials(
    trials: pd.DataFrame, parquet: Path, csv: Path, *, parquet_too: bool = True
) -> None:
    """The flat trials table (without the report's hover text) as CSV, and Parquet if asked."""
    from vitrank.core.files import atomic_write_bytes

    table = trials.drop(columns=["hover"], errors="ignore")
    if parquet_too:
        atomic_write_bytes(parquet, table.to_parquet(index=False))
    _atomic_write_text(csv, table.to_csv(index=False))


def _number(value: Any, kind: str = "count") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if kind == "percent":
        return f"{float(value):.2%}"
    if kind == "ms":
        return f"{float(value):.3g}"
    if kind == "float":
        return f"{float(value):.4g}"
    return f"{float(value):,.0f}"


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


class Table(NamedTuple):
    heading: str
    header: list[str]
    rows: list[list[str]]
    note: str


def winners_rows(run: RunData, winners: pd.DataFrame) -> Table:
    """Winners against the teacher and the baselines: accuracy, costs, measured speed-up."""
    teacher = teacher_costs(run)
    header = [
        "model",
        "accuracy",
        "as built",
        "uncompensated",
        "params",
        "FLOPs",
        "latency ms (measured)",
        "speed-up (measured)",
        "latency ms (predicted)",
        "speed-up (predicted)",
        "proxy",
        "McNemar p vs the winner",
    ]

    def ratio(base: Any, value: Any) -> str:
        if not isinstance(value, (int, float)) or not isinstance(base, (int, float)):
            return "–"
        if not (math.isfinite(value) and math.isfinite(base)) or value <= 0 or base <= 0:
            return "–"
        return f"{base / value:.2f}×"

    def row(name: str, record: dict[str, Any]) -> list[str]:
        predicted, measured = record.get("predicted_ms"), record.get("measured_ms")
        params = record.get("params")
        share = f" ({params / teacher['params']:.0%})" if params and teacher.get("params") else ""
        return [
            name,
            _number(record.get("accuracy"), "percent"),
            _number(record.get("initial_accuracy"), "percent"),
            _number(record.get("uncompensated_accuracy"), "percent"),
            _number(params) + share,
            _number(record.get("flops")),
            _number(measured, "ms"),
            ratio(teacher.get("measured_latency_ms"), measured),
            _number(predicted, "ms"),
            ratio(teacher.get("latency_ms"), predicted),
            _number(record.get("proxy"), "float"),
            record.get("versus", "–"),
        ]

    rows = [
        row(
            "teacher",
            dict(
                teacher,
                predicted_ms=teacher.get("latency_ms"),
                measured_ms=teacher.get("measured_latency_ms"),
            ),
        )
    ]
    predicted_by_trial = (
        run.trials.set_index("number")["latency_ms"].to_dict()
        if ("latency_ms" in run.trials.columns)
        else {}
    )
    handed_out = run.pareto.get("winner_accuracy") or {}
    for record in winners.to_dict("records"):
        predicted = record.get("predicted_latency_ms")
        if predicted is None or not math.isfinite(float(predicted)):
            predicted = predicted_by_trial.get(record.get("number"))
        record = dict(
            record,
            accuracy=record.get("finetuned_accuracy"),
            measured_ms=record.get("latency_ms"),
            predicted_ms=predicted,
            uncompensated_accuracy=(
                handed_out.get("built")
                if handed_out.get("number") == record.get("number")
                else None
            ),
        )
        baseline = record.get("baseline")
        origin = f", baseline {baseline}" if isinstance(baseline, str) and baseline else ""
        name = f"{record['label']} (trial {record.get('number')}{origin}, {record['id']})"
        rows.append(row(name, record))
    compared = {e["baseline"]: e for e in run.pareto.get("baselines") or []}
    if "baseline" in run.trials.columns:
        baselines = run.trials[run.trials["baseline"].fillna("").astype(str) != ""]
        for record in baselines.drop_duplicates("baseline").to_dict("records"):
            feasible = "" if record.get("feasible") else ", infeasible"
            name = f"baseline {record['baseline']} (trial {record['number']}{feasible})"
            measured = compared.get(record["baseline"], {})
            record = dict(
                record,
                predicted_ms=record.get("latency_ms"),
                accuracy=measured.get("accuracy_finetuned"),
                initial_accuracy=measured.get(
                    "accuracy_compensated", measured.get("accuracy_built")
                ),
                uncompensated_accuracy=measured.get("accuracy_built"),
                versus=_versus_cell(measured),
            )
            rows.append(row(name, record))
    note = (
        "Accuracy: top-1 on the validation split after fine-tuning; `as built`: before it, "
        "with the run's error compensation (baselines are compensated as the winner is); "
        "`uncompensated`: the config alone, compressed from the run's factors (the search's "
        "own lead over a baseline, without the compensation's). With --finetune-baselines "
        "each baseline is also fine-tuned as the winner was. McNemar's exact p compares a "
        "baseline with the winner image by image: `built`, both uncompensated; "
        "`compensated`, both compensated; `finetuned`, the baseline fine-tuned against the "
        "winner handed out; (+) where the baseline is right more often, (−) where the winner "
        "is. "
        "Measured latency is each model's own timing at the run's batch on its device, the "
        "teacher's included; predicted latency comes from the run's latency table."
    )
    return Table("Winners, teacher and baselines", header, rows, note)


def _baseline_points(run: RunData) -> list[dict[str, Any]]:
    """The compared baselines (pareto.json) with their trial's costs (the trials table)."""
    compared = run.pareto.get("baselines") or []
    if not compared or "number" not in run.trials.columns:
        return []
    trials = run.trials.set_index("number")
    out = []
    for entry in compared:
        costs = trials.loc[entry["trial"]] if entry["trial"] in trials.index else {}
        out.append(
            {**{k: costs.get(k) for k in ("params", "flops", "latency_ms")}, **entry}  # type: ignore[union-attr]
        )
    return out


def _versus_cell(measured: dict[str, Any]) -> str:
    """McNemar's p of a baseline against the winner: uncompensated, compensated, then after
    fine-tuning."""
    parts = []
    for stage in ("built", "compensated", "finetuned"):
        test = measured.get(f"vs_winner_{stage}")
        if test:
            sign = "+" if test["baseline_only_right"] > test["winner_only_right"] else "−"
            parts.append(f"{stage} {test['mcnemar_p']:.2g} ({sign})")
    return ", ".join(parts) or "–"


def ladder_rows(run: RunData) -> Table | None:
    """The fidelity ladder: each promoted candidate's score at every rung, τ and times."""
    trials = run.trials
    if "rung1_score" not in trials.columns or not trials["rung1_score"].notna().any():
        return None
    promoted = trials[trials["rung1_score"].notna()].copy()
    promoted = promoted.sort_values(
        ["rung1_units", "rung1_score", "proxy"], ascending=[False, False, True]
    )
    from vitrank.evaluators.signals import SIGNALS
    from vitrank.search import rung_signals

    # One column per rung and registered signal (of the ones this run recorded).
    columns = [(n, key) for n, key, _ in rung_signals()[1:] if key in promoted.columns]
    signal = next((s for s in promoted.get("rung1_signal", []) if isinstance(s, str)), None)
    header = [
        "trial",
        "baseline",
        "params",
        "proxy (rung 0)",
        "rung-1 milestones",
        *(f"{name}{' (ranks)' if name.endswith(f' {signal}') else ''}" for name, _ in columns),
        "final accuracy (validation)",
    ]
    rows = []
    for record in promoted.to_dict("records"):
        units = record.get("rung1_units")
        rows.append(
            [
                str(record["number"]),
                record["baseline"] if isinstance(record.get("baseline"), str) else "–",
                _number(record.get("params")),
                _number(record.get("proxy"), "float"),
                str(int(units)) if units == units and units is not None else "–",
                *(_signal_cell(record.get(key), key.split("_", 1)[1]) for _, key in columns),
                _number(record.get("final_accuracy"), "percent"),
            ]
        )
    rungs = _rungs_file(run)
    parts = []
    for rung, label in [("proxy", "proxy"), *((n, n) for n, _ in columns)]:
        figure = (rungs.get("agreement") or {}).get(rung) or {}
        tau, count = figure.get("tau"), figure.get("count", 0)
        if isinstance(tau, (int, float)) and math.isfinite(tau):
            parts.append(
                f"Kendall τ of the {label} against the final accuracy: {tau:+.2f} ({count} candidates)"
            )
        else:
            parts.append(
                f"Kendall τ of the {label}: needs 3 candidates with a final accuracy ({count} here; raise --finetune-top)"
            )
    seconds = rungs.get("seconds") or {}
    if seconds:
        parts.append(
            f"selection by the proxy alone took {seconds.get('proxy_selection', math.nan):.1f} s; "
            f"with rungs 1 and 2, {seconds.get('multi_fidelity_selection', math.nan):.1f} s "
            f"(rung 1 {seconds.get('rung1', math.nan):.1f} s, rung 2 {seconds.get('rung2', math.nan):.1f} s)"
        )
    described = "; ".join(f"{name}: {s.description}" for name, s in SIGNALS.items())
    note = (
        "Rung 1 distils each candidate briefly, halving the field at each milestone; rung 2 "
        "fine-tunes the best K in full. Every signal is measured on the selection images: "
        "training images no other phase reads and no distillation trains on (never the "
        f"validation split) ({described}). The rungs rank by {signal or 'one of them'}, and "
        "change the proxy's order only where it differs beyond two standard errors. "
        + "; ".join(parts)
        + "."
    )
    return Table("Fidelity ladder: proxy, short distillation, fine-tuning", header, rows, note)


def _signal_cell(value: Any, signal: str) -> str:
    """A signal's value: a percentage for a share of images, else the number (KL: nats)."""
    from vitrank.evaluators.signals import SIGNALS

    if signal in SIGNALS and SIGNALS.get(signal).binary:
        return _number(value, "percent")
    return _number(value, "float")


def _rungs_file(run: RunData) -> dict[str, Any]:
    import json

    path = run.root / "rungs.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def _reuse_lines(run: RunData, winners: pd.DataFrame) -> list[str]:
    lines = []
    model_option = _model_option(run.settings)
    for record in winners.to_dict("records"):
        directory = Path(record["directory"])
        lines += [
            f"- {record['label']}: config `{directory / 'config.json'}`, model `{directory}`",
            f"  - `vitrank apply {directory / 'config.json'}{model_option} --out compressed-{record['id']}`",
            f"  - `vitrank eval {directory}`",
            f"  - `vitrank export {directory} --onnx {record['id']}.onnx`",
        ]
    if winners.empty:
        lines.append("- no winners were saved (run `vitrank finetune RUN_DIR --top K`).")
    lines.append(f"- re-run the search: `vitrank search --config {run.root / 'run.yaml'}`")
    return lines


def _tables(run: RunData, winners: pd.DataFrame) -> list[Table]:
    ladder = ladder_rows(run)
    return [winners_rows(run, winners), *([ladder] if ladder is not None else [])]


def _head_lines(
    run: RunData, objectives: tuple[str, str], fidelity: _data.FidelityData
) -> list[str]:
    lines = [
        f"{len(run.trials)} trials, {int(run.trials['feasible'].sum())} feasible; objectives "
        f"{objectives[0]} and {objectives[1]} (both minimised)."
    ]
    if math.isfinite(fidelity.kendall_tau):
        lines.append(
            f"Proxy fidelity over {fidelity.n} winners: Kendall τ {fidelity.kendall_tau:+.2f}, "
            f"Spearman ρ {fidelity.spearman_rho:+.2f}."
        )
    return lines


def _settings_items(run: RunData) -> list[tuple[str, Any]]:
    return [(key, value) for key, value in run.settings.items() if value is not None]


def summary_markdown(
    run: RunData, winners: pd.DataFrame, objectives: tuple[str, str], fidelity: _data.FidelityData
) -> str:
    """The run's settings, winners against the teacher and baselines, and how to reuse them."""
    settings = "\n".join(f"- {k}: `{v}`" for k, v in _settings_items(run)) or "- (no run.yaml)"
    lines = [f"# vitrank run `{run.name}`", "", *_head_lines(run, objectives, fidelity)]
    lines += ["", "## Settings", "", settings, ""]
    for table in _tables(run, winners):
        lines += [f"## {table.heading}", "", _markdown_table(table.header, table.rows), ""]
        lines += [table.note, ""]
    lines += ["## Reuse", "", *_reuse_lines(run, winners)]
    return "\n".join(lines) + "\n"


def _inline(text: str) -> str:
    """Markdown's `code` spans as <code>, everything else escaped."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def summary_html(
    run: RunData, winners: pd.DataFrame, objectives: tuple[str, str], fidelity: _data.FidelityData
) -> str:
    """The summary's content as HTML sections: real tables, lists and code."""
    parts = []
    for table in _tables(run, winners):
        parts.append(
            f"<section><h2>{html.escape(table.heading)}</h2>"
            f"{_html_table(table.header, table.rows)}<p>{_inline(table.note)}</p></section>"
        )
    settings = "".join(
        f"<li>{html.escape(str(k))}: <code>{html.escape(str(v))}</code></li>"
        for k, v in _settings_items(run)
    )
    parts.append(
        f"<section><h2>Settings</h2><ul>{settings or '<li>(no run.yaml)</li>'}</ul></section>"
    )
    reuse = "".join(
        f"<li>{_inline(line.lstrip('- ').strip())}</li>" for line in _reuse_lines(run, winners)
    )
    parts.append(f"<section><h2>Reuse</h2><ul>{reuse}</ul></section>")
    return "\n".join(parts)


def _model_option(settings: dict[str, Any]) -> str:
    text = ""
    for key in ("workload", "model", "data"):
        if settings.get(key):
            text += f" --{key} {settings[key]}"
    return text


def compare(run_dirs: Sequence[str | Path], out: str | Path) -> ReportPaths:
    """Several runs on one front (one colour per run), with a shared-reference hypervolume."""
    runs = [load_run(d) for d in run_dirs]
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        names = [str(run.root) for run in runs]
    out = Path(out)
    refuse_another_run(out, own=None)  # its trials.parquet holds every run's trials
    out.mkdir(parents=True, exist_ok=True)
    score, cost = objectives(runs[0])
    for run in runs[1:]:
        if objectives(run) != (score, cost):
            raise ValueError(
                f"Runs compared on one front must share their objectives, but {run.name} has "
                f"{objectives(run)} and {runs[0].name} has {(score, cost)}."
            )
    fronts = [
        (
            name,
            _data.front_data(run.trials, cost, score, winners_table(run), budget_limit(run, cost)),
        )
        for name, run in zip(names, runs, strict=True)
    ]
    everything = pd.concat(
        [run.trials.assign(run=name) for name, run in zip(names, runs, strict=True)]
    )
    reference = _data.reference_point(everything, (score, cost))
    rows = []
    for name, run in zip(names, runs, strict=True):
        trace = _data.hypervolume_over_trials(run.trials, (score, cost), reference)
        front = _data.pareto_front(run.trials, (score, cost))
        rows.append(
            [
                name,
                str(len(run.trials)),
                str(int(run.trials["feasible"].sum())),
                str(int(front.sum())),
                _number(trace.hypervolume[-1] if len(trace.hypervolume) else math.nan, "float"),
            ]
        )
    header = ["run", "trials", "feasible", "front", "hypervolume"]
    intro = (
        f"Objectives {score} and {cost}; hypervolume against the shared "
        f"reference ({reference[0]:.4g}, {reference[1]:.4g})."
    )
    summary = f"# vitrank comparison\n\n{intro}\n\n{_markdown_table(header, rows)}\n"
    figures = [("Pareto fronts", _figures.compare_figure(fronts, f"{score} vs {cost}"))]
    paths = ReportPaths(
        out / "report.html", out / "summary.md", out / "trials.parquet", out / "trials.csv"
    )
    title = "vitrank comparison: " + ", ".join(names)
    tables = f"<section><p>{_inline(intro)}</p>{_html_table(header, rows)}</section>"
    _atomic_write_text(paths.html, _page(title, "", figures, tables))
    _atomic_write_text(paths.summary, summary)
    write_trials(everything, paths.parquet, paths.csv)
    return paths
