"""Drawing: plotly figures from the NamedTuples and tables of `_data` (no computation here)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ._data import BlockMapGrid, FidelityData, FrontData, HypervolumeTrace

if TYPE_CHECKING:
    import plotly.graph_objects as go

# Axis titles of the columns a figure may plot.
AXIS_TITLES = {
    "params": "parameters",
    "flops": "FLOPs (batch 1)",
    "latency_ms": "latency (ms, predicted by the latency table)",
    "proxy": "proxy (lower is better)",
    "accuracy": "accuracy",
    "finetuned_accuracy": "fine-tuned accuracy",
}
_GREY = "rgba(150, 150, 150, 0.45)"
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b")


def _title(column: str) -> str:
    return AXIS_TITLES.get(column, column)


def _hover(table: object) -> list[str] | None:
    if "hover" not in table.columns:  # type: ignore[attr-defined]
        return None
    return [str(text) for text in table["hover"]]  # type: ignore[index]


def _spans_decades(values: object, decades: float = 2.0) -> bool:
    """A log axis reads better when the positive values span more than `decades` decades."""
    array = np.asarray(values, dtype=np.float64)
    array = array[np.isfinite(array)]
    if len(array) < 2 or (array <= 0).any():
        return False
    return bool(np.log10(array.max() / array.min()) > decades)


def winner_label(record: dict) -> str:
    """'W1: 93.2%' (fine-tuned), or the accuracy as built when it was not fine-tuned."""
    tuned = float(record.get("finetuned_accuracy", np.nan))
    if np.isfinite(tuned):
        return f"{record['label']}: {tuned:.1%}"
    initial = float(record.get("initial_accuracy", np.nan))
    if np.isfinite(initial):
        return f"{record['label']}: {initial:.1%} (not fine-tuned)"
    return str(record["label"])


def front_figure(data: FrontData, title: str) -> go.Figure:
    """Trials (infeasible greyed), the front, the budget line, baselines and winners."""
    import plotly.graph_objects as go

    x, y, trials = data.x, data.y, data.trials
    figure = go.Figure()
    infeasible = trials[~trials["feasible"]]
    feasible = trials[trials["feasible"] & ~trials["on_front"]]
    for part, name, color in (
        (infeasible, "infeasible", _GREY),
        (feasible, "feasible", "rgba(31, 119, 180, 0.35)"),
    ):
        figure.add_trace(
            go.Scatter(
                x=part[x],
                y=part[y],
                mode="markers",
                name=f"{name} ({len(part)})",
                marker=dict(color=color, size=7),
                hovertext=_hover(part),
                hoverinfo="text",
            )
        )
    figure.add_trace(
        go.Scatter(
            x=data.front[x],
            y=data.front[y],
            mode="lines+markers",
            name=f"Pareto front ({len(data.front)})",
            line=dict(shape="hv", color=_PALETTE[0]),
            marker=dict(color=_PALETTE[0], size=9),
            hovertext=_hover(data.front),
            hoverinfo="text",
        )
    )
    if not data.baselines.empty:
        figure.add_trace(
            go.Scatter(
                x=data.baselines[x],
                y=data.baselines[y],
                mode="markers+text",
                name="baselines",
                text=[str(b) for b in data.baselines["baseline"]],
                textposition="top center",
                marker=dict(symbol="diamond", size=11, color=_PALETTE[4]),
                hovertext=_hover(data.baselines),
                hoverinfo="text",
            )
        )
    if not data.winners.empty:
        labels = [winner_label(record) for record in data.winners.to_dict("records")]
        figure.add_trace(
            go.Scatter(
                x=data.winners[x],
                y=data.winners[y],
                mode="markers+text",
                name="winners (fine-tuned accuracy)",
                text=labels,
                textposition="bottom right",
                marker=dict(symbol="star", size=17, color=_PALETTE[1], line=dict(width=1)),
                hovertext=_hover(data.winners),
                hoverinfo="text",
            )
        )
    if data.budget is not None and np.isfinite(data.budget):
        figure.add_vline(
            x=data.budget,
            line=dict(dash="dash", color="black"),
            annotation_text="budget",
            annotation_position="top",
        )
    figure.update_layout(
        title=title,
        xaxis_title=_title(x),
        yaxis_title=_title(y),
        yaxis_type="log" if _spans_decades(trials[y]) else "linear",
        hovermode="closest",
        template="plotly_white",
        legend=dict(orientation="h", y=-0.2),
    )
    return figure


def compare_figure(fronts: Sequence[tuple[str, FrontData]], title: str) -> go.Figure:
    """Several runs' trials and fronts on one plot, one colour per run."""
    import plotly.graph_objects as go

    figure = go.Figure()
    for index, (name, data) in enumerate(fronts):
        color = _PALETTE[index % len(_PALETTE)]
        trials = data.trials
        figure.add_trace(
            go.Scatter(
                x=trials[data.x],
                y=trials[data.y],
                mode="markers",
                name=f"{name}: trials",
                legendgroup=name,
                marker=dict(color=color, size=6, opacity=0.3),
                hovertext=_hover(trials),
                hoverinfo="text",
            )
        )
        figure.add_trace(
            go.Scatter(
                x=data.front[data.x],
                y=data.front[data.y],
                mode="lines+markers",
                name=f"{name}: front",
                legendgroup=name,
                line=dict(shape="hv", color=color),
                marker=dict(color=color, size=9),
                hovertext=_hover(data.front),
                hoverinfo="text",
            )
        )
        if data.budget is not None and np.isfinite(data.budget):
            figure.add_vline(x=data.budget, line=dict(dash="dot", color=color))
    if fronts:
        figure.update_layout(xaxis_title=_title(fronts[0][1].x), yaxis_title=_title(fronts[0][1].y))
    figure.update_layout(title=title, hovermode="closest", template="plotly_white")
    return figure


