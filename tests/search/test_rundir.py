from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vitrank.search import RunDir, RunLockedError, atomic_write_json

HOLD = """
import sys, time
from vitrank.search import RunDir
run = RunDir(sys.argv[1]); run.acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _hold(path: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a" / "pareto.json"
    atomic_write_json(target, {"front": [1]})
    atomic_write_json(target, {"front": [2, 3]})
    assert json.loads(target.read_text()) == {"front": [2, 3]}
    assert [p.name for p in target.parent.iterdir()] == ["pareto.json"]


def test_a_second_writer_is_refused_with_the_holder_pid(tmp_path: Path) -> None:
    proc = _hold(tmp_path / "run")
    try:
        with pytest.raises(RunLockedError, match=rf"pid {proc.pid}"):
            RunDir(tmp_path / "run").acquire()
    finally:
        proc.kill()
        proc.wait()


def test_the_lock_dies_with_a_killed_holder(tmp_path: Path) -> None:
    proc = _hold(tmp_path / "run")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            with RunDir(tmp_path / "run"):
                break
        except RunLockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_a_start_that_failed_before_any_trial_can_be_started_again(tmp_path: Path) -> None:
    """An infeasible budget leaves run.yaml and a cache but no study: not a search to keep."""
    from vitrank.search import SearchSettings
    from vitrank.search._run import resolve_run

    out = tmp_path / "run"
    (out / "cache").mkdir(parents=True)
    (out / "run.yaml").write_text("budget_params: '0.01'\n")
    settings = SearchSettings(out=str(out), engine="optuna")
    assert resolve_run(settings) is settings
    (out / "study.db").write_bytes(b"")
    with pytest.raises(FileExistsError, match="already holds a search"):
        resolve_run(settings)


@pytest.mark.parametrize(
    ("names", "shown"),
    [
        (("report.html", "summary.md", "trials.csv"), "report.html, summary.md, trials.csv"),
        (("notes.txt", "run.yaml"), "notes.txt"),
        (("cache/",), "cache/ or baselines/ but no run.yaml"),
    ],
)
def test_a_new_search_refuses_a_folder_that_is_not_a_run(
    tmp_path: Path, names: tuple[str, ...], shown: str
) -> None:
    from vitrank.search import SearchSettings
    from vitrank.search._run import resolve_run

    out = tmp_path / "mine"
    out.mkdir()
    for name in names:
        if name.endswith("/"):
            (out / name).mkdir()
        else:
            (out / name).write_text("the user's\n")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(FileExistsError, match="is not empty and is not a vitrank run") as error:
        resolve_run(SearchSettings(out=str(out), engine="optuna"))
    assert shown in str(error.value) and "--out" in str(error.value)
    assert sorted(p.name for p in out.iterdir()) == before
    assert all((out / n).read_text() == "the user's\n" for n in names if not n.endswith("/"))


def test_a_new_search_refuses_a_run_yaml_that_is_not_a_search(tmp_path: Path) -> None:
    from vitrank.search import SearchSettings
    from vitrank.search._run import resolve_run

    out = tmp_path / "ci"
    out.mkdir()
    (out / "run.yaml").write_text("steps: [build, test]\n")
    with pytest.raises(FileExistsError, match=r"its run.yaml is not a vitrank search's.*steps"):
        resolve_run(SearchSettings(out=str(out), engine="optuna"))
    assert (out / "run.yaml").read_text() == "steps: [build, test]\n"
    # An empty folder, or one holding only a search's lock, is a new run's place.
    (out / "run.yaml").unlink()
    (out / ".lock").write_text("")
    settings = SearchSettings(out=str(out), engine="optuna")
    assert resolve_run(settings) is settings


def test_the_cli_refuses_a_folder_that_is_not_a_run(tmp_path: Path, capsys) -> None:
    from vitrank.cli import main

    (tmp_path / "summary.md").write_text("# mine\n")
    assert main(["search", "--engine", "optuna", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "is not a vitrank run (it holds summary.md)" in error[0]
    assert [p.name for p in tmp_path.iterdir()] == ["summary.md"]
