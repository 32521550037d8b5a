"""The data behind every figure of a report: pure functions on tables, no drawing.

Each function returns a NamedTuple or a DataFrame that the tests check; `_figures`
turns them into plotly figures. All objectives are minimised (proxy losses, parameters,
latency); accuracies are maximised and are never used as objectives here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
from vitrank.search import pareto_front as _front_indices


def pareto_front(
    df: pd.DataFrame, objectives: Sequence[str], feasible: str = "feasible"
) -> np.ndarray:
    """Boolean mask of the rows on the Pareto front of two minimised `objectives`.

    Only rows whose `feasible` column is true (all rows when there is no such column)
    and whose objectives are finite take part; every other row is off the front.
    """
    if len(objectives) != 2:
        raise ValueError(f"`len(objectives) == 2` must hold, but got {list(objectives)=}.")
    missing = [name for name in objectives if name not in df.columns]
    if missing:
        raise ValueError(f"Objectives {missing} are not columns of the table {list(df.columns)}.")
    values = df[list(objectives)].to_numpy(dtype=np.float64)
    usable = np.isfinite(values).all(axis=1)
    if feasible in df.columns:
        usable &= df[feasible].fillna(False).to_numpy(dtype=bool)
    rows = np.flatnonzero(usable)
    # search's front takes (objective, cost) pairs and sorts by the second.
    points = [(float(values[i, 0]), float(values[i, 1])) for i in rows]
    mask = np.zeros(len(df), dtype=bool)
    mask[rows[_front_indices(points)]] = True
    return mask


def hypervolume_2d(
    points: Sequence[Sequence[float]] | np.ndarray, reference: Sequence[float]
) -> float:
    """Area dominated by `points` (both coordinates minimised) and bounded by `reference`.

    Points that do not strictly dominate the reference in both coordinates add nothing.
    """
    ref_x, ref_y = float(reference[0]), float(reference[1])
    array = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    inside = np.isfinite(array).all(axis=1) & (array[:, 0] < ref_x) & (array[:, 1] < ref_y)
    array = array[inside]
    if len(array) == 0:
        return 0.0
    # Sweep by rising x; each point on the staircase adds the strip up to the next one.
    order = np.lexsort((array[:, 1], array[:, 0]))
    area, best_y = 0.0, ref_y
    xs, ys = array[order, 0], array[order, 1]
    for i in range(len(xs)):
        best_y = min(best_y, ys[i])
        next_x = xs[i + 1] if i + 1 < len(xs) else ref_x
        area += (next_x - xs[i]) * (ref_y - best_y)
    return float(area)


class HypervolumeTrace(NamedTuple):
    numbers: np.ndarray  # trial number after which the hypervolume was measured
    hypervolume: np.ndarray  # of the feasible trials up to and including that one
    reference: tuple[float, float]  # the nadir point the area is bounded by
    objectives: tuple[str, str]


def reference_point(
    df: pd.DataFrame, objectives: Sequence[str], margin: float = 0.1
) -> tuple[float, float]:
    """The worst finite value of each objective, pushed out by `margin` of its range."""
    reference = []
    for name in objectives:
        values = df[name].to_numpy(dtype=np.float64)
        values = values[np.isfinite(values)]
        if len(values) == 0:
            reference.append(math.nan)
            continue
        low, high = float(values.min()), float(values.max())
        span = high - low if high > low else max(abs(high), 1.0)
        reference.append(high + margin * span)
    return reference[0], reference[1]


def hypervolume_over_trials(
    df: pd.DataFrame,
    objectives: Sequence[str] = ("proxy", "params"),
    reference: Sequence[float] | None = None,
    number: str = "number",
    feasible: str = "feasible",
) -> HypervolumeTrace:
    """The feasible front's hypervolume after each trial, in trial order.

    The reference defaults to the worst value of each objective over all trials plus 10 %
    of its range, so the curve only rises and the last value is the final front's area.
    """
    objectives = (objectives[0], objectives[1])
    table = df.sort_values(number) if number in df.columns else df
    ref = tuple(reference) if reference is not None else reference_point(table, objectives)
    usable = np.ones(len(table), dtype=bool)
    if feasible in table.columns:
        usable = table[feasible].fillna(False).to_numpy(dtype=bool)
    values = table[list(objectives)].to_numpy(dtype=np.float64)
    numbers = table[number].to_numpy() if number in table.columns else np.arange(len(table))
    volumes = np.empty(len(table))
    for i in range(len(table)):
        chosen = values[: i + 1][usable[: i + 1]]
        volumes[i] = hypervolume_2d(chosen, ref) if math.isfinite(sum(ref)) else math.nan
    return HypervolumeTrace(
        np.asarray(numbers), volumes, (float(ref[0]), float(ref[1])), objectives
    )


class FidelityData(NamedTuple):
    labels: list[str]  # one per winner
    proxy: np.ndarray  # the search's proxy score (lower predicts better)
    accuracy: np.ndarray  # fine-tuned top-1
    kendall_tau: float  # NaN with fewer than three finite pairs
    spearman_rho: float
    n: int


def kendall_tau(
    proxy: Sequence[float] | np.ndarray, accuracy: Sequence[float] | np.ndarray
) -> float:
    """Kendall tau-b between a loss-like proxy and accuracy: +1 when the proxy orders perfectly."""
    from vitrank.evaluators.fidelity import rank_fidelity

    return rank_fidelity(proxy, accuracy, lower_is_better=True).kendall_tau


def proxy_fidelity(
    winners: pd.DataFrame, proxy: str = "proxy", accuracy: str = "finetuned_accuracy"
) -> FidelityData:
    """Proxy scores against fine-tuned accuracies of the winners, with Kendall's tau."""
    from vitrank.evaluators.fidelity import rank_fidelity

    if winners.empty or proxy not in winners.columns or accuracy not in winners.columns:
        return FidelityData([], np.empty(0), np.empty(0), math.nan, math.nan, 0)
    scores = winners[proxy].to_numpy(dtype=np.float64)
    accuracies = winners[accuracy].to_numpy(dtype=np.float64)
    fidelity = rank_fidelity(scores, accuracies, lower_is_better=True)
    labels = [str(label) for label in winners["label"]] if "label" in winners else []
    return FidelityData(
        labels, scores, accuracies, fidelity.kendall_tau, fidelity.spearman_rho, fidelity.n
    )