def block_map_figure(grid: BlockMapGrid, title: str) -> go.Figure:
    """Heatmap of the fraction kept per block; each cell names the choice."""
    import plotly.graph_objects as go

    figure = go.Figure(
        go.Heatmap(
            z=grid.kept,
            x=[f"block {b}" for b in grid.blocks],
            y=grid.rows,
            text=grid.text,
            texttemplate="%{text}",
            hovertemplate="%{y}, %{x}: %{text}<br>kept %{z:.0%}<extra></extra>",
            colorscale="Viridis",
            zmin=0.0,
            zmax=1.0,
            colorbar=dict(title="kept"),
        )
    )
    figure.update_layout(
        title=title,
        yaxis=dict(autorange="reversed"),
        template="plotly_white",
        height=max(300, 60 + 40 * len(grid.rows)),
    )
    return figure


def fidelity_figure(data: FidelityData, title: str) -> go.Figure:
    import plotly.graph_objects as go

    tau = (
        "n/a (fewer than 3 winners)"
        if not np.isfinite(data.kendall_tau)
        else f"{data.kendall_tau:+.2f}"
    )
    figure = go.Figure(
        go.Scatter(
            x=data.proxy,
            y=data.accuracy,
            mode="markers+text",
            text=data.labels,
            textposition="top center",
            marker=dict(size=12, color=_PALETTE[1]),
            name="winners",
        )
    )
    figure.update_layout(
        title=f"{title} — Kendall τ = {tau}",
        xaxis_title=_title("proxy"),
        yaxis_title=_title("finetuned_accuracy"),
        template="plotly_white",
    )
    return figure


def hypervolume_figure(trace: HypervolumeTrace, title: str) -> go.Figure:
    import plotly.graph_objects as go

    figure = go.Figure(
        go.Scatter(x=trace.numbers, y=trace.hypervolume, mode="lines", line=dict(shape="hv"))
    )
    reference = ", ".join(
        f"{name} {value:.4g}" for name, value in zip(trace.objectives, trace.reference, strict=True)
    )
    figure.update_layout(
        title=f"{title} (reference: {reference})",
        xaxis_title="trial",
        yaxis_title="hypervolume",
        template="plotly_white",
    )
    return figure


def accuracy_front_figure(
    candidates: object,
    winners: object,
    cost: str,
    teacher: dict,
    budget: float | None,
    title: str,
    baselines: list[dict] | None = None,
) -> go.Figure:
    """Accuracy against cost: rung-1 candidates (selection accuracy), each winner as built
    and fine-tuned (validation accuracy, joined by a line), each baseline uncompensated,
    compensated (and fine-tuned), the teacher and the budget."""
    import plotly.graph_objects as go

    figure = go.Figure()
    for stage, key, symbol in (
        ("uncompensated", "accuracy_built", "x"),
        ("compensated", "accuracy_compensated", "cross"),
        ("fine-tuned", "accuracy_finetuned", "diamond"),
    ):
        points = [b for b in baselines or [] if b.get(key) is not None and b.get(cost) is not None]
        if points:
            figure.add_trace(
                go.Scatter(
                    x=[b[cost] for b in points],
                    y=[b[key] for b in points],
                    mode="markers",
                    name=f"baselines {stage}",
                    marker={"color": "#444", "size": 9, "symbol": symbol},
                    text=[f"baseline {b['baseline']}" for b in points],
                )
            )
    if len(candidates):  # type: ignore[arg-type]
        figure.add_trace(
            go.Scatter(
                x=candidates[cost],  # type: ignore[index]
                y=candidates["rung1_accuracy"],  # type: ignore[index]
                mode="markers",
                name="rung 1 (selection images)",
                marker={"color": _GREY, "size": 8},
                text=[f"trial {n}" for n in candidates["number"]],  # type: ignore[index]
            )
        )
    for index, record in enumerate(winners.to_dict("records")):  # type: ignore[attr-defined]
        x = record.get(cost)
        built, tuned = record.get("initial_accuracy"), record.get("finetuned_accuracy")
        ys = [v for v in (built, tuned) if v is not None and np.isfinite(float(v))]
        if x is None or not ys:
            continue
        figure.add_trace(
            go.Scatter(
                x=[x] * len(ys),
                y=ys,
                mode="lines+markers",
                name=f"{record['label']}: as built → fine-tuned",
                marker={"color": _PALETTE[index % len(_PALETTE)], "size": 10},
            )
        )
    if teacher.get(cost) and teacher.get("accuracy") is not None:
        figure.add_trace(
            go.Scatter(
                x=[teacher[cost]],
                y=[teacher["accuracy"]],
                mode="markers",
                name="teacher",
                marker={"symbol": "star", "size": 14, "color": "black"},
            )
        )
    if budget is not None:
        figure.add_vline(x=budget, line_dash="dash", annotation_text="budget")
    figure.update_layout(
        title=title, xaxis_title=_title(cost), yaxis_title="accuracy", template="plotly_white"
    )
    return figure
