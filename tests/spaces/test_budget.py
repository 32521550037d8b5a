"""Budgets: parsing, limits, and infeasible budgets refused before any search."""

from __future__ import annotations

import pytest
from _spaces_cases import variant_space
from vitrank.spaces import Budget, check_feasible, parse_budget


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0.5, Budget("params", 0.5)),
        ("0.5", Budget("params", 0.5)),
        ("params=0.3", Budget("params", 0.3)),
        ("11M", Budget("params", 11e6, absolute=True)),
        ("11e6", Budget("params", 11e6, absolute=True)),
        ("params=2.5k", Budget("params", 2500, absolute=True)),
        ("flops=0.4", Budget("flops", 0.4)),
        ("20ms", Budget("latency", 20.0, True)),
        ("latency=7.5ms@8/cuda", Budget("latency", 7.5, True, 8, "cuda")),
    ],
)
def test_parse_budget(text: object, expected: Budget) -> None:
    assert parse_budget(text) == expected


def test_parse_budget_refusals() -> None:
    with pytest.raises(ValueError, match="Cannot read a budget value from 'half'"):
        parse_budget("half")
    with pytest.raises(ValueError, match=r"Unknown budget kind 'memory'.*known"):
        parse_budget("memory=0.5")
    with pytest.raises(ValueError, match="value > 0"):
        parse_budget(0.0)
    with pytest.raises(ValueError, match="fraction must hold"):
        Budget("flops", 1.5)
    assert parse_budget(20, kind="latency", batch=4) == Budget("latency", 20.0, True, 4)


def test_limits() -> None:
    space = variant_space("vit")
    assert Budget("params", 0.5).limit(space) == 0.5 * space.dense_params
    assert Budget("params", 1234, absolute=True).limit(space) == 1234
    assert Budget("flops", 0.25).limit(space) == 0.25 * space.dense_flops
    assert Budget("params", 0.5).violation(space.dense(), space) == pytest.approx(1.0)


def test_infeasible_budgets_say_the_smallest_reachable() -> None:
    space = variant_space("vit")
    smallest = space.min_params
    check_feasible(space, Budget("params", smallest, absolute=True))
    with pytest.raises(ValueError) as error:
        check_feasible(space, Budget("params", smallest - 1, absolute=True))
    message = str(error.value)
    assert f"smallest the space reaches is {smallest:,} params" in message
    assert "Raise the budget" in message
    with pytest.raises(ValueError, match=f"{space.min_flops:,} FLOPs"):
        check_feasible(space, Budget("flops", 0.9 * space.min_flops / space.dense_flops))
    lowrank_only = variant_space("vit", ops=("lowrank",))
    with pytest.raises(ValueError, match="infeasible"):
        check_feasible(lowrank_only, Budget("params", 0.1))
    with pytest.raises(ValueError, match="needs a latency table"):
        check_feasible(space, Budget("latency", 1.0))


def test_smallest_latency_is_found_where_compression_is_slower(monkeypatch) -> None:
    """On a tiny model a compressed block can be slower than the dense one."""
    from vitrank.spaces._budget import smallest_reachable

    space = variant_space("vit")

    def fake_latency(self, config, latency_table=None) -> float:
        # Dense blocks cost 1 ms, compressed ones 2 ms, except block 0's compression (0.5 ms).
        return sum(
            1.0 if spec.is_dense else (0.5 if index == 0 else 2.0)
            for index, spec in enumerate(config.blocks)
        )

    monkeypatch.setattr(Budget, "cost", fake_latency)
    budget = Budget("latency", 100.0)
    reachable, config = smallest_reachable(space, budget, latency_table=object())
    blocks = len(space.blocks)
    assert reachable == pytest.approx(0.5 + (blocks - 1))
    assert not config.blocks[0].is_dense
    assert all(spec.is_dense for spec in config.blocks[1:])


@pytest.mark.parametrize("value", ["1.5", 1.5, "params=2.5", "1234.5", "flops=1.5"])
def test_a_value_above_one_with_a_fraction_part_is_neither_fraction_nor_count(value) -> None:
    with pytest.raises(ValueError, match=r"above 1 is a count and must be whole.*0 < value <= 1"):
        parse_budget(value)


def test_counts_are_exact_and_negative_values_break_the_positive_rule() -> None:
    assert parse_budget("2.01M") == Budget("params", 2_010_000, absolute=True)
    assert parse_budget("1.5k") == Budget("params", 1500, absolute=True)
    for value in ("-1", "-0.5", "params=-11M", -1, "-20ms"):
        with pytest.raises(ValueError, match=r"`value > 0` must hold"):
            parse_budget(value)


def test_a_budget_the_dense_teacher_meets_is_refused_with_its_count() -> None:
    space = variant_space("vit")
    dense = space.dense_params
    for budget in (Budget("params", 11e6, absolute=True), Budget("params", dense, True)):
        with pytest.raises(ValueError) as error:
            check_feasible(space, budget)
        message = str(error.value)
        assert f"at or above the dense teacher's {dense:,} parameters" in message
        assert "nothing to compress" in message
    with pytest.raises(ValueError, match="nothing to compress"):
        check_feasible(space, Budget("params", 1.0))
    with pytest.raises(ValueError, match=f"{space.dense_flops:,} FLOPs"):
        check_feasible(space, Budget("flops", 1.0))
    check_feasible(space, Budget("params", dense - 1, True))
