"""The Python API's top: the search, with its report. ``compress`` / ``save`` / ``load``
live in the core (`vitrank.core.model`) and are re-exported here.

Imports are lazy (inside the functions) so that ``import vitrank`` stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vitrank.core.model import CONFIG_ATTRIBUTE, compress, factor_cache, load, save

__all__ = ["CONFIG_ATTRIBUTE", "compress", "factor_cache", "load", "save", "search"]


def search(
    config: str | Path | None = None,
    *,
    workload: Any = None,
    report: bool = True,
    **settings: Any,
) -> Path:
    """Search the Pareto front of compressed models under a budget; returns the run directory.

    ``settings`` are the options of ``vitrank search`` with underscores (``budget_params=0.35``,
    ``trials=100``, ``engine="optuna"``, ``out="runs/x"``, ``resume=True``, ...); ``config``
    a run.yaml to start from (explicit settings win). ``workload`` is a workload name or a
    ``vitrank.Workload`` object. When the ``reports`` package is installed the run's
    report.html and summary.md are written at the end (``report=False`` skips them).
    """
    import sys

    from vitrank.search import SearchSettings, resolve_run, resolve_settings, run_search, stop_rule

    given = dict(settings)
    loaded = None
    if workload is not None and not isinstance(workload, str):
        loaded, given["workload"] = workload, workload.name
    elif workload is not None:
        given["workload"] = workload
    if given.get("resume"):
        # The run directory alone says how to continue; explicit settings may only extend it.
        where = SearchSettings(**{k: given[k] for k in ("out", "name") if given.get(k)})
        base = SearchSettings(**{**where.to_dict(), "resume": True})
        resolved = resolve_run(base, given)
    else:
        resolved = resolve_run(resolve_settings(config, **given), given)
    with stop_rule():  # one stop rule for the search and its report
        run_dir = run_search(resolved, loaded)
        if report:
            try:
                _build_report(run_dir)
            except KeyboardInterrupt:
                print(
                    f"report not written; continue the search with --resume --out {run_dir}",
                    file=sys.stderr,
                )
                raise
    return run_dir


def _build_report(run_dir: Path) -> None:
    """The run's report.html and summary.md (vitrank.reports.build)."""
    import sys

    from vitrank import reports

    paths = reports.build(run_dir)
    print(f"report: {paths.html}\nsummary: {paths.summary}", file=sys.stderr)
