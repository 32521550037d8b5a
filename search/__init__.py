"""The search: Pareto front of compressed configs under a budget, with Ray Tune or Optuna.

`run_search(SearchSettings(...))` runs (or resumes) a search and returns its run directory
(`runs/<name>/`: run.yaml, study.db, trials.parquet, pareto.json, winners/). Engines,
samplers and baselines are looked up by name in `ENGINES`, `SAMPLERS` and `BASELINES`.
"""

from __future__ import annotations

import importlib as _importlib
import sys as _sys
import types as _types
from typing import Any

from vitrank.search._build import build_candidate
from vitrank.search._engines import ENGINES, EngineJob, run_engine
from vitrank.search._fidelity import milestones, promotion_pool, rank_agreement, rung_signals
from vitrank.search._finish import finetune_winners
from vitrank.search._pareto import pareto_front, pick_winners
from vitrank.search._run import RESUMABLE, read_trials, resolve_run, run_search
from vitrank.search._rundir import RunDir, RunLockedError, atomic_write_bytes, atomic_write_json
from vitrank.search._samplers import SAMPLERS, make_sampler
from vitrank.search._settings import SETTING_GROUPS, SearchSettings, resolve_settings
from vitrank.search._stop import Stopped, stop_rule
from vitrank.search._winners import finetune_candidate
from vitrank.search.baselines import BASELINES, BaselineInputs, BaselineUnavailable, run_baselines

__all__ = [
    "BASELINES",
    "ENGINES",
    "RESUMABLE",
    "SAMPLERS",
    "SETTING_GROUPS",
    "BaselineInputs",
    "BaselineUnavailable",
    "EngineJob",
    "RunDir",
    "RunLockedError",
    "SearchSettings",
    "Stopped",
    "atomic_write_bytes",
    "atomic_write_json",
    "build_candidate",
    "finetune_candidate",
    "finetune_winners",
    "make_sampler",
    "milestones",
    "pareto_front",
    "pick_winners",
    "promotion_pool",
    "rank_agreement",
    "rung_signals",
    "read_trials",
    "resolve_run",
    "resolve_settings",
    "run_baselines",
    "run_engine",
    "run_search",
    "stop_rule",
]


class _SearchPackage(_types.ModuleType):
    """`vitrank.search` is this package and, called, the search itself (`vitrank.api.search`,
    the façade's function of the same name, which also writes the report)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _importlib.import_module("vitrank.api").search(*args, **kwargs)


_sys.modules[__name__].__class__ = _SearchPackage
