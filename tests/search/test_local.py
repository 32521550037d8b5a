"""Local refinement: neighbours stay feasible and on the grids; the sampler's phases."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
from vitrank.search import SearchSettings, run_search
from vitrank.search._local import LocalSearchSampler, _knob_steps, _step, neighbour
from vitrank.search.baselines import raw_expressible
from vitrank.spaces import CONFIG_ATTR, CompressionConfig, SpaceFunction, raw_params

from tests.search.conftest import tiny_settings


def _feasible_start(problem: Any, seed: int = 0) -> CompressionConfig:
    rng = random.Random(seed)
    limit = problem.budget.limit(problem.space)
    while True:
        config = problem.space.random_config(rng)
        if problem.budget.cost(config) <= limit:
            return config


def test_neighbours_spend_the_budget_without_exceeding_it(tiny_problem: Any) -> None:
    space, budget = tiny_problem.space, tiny_problem.budget
    limit = budget.limit(space)
    start = _feasible_start(tiny_problem)
    rng = random.Random(1)
    distinct = set()
    for _ in range(40):
        candidate = neighbour(start, space.blocks, budget.cost, limit, rng)
        assert budget.cost(candidate) <= limit
        assert raw_expressible(candidate, space)
        # Filled: no single step up still fits.
        for move in _knob_steps(candidate, space.blocks, up=True):
            assert budget.cost(_step(candidate, space.blocks, move, True, rng)) > limit
        distinct.add(candidate.to_json(indent=None))
    assert len(distinct) > 5


def test_a_step_down_never_raises_the_cost(tiny_problem: Any) -> None:
    space, budget = tiny_problem.space, tiny_problem.budget
    rng = random.Random(2)
    for seed in range(10):
        config = space.random_config(random.Random(seed))
        for move in _knob_steps(config, space.blocks, up=False):
            lower = _step(config, space.blocks, move, False, rng)
            assert budget.cost(lower) <= budget.cost(config)


def _study(problem: Any, start_after: int) -> tuple[optuna.Study, LocalSearchSampler]:
    sampler = LocalSearchSampler(
        optuna.samplers.RandomSampler(seed=0), problem.space_fn, start_after, seed=0
    )
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    return study, sampler


def _objective(problem: Any) -> Any:
    def objective(trial: optuna.Trial) -> tuple[float, float]:
        problem.define(trial)
        config = CompressionConfig.from_json(trial.user_attrs[CONFIG_ATTR])
        # A cheap stand-in for the proxy: the fewer parameters, the worse.
        params = float(problem.costs(config)["params"])
        return -params, params

    return objective


def test_after_exploring_every_trial_is_a_new_feasible_neighbour(tiny_problem: Any) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, _ = _study(tiny_problem, start_after=6)
    study.optimize(_objective(tiny_problem), n_trials=20)
    trials = study.trials
    refined = trials[6:]
    assert all(t.user_attrs["violation"] <= 0 for t in refined)
    configs = [t.user_attrs[CONFIG_ATTR] for t in trials]
    assert len(set(configs[6:])) == len(configs[6:])
    assert not set(configs[6:]) & set(configs[:6])
    # The refined trials beat the explored ones on the objective (more params within budget).
    explored_best = min(t.values[0] for t in trials[:6] if t.user_attrs["violation"] <= 0)
    assert min(t.values[0] for t in refined) <= explored_best


def test_enqueued_trials_keep_their_parameters(tiny_problem: Any) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, _ = _study(tiny_problem, start_after=1)
    study.optimize(_objective(tiny_problem), n_trials=3)
    fixed = raw_params(_feasible_start(tiny_problem, seed=5), tiny_problem.space)
    study.enqueue_trial(fixed)
    study.optimize(_objective(tiny_problem), n_trials=1)
    last = study.trials[-1]
    assert {k: last.params[k] for k in last.params} == {k: fixed[k] for k in last.params}


def test_refinement_needs_the_raw_parametrization(tiny_problem: Any) -> None:
    budgeted = SpaceFunction(tiny_problem.space, tiny_problem.budget, "budgeted")
    with pytest.raises(ValueError, match="raw parametrization"):
        LocalSearchSampler(optuna.samplers.RandomSampler(), budgeted, 5)


def test_refine_must_be_a_fraction_below_one() -> None:
    with pytest.raises(ValueError, match="refine"):
        SearchSettings(refine=1.0)


def test_a_search_refines_its_second_half(tmp_path: Path, workload: Any) -> None:
    run = run_search(
        tiny_settings(tmp_path / "run", trials=12, refine=0.5, finetune_top=0),
        workload,
        log=lambda message: None,
    )
    table = pd.read_parquet(run / "trials.parquet").sort_values("number")
    assert table["baseline"].iloc[:3].notna().all()  # the warm start comes first
    second_half = table[table["number"] >= 6]
    assert len(second_half) == 6 and second_half["feasible"].all()
    assert table["config"].is_unique


def test_with_no_feasible_trial_yet_it_repairs_the_closest_ones(tiny_problem: Any) -> None:
    """A tight budget that no explored trial (and no baseline) met: refinement starts from
    the trials closest to the budget and repairs them into it, instead of leaving the
    search to end with nothing feasible."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space, budget = tiny_problem.space, tiny_problem.budget
    limit = budget.limit(space)
    rng = random.Random(3)
    over: list[CompressionConfig] = []
    while len(over) < 4:
        config = space.random_config(rng)
        if budget.cost(config) > limit and raw_expressible(config, space):
            over.append(config)
    study, _ = _study(tiny_problem, start_after=4)
    for config in over:
        study.enqueue_trial(raw_params(config, space))
    study.optimize(_objective(tiny_problem), n_trials=10)
    trials = study.trials
    assert all(t.user_attrs["violation"] > 0 for t in trials[:4])
    assert all(t.user_attrs["violation"] <= 0 for t in trials[4:])
    assert len({t.user_attrs[CONFIG_ATTR] for t in trials}) == len(trials)
