"""Finishing a search's winners again, later: more of them, longer, on another device."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from vitrank.search._problem import forget, problem
from vitrank.search._rundir import RunDir
from vitrank.search._settings import SearchSettings
from vitrank.search._winners import save_winners


def finetune_winners(
    run_dir: str | Path,
    *,
    top: int | None = None,
    epochs: int | None = None,
    device: str | None = None,
    log: Callable[[str], Any] = print,
) -> list[Path]:
    """Build, compensate, fine-tune and save the top winners of a finished search.

    The winners are chosen and built exactly as the search does (same front, same seed);
    ``top`` and ``epochs`` default to the run's settings (at least 1). Holds the run's lock,
    so it never runs while a search writes the directory. Returns the winners' folders.
    """
    import pandas as pd
    from vitrank.workloads import WorkloadSettings

    run = RunDir(run_dir)
    if not run.exists() or not run.trials.is_file():
        raise FileNotFoundError(
            f"{run.root} is not a finished search (run.yaml and trials.parquet are missing); "
            "pass the run directory a `vitrank search` wrote."
        )
    for name, value in (("top", top), ("epochs", epochs)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"`{name} >= 1` must hold, but got {name}={value!r}.")
    settings = SearchSettings.load(run.settings)
    top = top or max(settings.finetune_top, 1)
    epochs = epochs or max(settings.finetune_epochs, 1)
    rows = pd.read_parquet(run.trials).to_dict("records")
    with run:
        forget(run.root)
        current = problem(run.root)
        if device is not None:
            current.settings.device = device
        return save_winners(
            current,
            WorkloadSettings.of(settings).load(),
            rows,
            top=top,
            epochs=epochs,
            ray=settings.engine == "ray",
            log=log,
            remove_others=False,  # fewer winners than the search kept: the rest stay, ranked after
        )
