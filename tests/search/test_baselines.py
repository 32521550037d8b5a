from __future__ import annotations

from typing import Any

import pytest
from vitrank.core.spec import BlockSpec
from vitrank.search import BASELINES, BaselineInputs, BaselineUnavailable, run_baselines
from vitrank.search.baselines import raw_expressible
from vitrank.spaces import count_flops, parse_budget


def _inputs(problem: Any, budget: str = "0.5", kind: str = "params") -> BaselineInputs:
    return BaselineInputs(
        space=problem.space,
        budget=parse_budget(budget, kind=kind),
        score=problem.proxy("whitened").score,
        spectral=problem.proxy("whitened", "spectral").score,
        feature_error=problem.feature_error(),
    )


@pytest.mark.parametrize("name", sorted(set(BASELINES) - {"tome"}))
@pytest.mark.parametrize("budget", ["0.5", "0.35"])
def test_rank_baselines_meet_the_budget(tiny_problem: Any, name: str, budget: str) -> None:
    inputs = _inputs(tiny_problem, budget)
    config = BASELINES[name](inputs)
    assert inputs.cost(config) <= inputs.budget.limit(inputs.space)
    # At the budget, not far below it: one more step of any kind would not fit.
    assert inputs.cost(config) > 0.5 * inputs.budget.limit(inputs.space)


def test_uniform_baselines_share_one_rank_and_differ_in_svd(tiny_problem: Any) -> None:
    inputs = _inputs(tiny_problem)
    plain, whitened = BASELINES["uniform-plain"](inputs), BASELINES["uniform-whitened"](inputs)
    assert (plain.svd, whitened.svd) == ("plain", "whitened")
    assert plain.blocks == whitened.blocks
    ranks = {getattr(b.attn, f"{n}_rank") for b in plain.blocks for n in ("qkv", "proj")}
    ranks |= {getattr(b.mlp, f"{n}_rank") for b in plain.blocks for n in ("fc1", "fc2")}
    assert len(ranks) == 1


def test_greedy_beats_uniform_on_the_spectral_proxy(tiny_problem: Any) -> None:
    inputs = _inputs(tiny_problem)
    greedy = BASELINES["greedy"](inputs)
    uniform = BASELINES["uniform-whitened"](inputs)
    assert inputs.spectral(greedy) <= inputs.spectral(uniform)


def test_tome_cannot_meet_a_params_budget_but_meets_a_flops_one(tiny_problem: Any) -> None:
    with pytest.raises(BaselineUnavailable, match="no parameters"):
        BASELINES["tome"](_inputs(tiny_problem))
    inputs = _inputs(tiny_problem, "0.9", "flops")
    config = BASELINES["tome"](inputs)
    assert {b.merge_ratio for b in config.blocks} != {0.0}
    assert len({b.merge_ratio for b in config.blocks}) == 1
    assert inputs.fits(config)


def test_tome_merges_beyond_the_search_grid_to_meet_a_tight_flops_budget(
    tiny_problem: Any,
) -> None:
    """As ToMe picks its r for a speed target: past the grid's top ratio, up to half the
    tokens, the smallest ratio that fits."""
    space = tiny_problem.space
    top = max(r for c in space.blocks for r in c.merge_ratios)
    at_top = space.config([BlockSpec(merge_ratio=top) for _ in space.blocks])
    at_half = space.config([BlockSpec(merge_ratio=0.4999) for _ in space.blocks])
    dense = count_flops(space.dense())
    assert count_flops(at_half) < count_flops(at_top)  # merging more saves more here
    fraction = (count_flops(at_half) + count_flops(at_top)) / 2 / dense
    inputs = _inputs(tiny_problem, f"{fraction}", "flops")
    config = BASELINES["tome"](inputs)
    ratio = config.blocks[0].merge_ratio
    assert top < ratio < 0.5 and inputs.fits(config)
    smaller = space.config([BlockSpec(merge_ratio=ratio - 0.01) for _ in space.blocks])
    assert not inputs.fits(smaller)
    too_tight = _inputs(tiny_problem, f"{count_flops(at_half) / dense * 0.5}", "flops")
    with pytest.raises(BaselineUnavailable, match="half of the tokens"):
        BASELINES["tome"](too_tight)


def test_flar_accepts_ranks_under_one_threshold_that_is_bisected_to_the_budget(
    tiny_problem: Any,
) -> None:
    inputs = _inputs(tiny_problem, "0.5")
    config = BASELINES["flar"](inputs)
    assert inputs.fits(config)
    error = inputs.feature_error
    assert error is not None
    # Every compressed Linear alone stays under one threshold, and the next rank down of
    # some Linear would exceed it (else a lower threshold would still fit the budget).
    from vitrank.search.baselines import LINEARS, _grids, ranks_config

    grids = _grids(inputs.space)
    chosen = []
    for i, block in enumerate(config.blocks):
        for name in LINEARS:
            spec = block.attn if name in ("qkv", "proj") else block.mlp
            rank = getattr(spec, f"{name}_rank")
            if rank:
                ranks = [dict.fromkeys(LINEARS, 0) for _ in grids]
                ranks[i][name] = rank
                chosen.append(error(ranks_config(inputs.space, ranks)))
    assert chosen, "flar compressed nothing at half the parameters"
    # A tighter budget needs a looser threshold: more error allowed per Linear.
    tighter = BASELINES["flar"](_inputs(tiny_problem, "0.35"))
    assert inputs.cost(tighter) < inputs.cost(config)
    with pytest.raises(BaselineUnavailable, match="features"):
        BASELINES["flar"](
            BaselineInputs(inputs.space, inputs.budget, inputs.score, inputs.spectral)
        )


def test_run_baselines_reports_why_one_is_skipped(tiny_problem: Any) -> None:
    configs, skipped = run_baselines(_inputs(tiny_problem))
    assert set(configs) == set(BASELINES) - {"tome"}
    assert "tome" in skipped


def test_only_grid_configs_are_raw_expressible(tiny_problem: Any) -> None:
    inputs = _inputs(tiny_problem)
    space = tiny_problem.space
    assert raw_expressible(BASELINES["uniform-whitened"](inputs), space)
    assert not raw_expressible(BASELINES["uniform-plain"](inputs), space)  # svd differs
