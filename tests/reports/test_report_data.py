"""The figure-data functions: front membership, hypervolume, Kendall's tau, block maps."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from vitrank.reports import (
    block_map,
    block_map_grid,
    front_data,
    hypervolume_2d,
    hypervolume_over_trials,
    kendall_tau,
    pareto_front,
    proxy_fidelity,
)


def _table(points, feasible=None):
    table = pd.DataFrame(points, columns=["proxy", "params"])
    table["number"] = range(len(table))
    if feasible is not None:
        table["feasible"] = feasible
    return table


def test_front_membership_on_hand_made_points():
    points = [
        (1.0, 5.0),  # on the front (best proxy)
        (2.0, 3.0),  # on the front
        (3.0, 4.0),  # dominated by (2, 3)
        (4.0, 1.0),  # on the front (cheapest)
        (2.0, 3.0),  # duplicate of row 1: only the first is kept
        (0.5, 0.5),  # would dominate everything, but infeasible
        (math.nan, 0.1),  # no score: never on the front
        (2.5, 2.0),  # on the front
    ]
    feasible = [True, True, True, True, True, False, True, True]
    mask = pareto_front(_table(points, feasible), ("proxy", "params"))
    assert mask.tolist() == [True, True, False, True, False, False, False, True]


def test_front_without_feasible_column_uses_every_row():
    mask = pareto_front(_table([(0.5, 0.5), (1.0, 1.0)]), ("proxy", "params"))
    assert mask.tolist() == [True, False]


def test_front_matches_brute_force_dominance():
    rng = np.random.default_rng(3)
    points = rng.integers(0, 6, size=(40, 2)).astype(float)  # many ties on purpose
    mask = pareto_front(_table(points), ("proxy", "params"))
    for i, p in enumerate(points):
        dominated = any((q <= p).all() and (q < p).any() for j, q in enumerate(points) if j != i)
        duplicate_before = any((points[j] == p).all() for j in range(i))
        assert mask[i] == (not dominated and not duplicate_before)


def test_front_rejects_wrong_objectives():
    with pytest.raises(ValueError, match="len\\(objectives\\) == 2"):
        pareto_front(_table([(1.0, 1.0)]), ("proxy",))
    with pytest.raises(ValueError, match="not columns"):
        pareto_front(_table([(1.0, 1.0)]), ("proxy", "latency_ms"))


def test_hypervolume_of_known_sets():
    assert hypervolume_2d([(1, 1)], (3, 3)) == pytest.approx(4.0)
    # Two rectangles of area 2 overlapping in a unit square.
    assert hypervolume_2d([(1, 2), (2, 1)], (3, 3)) == pytest.approx(3.0)
    # A dominated point and points beyond the reference add nothing.
    assert hypervolume_2d([(1, 2), (2, 1), (2, 2), (5, 0), (0, 3)], (3, 3)) == pytest.approx(3.0)
    assert hypervolume_2d([], (3, 3)) == 0.0
    assert hypervolume_2d([(math.nan, 1.0)], (3, 3)) == 0.0


def test_hypervolume_matches_counting_unit_cells():
    rng = np.random.default_rng(0)
    points = rng.integers(0, 10, size=(15, 2))
    reference = (10, 10)
    cells = sum(
        any(px <= x and py <= y for px, py in points)
        for x, y in itertools.product(range(10), range(10))
    )
    assert hypervolume_2d(points, reference) == pytest.approx(float(cells))


def test_hypervolume_over_trials_rises_to_the_final_front():
    points = [(3.0, 3.0), (0.1, 0.1), (2.0, 1.0), (1.0, 2.0), (4.0, 0.5)]
    feasible = [True, False, True, True, True]
    trace = hypervolume_over_trials(_table(points, feasible), ("proxy", "params"))
    assert trace.numbers.tolist() == [0, 1, 2, 3, 4]
    assert np.all(np.diff(trace.hypervolume) >= 0)
    # The infeasible trial 1 adds nothing although it dominates everything.
    assert trace.hypervolume[1] == trace.hypervolume[0]
    feasible_points = [p for p, ok in zip(points, feasible, strict=True) if ok]
    assert trace.hypervolume[-1] == pytest.approx(hypervolume_2d(feasible_points, trace.reference))
    # Default reference: worst value plus 10 % of the range of each objective.
    assert trace.reference == pytest.approx((4.0 + 0.1 * 3.9, 3.0 + 0.1 * 2.9))


def test_kendall_tau_on_known_orderings():
    proxy = [0.1, 0.2, 0.3, 0.4]
    assert kendall_tau(proxy, [0.9, 0.8, 0.7, 0.6]) == pytest.approx(1.0)
    assert kendall_tau(proxy, [0.6, 0.7, 0.8, 0.9]) == pytest.approx(-1.0)
    # One discordant pair of six: (5 - 1) / 6.
    assert kendall_tau(proxy, [0.9, 0.7, 0.8, 0.6]) == pytest.approx(4 / 6)
    assert math.isnan(kendall_tau([0.1, 0.2], [0.9, 0.8]))


def test_proxy_fidelity_of_winners():
    winners = pd.DataFrame(
        {
            "label": ["W1", "W2", "W3"],
            "proxy": [0.1, 0.2, 0.3],
            "finetuned_accuracy": [0.9, 0.8, 0.7],
        }
    )
    data = proxy_fidelity(winners)
    assert data.labels == ["W1", "W2", "W3"]
    assert data.kendall_tau == pytest.approx(1.0) and data.n == 3
    assert proxy_fidelity(winners.iloc[0:0]).n == 0


def test_front_data_marks_baselines_winners_and_front():
    table = _table([(1.0, 5.0), (2.0, 3.0), (3.0, 4.0), (4.0, 1.0)], [True, True, True, False])
    table["baseline"] = [None, "tome", None, None]
    winners = pd.DataFrame({"number": [1], "label": ["W1"], "finetuned_accuracy": [0.93]})
    data = front_data(table, "params", "proxy", winners, budget=4.5)
    assert data.front["number"].tolist() == [1, 0]  # by rising params; trial 3 is infeasible
    assert data.baselines["baseline"].tolist() == ["tome"]
    assert data.winners[["number", "label", "finetuned_accuracy"]].values.tolist() == [
        [1, "W1", 0.93]
    ]
    assert data.budget == 4.5


def _config(blocks):
    from vitrank.core.structure import inspect_vit
    from vitrank.spaces import CompressionConfig

    from tests.conftest import make_tiny_vit

    model = make_tiny_vit(depth=len(blocks))  # dim 32, 2 heads of 16, hidden 128, 16+1 tokens
    return CompressionConfig("vit_small_patch16_224", {}, inspect_vit(model), tuple(blocks))


def test_block_map_rows_and_fractions_kept():
    from vitrank.core.spec import AttentionSpec, BlockSpec, MlpSpec

    config = _config(
        [
            BlockSpec(),
            BlockSpec(
                AttentionSpec("heads", qk_rank=4, vo_rank=8),
                MlpSpec("prune", hidden_kept=64),
                merge_ratio=0.25,
            ),
        ]
    )
    table = block_map({"W1": config})
    assert len(table) == 2 * 3
    dense = table[table["block"] == 0]
    assert dense["kept"].tolist() == [1.0, 1.0, 1.0]
    assert dense["choice"].tolist() == ["dense", "dense", "17 tokens"]
    row = table[(table["block"] == 1)].set_index("part")
    # heads: q', k' are (d+1 -> H r_qk) with bias, the key map (H r_qk -> d_h), v (d -> H r_vo),
    # o (H r_vo -> d) with bias
    d = 32
    heads = 2 * (d * 2 * 4 + 2 * 4) + 2 * 4 * 16 + d * 2 * 8 + 2 * 8 * d + d
    assert row.loc["attention", "kept"] == pytest.approx(heads / (d * 3 * d + 3 * d + d * d + d))
    assert row.loc["mlp", "kept"] == pytest.approx(
        (d * 64 + 64 + 64 * d + d) / (d * 128 + 128 + 128 * d + d)
    )
    assert row.loc["mlp", "keep_ratio"] == 0.5
    assert row.loc["tokens", "merge_ratio"] == 0.25
    assert row.loc["tokens", "kept"] == pytest.approx(13 / 17)  # 4 of 16 patches merged
    grid = block_map_grid(table)
    assert grid.rows == ["W1 · attention", "W1 · mlp", "W1 · tokens"]
    assert grid.blocks == [0, 1]
    assert grid.text[1, 1] == "prune 64/128 units"


def test_hover_text_of_a_trial_that_never_ran() -> None:
    """An enqueued baseline left waiting has NaN cells, not a config: no crash, no 'nan'."""
    from vitrank.reports._run import trial_summary

    text = trial_summary({"number": 4, "baseline": math.nan, "proxy": math.nan, "config": math.nan})
    assert text == "<b>trial 4</b>"
    assert "trial 3</b> (baseline asvd)" in trial_summary(
        {"number": 3, "baseline": "asvd", "proxy": 0.5, "config": math.nan}
    )


def test_the_block_map_shows_every_operators_own_knobs():
    """Each row holds what its operator declares (`Operator.knobs`), read from the registry:
    a new operator's knobs reach the report without the report naming them."""
    from vitrank.core.operators import OPERATORS
    from vitrank.core.spec import AttentionSpec, BlockSpec, MlpSpec
    from vitrank.reports._data import block_map_columns

    columns = block_map_columns()
    for _, op in OPERATORS.items():
        assert set(op.knobs) <= set(columns), op
    config = _config(
        [
            BlockSpec(AttentionSpec("prune", heads_kept=1), MlpSpec("lowrank", fc1_rank=8, fc2_rank=16)),
            BlockSpec(AttentionSpec("lowrank", qkv_rank=8, proj_rank=16), MlpSpec("prune", hidden_kept=64)),
        ]
    )  # fmt: skip
    table = block_map({"W": config}).set_index(["block", "part"])
    assert table.loc[(0, "attention"), "heads_kept"] == 1
    assert table.loc[(0, "mlp"), ["fc1_rank", "fc2_rank"]].tolist() == [8, 16]
    assert table.loc[(1, "attention"), ["qkv_rank", "proj_rank"]].tolist() == [8, 16]
    assert table.loc[(1, "mlp"), "hidden_kept"] == 64
    assert pd.isna(table.loc[(1, "mlp"), "fc1_rank"])  # not this operator's knob
