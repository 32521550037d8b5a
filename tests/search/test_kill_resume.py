"""A search killed with SIGKILL mid-way resumes: nothing completed is lost or run again."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from search import RunLockedError, SearchSettings, resolve_run, run_search
from tests.search.conftest import tiny_workload

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from tests.search.conftest import tiny_settings, tiny_workload
from vitrank.api import search
settings = tiny_settings(sys.argv[1], trials=int(sys.argv[2]), baselines=True)
values = settings.to_dict(); values.pop("workload")
search(workload=tiny_workload(), report=False, **values)
"""


def _completed(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as connection:
            (count,) = connection.execute(
                "SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'"
            ).fetchone()
        return int(count)
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def _start(run: Path, trials: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(run), str(trials)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(proc: subprocess.Popen, db: Path, count: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while _completed(db) < count:
        if proc.poll() is not None:
            raise AssertionError(f"search exited early: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("search made no progress")
        time.sleep(0.2)


@pytest.mark.slow
def test_sigkill_then_resume(tmp_path: Path) -> None:
    run, trials = tmp_path / "run", 40
    proc = _start(run, trials)
    _wait_for(proc, run / "study.db", 7)
    # While it runs, a second search on the directory is refused.
    with pytest.raises(RunLockedError, match=rf"pid {proc.pid}"):
        run_search(SearchSettings.load(run / "run.yaml"), tiny_workload())
    assert proc.poll() is None, "the search finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with sqlite3.connect(run / "study.db") as connection:
        before = pd.read_sql(
            "SELECT number, datetime_complete FROM trials WHERE state = 'COMPLETE'", connection
        )
    assert 7 <= len(before) < trials

    torch.set_num_threads(1)
    settings = resolve_run(SearchSettings(out=str(run), resume=True), {"resume": True})
    run_search(settings, tiny_workload())

    table = pd.read_parquet(run / "trials.parquet")
    finished = table[~table["interrupted"]]
    assert (finished["state"] == "COMPLETE").sum() == trials
    assert table["number"].is_unique
    # Every trial completed before the kill is still there, completed at the same moment:
    # it was neither lost nor run again.
    kept = table.set_index("number").loc[before["number"], "datetime_complete"]
    assert [str(t)[:19] for t in kept] == [str(t)[:19] for t in before["datetime_complete"]]
    # Each baseline was scored exactly once.
    scored = table[table["state"] == "COMPLETE"]["baseline"].dropna()
    assert scored.is_unique and set(scored) == {
        "uniform-plain",
        "uniform-whitened",
        "greedy",
        "asvd",
    }
