"""What may change in a ViT, one point of it, and what that point costs.

`build_space` reads a model's structure into a `SearchSpace`; a `CompressionConfig` is one
point of it (saved as JSON/YAML, checked against the model's fingerprint); `count_params`,
`count_flops` and `predict_latency` cost a config without building a model; `SpaceFunction`
is the define-by-run function that Optuna and Ray Tune sample configs with.
"""

from __future__ import annotations

from vitrank.core.config import SCHEMA_VERSION, SVD_KINDS, CompressionConfig

from ._budget import (
    BUDGET_KINDS,
    BUDGETS,
    Budget,
    BudgetKind,
    check_feasible,
    parse_budget,
    smallest_reachable,
)
from ._cost import (
    attention_linears,
    block_params,
    count_flops,
    count_params,
    dense_flops,
    dense_params,
    mlp_linears,
)
from ._latency import LatencyTable, measure_latency_table, predict_latency
from ._parametrize import (
    CONFIG_ATTR,
    PARAMETRIZATIONS,
    SpaceFunction,
    allocate,
    ladder,
    raw_params,
    suggest_budgeted,
    suggest_raw,
)
from ._space import (
    DEFAULT_MERGE_RATIOS,
    MERGE_FAMILY,
    BlockChoices,
    SearchSpace,
    build_space,
    saving_ranks,
    search_families,
)

__all__ = [
    "BUDGET_KINDS",
    "BUDGETS",
    "BudgetKind",
    "CONFIG_ATTR",
    "DEFAULT_MERGE_RATIOS",
    "MERGE_FAMILY",
    "search_families",
    "PARAMETRIZATIONS",
    "SCHEMA_VERSION",
    "SVD_KINDS",
    "BlockChoices",
    "Budget",
    "CompressionConfig",
    "LatencyTable",
    "SearchSpace",
    "SpaceFunction",
    "allocate",
    "attention_linears",
    "block_params",
    "build_space",
    "check_feasible",
    "count_flops",
    "count_params",
    "dense_flops",
    "dense_params",
    "ladder",
    "measure_latency_table",
    "mlp_linears",
    "parse_budget",
    "predict_latency",
    "raw_params",
    "saving_ranks",
    "smallest_reachable",
    "suggest_budgeted",
    "suggest_raw",
]
