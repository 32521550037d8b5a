"""Optuna samplers by name. `baseline:NAME` is not a sampler: it runs one baseline alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from vitrank.core.registry import Registry

if TYPE_CHECKING:
    import optuna


def _tpe(seed: int) -> optuna.samplers.BaseSampler:
    import warnings

    import optuna

    # Multivariate TPE models the per-block knobs jointly (grouped, as the knobs present
    # depend on each block's operator); `constant_liar` keeps concurrent Ray trials from
    # proposing the same point.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, multivariate=True, group=True, constant_liar=True, n_startup_trials=10
        )


def _nsga2(seed: int) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.NSGAIISampler(seed=seed)


def _gp(seed: int) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.GPSampler(seed=seed)


def _random(seed: int) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


SAMPLERS: Registry[Callable[[int], optuna.samplers.BaseSampler]] = Registry("sampler")
for _name, _make in (("tpe", _tpe), ("nsga2", _nsga2), ("gp", _gp), ("random", _random)):
    SAMPLERS.add(_name, _make)

BASELINE_PREFIX = "baseline:"


def baseline_of(sampler: str) -> str | None:
    """The baseline's name for `baseline:NAME`, else None."""
    return sampler[len(BASELINE_PREFIX) :] if sampler.startswith(BASELINE_PREFIX) else None


def check_sampler(name: str) -> None:
    """Refuse a name that is neither a sampler nor `baseline:NAME` of a known baseline."""
    if baseline_of(name) is not None:
        from vitrank.search.baselines import BASELINES

        if baseline_of(name) not in BASELINES:
            known = ", ".join(BASELINE_PREFIX + b for b in BASELINES)
            raise ValueError(f"unknown baseline {baseline_of(name)!r}; known: {known}.")
    elif name not in SAMPLERS:
        raise ValueError(
            f"{SAMPLERS.unknown(name)} (or {BASELINE_PREFIX}NAME to run one baseline alone)"
        )


def make_sampler(name: str, seed: int = 0) -> optuna.samplers.BaseSampler:
    """A fresh sampler; `baseline:NAME` gets a random sampler (it never samples)."""
    check_sampler(name)
    if baseline_of(name) is not None:
        return _random(seed)
    return SAMPLERS.get(name)(seed)
