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
from vitrank.search import RunLockedError, SearchSettings, resolve_run, run_search

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
        "flar",
    }


# The CLI on the tiny workload: `vitrank search` as a user runs it, registered by name.
CLI_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from tests.search.conftest import tiny_workload
from vitrank.workloads import WORKLOADS
WORKLOADS.add("tiny", lambda settings: tiny_workload())
from vitrank.cli import main
sys.exit(main(sys.argv[1:]))
"""
SMALL = "baselines: false\nfinetune_top: 0\n"


def _interrupt(command: list[str], db: Path, after: int) -> subprocess.CompletedProcess:
    """Run `command`, press Ctrl-C (SIGINT) once `after` trials are scored, wait for it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for(proc, db, after)
    except AssertionError:
        proc.kill()
        raise
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _states(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT state, COUNT(*) FROM trials GROUP BY state").fetchall()
    return {state: int(count) for state, count in rows}


def test_ctrl_c_then_resume_scores_every_trial_without_a_traceback(tmp_path: Path) -> None:
    run, trials = tmp_path / "run", 20
    (tmp_path / "small.yaml").write_text(SMALL)
    options = [
        "search", "--workload", "tiny", "--engine", "optuna", "--trials", str(trials),
        "--calib-size", "32", "--granularity", "4", "--config", str(tmp_path / "small.yaml"),
        "--out", str(run),
    ]  # fmt: skip
    stopped = _interrupt([sys.executable, "-c", CLI_SCRIPT, *options], run / "study.db", 3)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    assert "KeyboardInterrupt" not in stopped.stderr
    assert f"--resume --out {run}" in " ".join(stopped.stderr.split())  # rich wraps lines
    states = _states(run / "study.db")
    assert 3 <= states["COMPLETE"] < trials and "RUNNING" not in states
    # The stopped trial is flagged as interrupted, not as a trial that failed by itself.
    with sqlite3.connect(run / "study.db") as connection:
        flagged = connection.execute(
            "SELECT COUNT(*) FROM trial_user_attributes WHERE key = 'interrupted'"
        ).fetchone()[0]
    assert flagged == states.get("FAIL", 0)

    torch.set_num_threads(1)
    settings = resolve_run(SearchSettings(out=str(run), resume=True), {"resume": True})
    run_search(settings, tiny_workload())
    assert _states(run / "study.db")["COMPLETE"] == trials


def test_a_trial_that_failed_by_an_error_is_run_again_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vitrank.search._problem import Problem

    from tests.search.conftest import tiny_settings

    torch.set_num_threads(1)
    score, calls = Problem.score, []

    def failing(self: Problem, config: object) -> dict[str, float]:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory in the third trial")
        return score(self, config)  # type: ignore[arg-type]

    monkeypatch.setattr(Problem, "score", failing)
    settings = tiny_settings(tmp_path / "run", trials=5, baselines=False)
    with pytest.raises(RuntimeError, match="third trial"):
        run_search(settings, tiny_workload())
    assert _states(tmp_path / "run" / "study.db") == {"COMPLETE": 2, "FAIL": 1}
    monkeypatch.setattr(Problem, "score", score)
    resumed = resolve_run(SearchSettings(out=str(tmp_path / "run"), resume=True), {"resume": True})
    run_search(resumed, tiny_workload())
    assert _states(tmp_path / "run" / "study.db") == {"COMPLETE": 5, "FAIL": 1}


@pytest.mark.slow
def test_ctrl_c_of_the_digits_default_then_resume_scores_60_trials(tmp_path: Path) -> None:
    """The issue's case: `vitrank search --trials 60` on digits-vit, Ctrl-C, `--resume`."""
    run = tmp_path / "run"
    (tmp_path / "small.yaml").write_text(SMALL)
    vitrank = str(Path(sys.executable).parent / "vitrank")
    options = [
        "search", "--engine", "optuna", "--trials", "60", "--calib-size", "32",
        "--config", str(tmp_path / "small.yaml"), "--out", str(run),
    ]  # fmt: skip
    stopped = _interrupt([vitrank, *options], run / "study.db", 5)
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr
    resumed = subprocess.run([vitrank, *options, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _states(run / "study.db")["COMPLETE"] == 60


def test_ctrl_c_while_optuna_records_a_trial_keeps_it_and_stops_as_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C landing in Optuna's tell step (outside any objective) is held until that
    trial is recorded, then stops the study as an interrupt, not as Optuna's
    UnboundLocalError."""
    import optuna
    from optuna.study import _optimize
    from vitrank.search._engines import EngineJob, open_study, run_optuna

    tell = _optimize._tell_with_warning
    calls: list[int] = []

    def interrupted_tell(**kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs before the tell below
        return tell(**kwargs)

    monkeypatch.setattr(_optimize, "_tell_with_warning", interrupted_tell)
    job = EngineJob(
        storage_url=f"sqlite:///{tmp_path / 'study.db'}",
        study_name="s",
        metrics=("loss",),
        define=lambda trial: {"x": trial.suggest_float("x", 0.0, 1.0)},
        evaluate=lambda params: {"loss": float(params["x"])},
        sampler=optuna.samplers.RandomSampler(seed=0),
        n_trials=10,
    )
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        run_optuna(job)
    states = [t.state for t in open_study(job).trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2  # the second one recorded, no third
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is back


def test_a_resume_leaves_one_rank_1_winner_and_removes_earlier_sessions_winners(
    tmp_path: Path,
) -> None:
    import json
    import shutil

    from tests.search.conftest import tiny_settings

    torch.set_num_threads(1)
    run = tmp_path / "run"
    run_search(tiny_settings(run, trials=4, baselines=False, finetune_epochs=1), tiny_workload())
    (first,) = sorted((run / "winners").iterdir())
    # The winner of an earlier session that a resume no longer picks (as when more trials
    # find a better one): its folder says rank 1 too.
    stale = run / "winners" / "trial-0099"
    shutil.copytree(first, stale)
    said: list[str] = []
    settings = resolve_run(
        SearchSettings(out=str(run), resume=True, trials=8), {"resume": True, "trials": 8}
    )
    run_search(settings, tiny_workload(), log=lambda line: said.append(str(line)))
    winners = sorted((run / "winners").iterdir())
    ranks = [json.loads((w / "metrics.json").read_text())["rank"] for w in winners]
    assert ranks.count(1) == 1 and len(winners) == 1
    assert not stale.exists()
    assert any("removed trial-0099" in line for line in said)
    assert not (run / "cache" / "winners-staging").exists() or not any(
        (run / "cache" / "winners-staging").iterdir()
    )


def test_the_stop_rule_holds_a_first_signal_in_a_deferred_block_and_a_second_stops_at_once():
    from vitrank.search import Stopped, stop_rule
    from vitrank.search._stop import deferred

    asked: list[int] = []
    before = signal.getsignal(signal.SIGTERM)  # an earlier ray.init in this process sets one
    with stop_rule():
        with pytest.raises(Stopped) as held, deferred(on_signal=lambda: asked.append(1)):
            os.kill(os.getpid(), signal.SIGTERM)
            assert asked == [1]  # held, and the block was asked to wind down
        assert held.value.exit_code == 143  # raised when the block ended
    with stop_rule():
        with pytest.raises(Stopped) as second, deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)  # a second signal: at once
            pytest.fail("the second signal did not stop the block")
        assert second.value.exit_code == 130
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handler is back


def test_a_signal_that_a_library_turned_into_its_own_error_still_stops_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C inside sqlite's commit reaches vitrank as Optuna's StorageInternalError (from
    sqlite's "interrupted"): the run still stops as interrupted, resumable, not as a
    failure."""
    import json

    import optuna
    from vitrank.search import Stopped, _run
    from vitrank.search._stop import deferred

    from tests.search.conftest import tiny_settings

    def commit_interrupted(*args: object, **kwargs: object) -> None:
        with deferred():  # the handler only notes the signal, as inside Optuna's tell
            os.kill(os.getpid(), signal.SIGINT)
            raise optuna.exceptions.StorageInternalError(
                "An exception is raised during the commit."
            )

    monkeypatch.setattr(_run, "_search", commit_interrupted)
    lines: list[str] = []
    run = tmp_path / "run"
    settings = tiny_settings(run, trials=4)
    with pytest.raises(Stopped) as stop:
        run_search(settings, tiny_workload(), log=lambda *a: lines.append(" ".join(map(str, a))))
    assert stop.value.exit_code == 130
    assert any("continue it with --resume" in line for line in lines), lines
    assert json.loads((run / "timings.json").read_text())["sessions"][-1]["stopped"] is True
    # an error with no signal behind it is still the error it is
    monkeypatch.setattr(_run, "_search", lambda *a, **k: (_ for _ in ()).throw(ValueError("x")))
    with pytest.raises(ValueError, match="x"):
        run_search(tiny_settings(tmp_path / "other", trials=4), tiny_workload())
