"""What may change in a ViT, one point of it, and what that point costs.

`build_space` reads a model's structure into a `SearchSpace`; a `CompressionConfig` is one
point of it (saved as JSON/YAML, checked against the model's fingerprint); `count_params`,
`count_flops` and `predict_latency` cost a config without building a model; `SpaceFunction`
is the define-by-run function that Optuna and Ray Tune sample configs with.
"""

from __future__ import annotations

from ._budget import BUDGET_KINDS, Budget, check_feasible, parse_budget, smallest_reachable
from ._config import SCHEMA_VERSION, CompressionConfig
from ._cost import count_flops, count_params, dense_flops, dense_params
from ._latency import LatencyTable, measure_latency_table, predict_latency
from ._parametrize import (
    CONFIG_ATTR,
    PARAMETRIZATIONS,
    SpaceFunction,
    allocate,
    raw_params,
    suggest_budgeted,
    suggest_raw,
)
from ._space import OPS, BlockChoices, SearchSpace, build_space, saving_ranks

__all__ = [
    "BUDGET_KINDS",
    "CONFIG_ATTR",
    "OPS",
    "PARAMETRIZATIONS",
    "SCHEMA_VERSION",
    "BlockChoices",
    "Budget",
    "CompressionConfig",
    "LatencyTable",
    "SearchSpace",
    "SpaceFunction",
    "allocate",
    "build_space",
    "check_feasible",
    "count_flops",
    "count_params",
    "dense_flops",
    "dense_params",
    "measure_latency_table",
    "parse_budget",
    "predict_latency",
    "raw_params",
    "saving_ranks",
    "smallest_reachable",
    "suggest_budgeted",
    "suggest_raw",
]
