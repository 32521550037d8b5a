"""Define-by-run parametrizations: raw knobs with a budget constraint, budgeted allocation."""

from __future__ import annotations

import pickle
from typing import Any

import optuna
import pytest
from _spaces_cases import variant_space
from vitrank.core.spec import BlockSpec
from vitrank.spaces import (
    Budget,
    CompressionConfig,
    SpaceFunction,
    count_flops,
    count_params,
    raw_params,
)
from vitrank.spaces._parametrize import ladder

optuna.logging.set_verbosity(optuna.logging.WARNING)


def run_study(fn: SpaceFunction, trials: int, seed: int = 0) -> optuna.Study:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    study.optimize(lambda trial: fn(trial) and 0.0, n_trials=trials)
    return study


def configs(study: optuna.Study) -> list[CompressionConfig]:
    return [CompressionConfig.from_json(t.user_attrs["config"]) for t in study.trials]


def assert_within_one_step(config: CompressionConfig, space, budget: Budget) -> None:
    """Under the limit, and one more step of any non-dense part would break it."""
    limit = budget.limit(space)
    assert budget.cost(config) <= limit
    for i, (block, choice) in enumerate(zip(config.blocks, space.blocks, strict=True)):
        for kind in ("attn", "mlp"):
            spec = getattr(block, kind)
            if spec.op == "dense":
                continue
            steps = ladder(choice, kind, spec.op)
            bigger = steps[steps.index(spec) + 1]
            blocks = list(config.blocks)
            blocks[i] = BlockSpec(
                bigger if kind == "attn" else block.attn,
                bigger if kind == "mlp" else block.mlp,
                block.merge_ratio,
            )
            assert budget.cost(config.replace(blocks=tuple(blocks))) > limit, (i, kind)


@pytest.mark.parametrize("fraction", [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
def test_budgeted_hits_params_budgets_within_one_step(fraction: float) -> None:
    space = variant_space("deit_distilled")
    budget = Budget("params", fraction)
    study = run_study(SpaceFunction(space, budget, "budgeted"), trials=6, seed=int(fraction * 10))
    for trial, config in zip(study.trials, configs(study), strict=True):
        assert_within_one_step(config, space, budget)
        assert trial.system_attrs["constraints:budget"] <= 0
        assert count_params(config) >= 0.9 * budget.limit(space)


def test_budgeted_flops_budget_and_cheapest_fallback() -> None:
    space = variant_space("vit")
    budget = Budget("flops", 0.3)
    study = run_study(SpaceFunction(space, budget, "budgeted"), trials=8)
    for config in configs(study):
        assert count_flops(config) <= budget.limit(space)
    # Shares of zero on the most expensive operators still end feasible.
    fn = SpaceFunction(space, Budget("params", 0.2), "budgeted")
    params: dict[str, Any] = {}
    for i in range(len(space.blocks)):
        params |= {f"blocks.{i}.attn.op": "lowrank", f"blocks.{i}.attn.share": 0.0}
        params |= {f"blocks.{i}.mlp.op": "lowrank", f"blocks.{i}.mlp.share": 0.0}
        params[f"blocks.{i}.merge_ratio"] = 0.0
    config = fn.config_of(params)
    assert count_params(config) <= Budget("params", 0.2).limit(space)


def test_budgeted_shares_steer_the_allocation() -> None:
    space = variant_space("vit")
    fn = SpaceFunction(space, Budget("params", 0.6), "budgeted")
    params: dict[str, Any] = {}
    for i in range(len(space.blocks)):
        params |= {f"blocks.{i}.attn.op": "lowrank", f"blocks.{i}.mlp.op": "lowrank"}
        params |= {f"blocks.{i}.attn.share": 0.2, f"blocks.{i}.mlp.share": 0.2}
        params[f"blocks.{i}.merge_ratio"] = 0.0
    params["blocks.0.mlp.share"] = 1.0
    config = fn.config_of(params)
    assert config.blocks[0].mlp.op == "dense" or config.blocks[0].mlp.fc1_rank >= max(
        b.mlp.fc1_rank for b in config.blocks[1:]
    )


def test_raw_sets_the_budget_constraint_and_user_attr() -> None:
    space = variant_space("vit")
    budget = Budget("params", 0.5)
    fn = SpaceFunction(space, budget, "raw")
    study = run_study(fn, trials=20)
    feasible = 0
    for trial, config in zip(study.trials, configs(study), strict=True):
        excess = trial.system_attrs["constraints:budget"]
        assert excess == pytest.approx(count_params(config) / budget.limit(space) - 1)
        feasible += excess <= 0
        assert fn.config_of(trial.params) == config
        assert fn.config_of(raw_params(config, space)) == config
    assert 0 < feasible < 20  # the raw space reaches both sides of the budget


def test_budgeted_config_replays_from_params() -> None:
    space = variant_space("reg_gap")
    fn = SpaceFunction(space, Budget("params", 0.5), "budgeted")
    study = run_study(fn, trials=4)
    for trial, config in zip(study.trials, configs(study), strict=True):
        assert fn.config_of(trial.params) == config


class Captor:
    """What Ray Tune's OptunaSearch hands the space function: a wrapper around the trial."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def __getattr__(self, name: str) -> Any:
        return getattr(self.trial, name)


def test_space_function_pickles_and_returns_a_flat_dict() -> None:
    space = variant_space("vit")
    fn = SpaceFunction(space, Budget("params", 0.5), "budgeted")
    copy = pickle.loads(pickle.dumps(fn))
    study = optuna.create_study()
    trial = study.ask()
    result = copy(Captor(trial))
    assert set(result) == {"config"}
    config = CompressionConfig.from_json(result["config"])
    assert config.fingerprint == space.fingerprint
    assert trial.user_attrs["config"] == result["config"]


def test_space_function_refusals() -> None:
    space = variant_space("vit")
    with pytest.raises(ValueError, match=r"unknown parametrization 'grid'; known: raw"):
        SpaceFunction(space, None, "grid")
    with pytest.raises(ValueError, match="needs a budget"):
        SpaceFunction(space, None, "budgeted")
    with pytest.raises(ValueError, match="latency table"):
        SpaceFunction(space, Budget("latency", 3.0), "raw")