class FrontData(NamedTuple):
    x: str  # cost column (params or latency_ms)
    y: str  # minimised score column (the proxy)
    trials: pd.DataFrame  # every trial with columns x, y, feasible, on_front, hover
    front: pd.DataFrame  # the feasible front, by rising x
    baselines: pd.DataFrame  # trials that ran a baseline's config, with `baseline` labels
    winners: pd.DataFrame  # the winners' trials with their fine-tuned accuracy
    budget: float | None  # the budget in units of x, when x is the budgeted cost


def front_data(
    trials: pd.DataFrame,
    x: str,
    y: str = "proxy",
    winners: pd.DataFrame | None = None,
    budget: float | None = None,
) -> FrontData:
    """Everything the Pareto plot draws: all trials, the front, baselines and winners."""
    for column in (x, y):
        if column not in trials.columns:
            raise ValueError(
                f"The trials table has no column {column!r}; it has {list(trials.columns)}."
            )
    table = trials.copy()
    if "feasible" not in table.columns:
        table["feasible"] = True
    table["feasible"] = table["feasible"].fillna(False).astype(bool)
    table["on_front"] = pareto_front(table, (y, x))
    front = table[table["on_front"]].sort_values(x)
    if "baseline" in table.columns:
        baselines = table[table["baseline"].fillna("").astype(str) != ""]
    else:
        baselines = table.iloc[0:0]
    if winners is None or winners.empty or "number" not in winners.columns:
        chosen = table.iloc[0:0].assign(label=[], finetuned_accuracy=[])
    else:
        keep = [
            c
            for c in ("number", "label", "finetuned_accuracy", "initial_accuracy")
            if c in winners.columns
        ]
        chosen = table.drop(columns=[c for c in keep if c != "number"], errors="ignore").merge(
            winners[keep], on="number", how="inner"
        )
    return FrontData(x, y, table, front, baselines, chosen, budget)


# The choices of one block, as the per-block map shows them.
_PARTS = ("attention", "mlp", "tokens")


