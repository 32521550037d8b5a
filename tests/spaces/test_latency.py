"""Latency tables: measured operators, interpolation, prediction, latency budgets."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from _spaces_cases import random_specs, variant_model, variant_space
from vitrank.spaces import (
    Budget,
    LatencyTable,
    SpaceFunction,
    check_feasible,
    measure_latency_table,
    predict_latency,
)
from vitrank.spaces._cost import attention_core, attention_linears, mlp_linears
from vitrank.spaces._latency import _fit_line, _operators, _token_grid, operator_sum


@pytest.fixture(scope="module")
def measured() -> tuple:
    model = variant_model("vit")
    space = variant_space("vit")
    table = measure_latency_table(
        model, space.fingerprint, "cpu", batch=2, threads=1, space=space,
        token_points=3, rank_points=2, warmup=1, repeats=3,
    )  # fmt: skip
    return space, table


def test_measured_table(measured: tuple, tmp_path: Path) -> None:
    space, table = measured
    assert table.threads == 1 and table.clock == "thread" and table.batch == 2
    assert table.tokens[0] < table.tokens[-1] == space.fingerprint.num_tokens
    assert {"linear/32/96", "attend/2/16/fused", "attend/2/16/sized", "merge/32"} <= set(
        table.entries
    )
    assert "glue/attn/heads/32/sized" in table.entries and "glue/mlp/prune/32" in table.entries
    assert "glue/block/plain/32" in table.entries and "glue/block/merged/32" in table.entries
    assert all(len(v) == len(table.tokens) for v in table.entries.values())
    assert table.machine["torch"] and table.date
    # Whole calibration models fit the line from operator sums to measured times.
    assert len(table.calibration) == 10 and table.scale > 0
    assert table.calibration[0][1] == table.dense_ms
    dense_sum = operator_sum(space.dense(), table)
    assert table.calibration[0][0] == pytest.approx(dense_sum)
    expected = table.offset_ms + table.scale * dense_sum
    assert predict_latency(space.dense(), table) == pytest.approx(expected)
    loaded = LatencyTable.load(table.save(tmp_path / "table.json"))
    assert loaded == table
    rng = random.Random(0)
    for _ in range(10):
        assert predict_latency(space.config(random_specs(space, rng)), table) > 0


def test_table_for_another_model_is_refused(measured: tuple) -> None:
    _, table = measured
    other = variant_space("deit_distilled")
    with pytest.raises(ValueError, match="measure a table for this model"):
        predict_latency(other.dense(), table)
    data = table.to_dict() | {"version": 0}
    with pytest.raises(ValueError, match="version == 1"):
        LatencyTable.from_dict(data)


def synthetic(space) -> LatencyTable:
    """A table whose operators cost a known bilinear function, so interpolation is exact."""
    fp = space.fingerprint
    tokens = _token_grid(fp, space, 3)
    entries: dict[str, list[float]] = {}
    for index, shape in enumerate(fp.blocks):
        ops = _operators(space, shape, index, 2)
        for a, b in ops["linear"]:
            entries[f"linear/{a}/{b}"] = [a * b * n * 1e-6 for n in tokens]
        for heads, width in ops["attend"]:
            for tag, factor in (("fused", 1.0), ("sized", 2.0)):
                entries[f"attend/{heads}/{width}/{tag}"] = [
                    factor * heads * width * n * 1e-5 for n in tokens
                ]
        for width in ops["gelu"]:
            entries[f"gelu/{width}/0"] = [width * n * 1e-7 for n in tokens]
        entries[f"norm/{shape.dim}"] = [shape.dim * n * 1e-7 for n in tokens]
        entries[f"merge/{shape.dim}"] = [n * 1e-4 for n in tokens]
    return LatencyTable("cpu", 1, 1, fp.digest, tokens, entries, 0.5, 0.25, 0.0, scale=1.0)


def expected_ms(config, space) -> float:
    fp = space.fingerprint
    counts = config.token_schedule
    total = 0.75
    for i, (shape, spec) in enumerate(zip(fp.blocks, config.blocks, strict=True)):
        n, m = counts[i], counts[i + 1]
        core = attention_core(shape, spec.attn)
        factor = 2.0 if n < counts[0] else 1.0
        total += factor * core.heads * (core.qk_dim + core.v_dim) / 2 * n * 1e-5
        total += sum(
            x.in_features * x.out_features * n * 1e-6
            for x in attention_linears(shape, spec.attn, spec.merge_ratio > 0)
        )
        mlp = mlp_linears(shape, spec.mlp)
        total += sum(x.in_features * x.out_features * m * 1e-6 for x in mlp)
        total += mlp[0].out_features * m * 1e-7 + shape.dim * (n + m) * 1e-7
        total += n * 1e-4 if m < n else 0.0
    return total


def test_prediction_sums_interpolated_operators() -> None:
    space = variant_space("vit")
    table = synthetic(space)
    rng = random.Random(3)
    for _ in range(25):
        config = space.config(random_specs(space, rng))
        assert predict_latency(config, table) == pytest.approx(expected_ms(config, space))


def test_latency_budget() -> None:
    space = variant_space("vit")
    table = synthetic(space)
    limit = 0.5 * (
        predict_latency(space.dense(), table) + predict_latency(space.smallest("flops"), table)
    )
    budget = Budget("latency", limit, True, 1, "cpu")
    check_feasible(space, budget, table)
    with pytest.raises(ValueError, match="smallest the space reaches is"):
        check_feasible(space, Budget("latency", 0.01), table)
    with pytest.raises(ValueError, match="batch 4"):
        budget_b4 = Budget("latency", limit, True, 4, "cpu")
        budget_b4.cost(space.dense(), table)
    fn = SpaceFunction(space, budget, "budgeted", latency_table=table)
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda trial: fn(trial) and 0.0, n_trials=5)
    for trial in study.trials:
        assert trial.system_attrs["constraints:budget"] <= 0


def test_fit_line() -> None:
    assert _fit_line([[1.0, 3.0], [2.0, 5.0], [4.0, 9.0]]) == pytest.approx((1.0, 2.0))
    # No slope to fit (one point, or a falling line from noise): a constant offset.
    assert _fit_line([[2.0, 3.0]]) == pytest.approx((1.0, 1.0))
    assert _fit_line([[1.0, 5.0], [2.0, 4.0]]) == pytest.approx((3.0, 1.0))
