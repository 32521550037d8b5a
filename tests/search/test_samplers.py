from __future__ import annotations

import optuna
import pytest
from vitrank.search import BASELINES, SAMPLERS, make_sampler


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_runs_a_constrained_two_objective_study(name: str) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=make_sampler(name, 0))

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        x = trial.suggest_int("x", 0, 8, step=2)
        trial.set_constraint("budget", x - 6.0)
        return (8 - x) ** 2, float(x)

    study.optimize(objective, n_trials=6)
    assert len(study.trials) == 6
    assert all(t.state.name == "COMPLETE" for t in study.trials)


def test_unknown_sampler_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="tpe.*nsga2.*gp.*random"):
        make_sampler("cmaes")


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_samplers_are_accepted(name: str) -> None:
    assert make_sampler(f"baseline:{name}") is not None


def test_unknown_baseline_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="baseline:greedy"):
        make_sampler("baseline:magic")
