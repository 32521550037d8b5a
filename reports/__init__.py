"""What users look at after a search: Pareto fronts, per-block maps, proxy fidelity.

`build(run_dir)` writes report.html (self-contained plotly), summary.md and the flat
trials tables of one run; `compare(run_dirs, out)` puts several runs on one front. The
data behind every figure comes from a pure function (`pareto_front`, `hypervolume_2d`,
`hypervolume_over_trials`, `kendall_tau`, `block_map`, ...); drawing is separate.
"""

from __future__ import annotations

from ._build import ReportPaths, build, compare
from ._data import (
    BlockMapGrid,
    FidelityData,
    FrontData,
    HypervolumeTrace,
    block_map,
    block_map_grid,
    front_data,
    hypervolume_2d,
    hypervolume_over_trials,
    kendall_tau,
    pareto_front,
    proxy_fidelity,
)
from ._run import (
    RunData,
    Winner,
    config_summary,
    load_run,
    recorded_granularity,
    recorded_workload,
    winners_table,
)

__all__ = [
    "BlockMapGrid",
    "FidelityData",
    "FrontData",
    "HypervolumeTrace",
    "ReportPaths",
    "RunData",
    "Winner",
    "block_map",
    "block_map_grid",
    "build",
    "compare",
    "config_summary",
    "front_data",
    "hypervolume_2d",
    "hypervolume_over_trials",
    "kendall_tau",
    "load_run",
    "pareto_front",
    "proxy_fidelity",
    "recorded_granularity",
    "recorded_workload",
    "winners_table",
]