def block_map(winners: Mapping[str, object]) -> pd.DataFrame:
    """One row per (winner, block, part) with the choice made and the fraction kept.

    `winners` maps a label to its `CompressionConfig`. `kept` is the part's parameters
    relative to its dense form (attention, MLP) or the fraction of tokens that leave the
    block (tokens), so one colour scale reads for every part: 1 = untouched.
    """
    from vitrank.core.operators import of
    from vitrank.core.spec import AttentionSpec, MlpSpec, merge_count
    from vitrank.spaces import attention_linears, mlp_linears

    rows = []
    for label, config in winners.items():
        shapes = config.fingerprint.blocks  # type: ignore[attr-defined]
        schedule = config.token_schedule  # type: ignore[attr-defined]
        prefix = config.fingerprint.num_prefix_tokens  # type: ignore[attr-defined]
        for index, (shape, spec) in enumerate(zip(shapes, config.blocks, strict=True)):  # type: ignore[attr-defined]
            attn, mlp = spec.attn, spec.mlp
            dense_attn = sum(lin.params for lin in attention_linears(shape, AttentionSpec()))
            dense_mlp = sum(lin.params for lin in mlp_linears(shape, MlpSpec()))
            attn_linears = attention_linears(shape, attn, spec.merge_ratio > 0)
            attn_kept = sum(lin.params for lin in attn_linears) / dense_attn
            mlp_kept = sum(lin.params for lin in mlp_linears(shape, mlp)) / dense_mlp
            tokens_in = schedule[index]
            merged = merge_count(spec.merge_ratio, tokens_in, prefix)
            common = dict(winner=str(label), block=index)
            rows.append(
                dict(
                    common,
                    part="attention",
                    op=attn.op,
                    choice=of(attn).describe(attn, shape),
                    kept=attn_kept,
                    **of(attn).values(attn),  # the operator's own knobs
                    keep_ratio=of(attn).keep_ratio(attn, shape),
                )
            )
            rows.append(
                dict(
                    common,
                    part="mlp",
                    op=mlp.op,
                    choice=of(mlp).describe(mlp, shape),
                    kept=mlp_kept,
                    **of(mlp).values(mlp),
                    keep_ratio=of(mlp).keep_ratio(mlp, shape),
                )
            )
            rows.append(
                dict(
                    common,
                    part="tokens",
                    op="merge" if merged else "none",
                    choice=f"merge {spec.merge_ratio:g} ({tokens_in}→{tokens_in - merged})"
                    if merged
                    else f"{tokens_in} tokens",
                    kept=(tokens_in - merged) / tokens_in,
                    merge_ratio=spec.merge_ratio,
                )
            )
    return pd.DataFrame(rows, columns=block_map_columns())


def block_map_columns() -> list[str]:
    """The block map's columns: every registered operator's knobs, in registry order."""
    from vitrank.core.operators import OPERATORS

    knobs = dict.fromkeys(knob for _, op in OPERATORS.items() for knob in op.knobs)
    return [
        "winner", "block", "part", "op", "choice", "kept", *knobs, "keep_ratio", "merge_ratio"
    ]  # fmt: skip


class BlockMapGrid(NamedTuple):
    rows: list[str]  # "<winner> · <part>", top to bottom
    blocks: list[int]  # block index per column
    kept: np.ndarray  # (rows, blocks) fraction kept, colour of the heatmap
    text: np.ndarray  # (rows, blocks) the choice, shown in each cell


def block_map_grid(table: pd.DataFrame) -> BlockMapGrid:
    """The long `block_map` table pivoted into the heatmap's grid."""
    if table.empty:
        return BlockMapGrid([], [], np.empty((0, 0)), np.empty((0, 0), dtype=object))
    winners = list(dict.fromkeys(table["winner"]))
    blocks = sorted(set(int(b) for b in table["block"]))
    rows = [f"{w} · {p}" for w in winners for p in _PARTS]
    kept = np.full((len(rows), len(blocks)), np.nan)
    text = np.full((len(rows), len(blocks)), "", dtype=object)
    row_of = {name: i for i, name in enumerate(rows)}
    column_of = {b: j for j, b in enumerate(blocks)}
    for record in table.itertuples(index=False):
        i, j = row_of[f"{record.winner} · {record.part}"], column_of[int(record.block)]
        kept[i, j] = record.kept
        text[i, j] = record.choice
    return BlockMapGrid(rows, blocks, kept, text)
