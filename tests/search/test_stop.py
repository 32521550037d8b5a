"""One stop rule on the default (Ray) engine: SIGINT or SIGTERM in any phase of a real
`vitrank search` stops it with 130 / 143 and the resume line, and the resume ends as if it
had never stopped: every requested trial once, one rank-1 winner whose weights are what its
metrics.json says."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from tests.search.test_ray import _stop_cluster, start_cluster

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[2]
VITRANK = str(Path(sys.executable).parent / "vitrank")
TRIALS = 12
# The embedded digits workload (Ray's rung-2 workers rebuild it by name), small.
OPTIONS = [
    "--trials", str(TRIALS), "--calib-size", "32", "--promote", "3", "--finetune-top", "1",
    "--finetune-epochs", "1", "--rung-images", "256", "--finetune-images", "256",
    "--cpus-per-trial", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """One Ray head node for every search of this module (each would start its own)."""
    port, temp_dir = start_cluster(num_cpus=2)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        _stop_cluster(temp_dir)


def _completed(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as connection:
            return int(
                connection.execute(
                    "SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'"
                ).fetchone()[0]
            )
    except sqlite3.OperationalError:
        return 0


def _stop_in(phase: str, signum: int, run: Path, address: str) -> subprocess.CompletedProcess:
    """Start `vitrank search`, send `signum` once it is in `phase`, wait for it to end."""
    err_path = run.parent / f"{run.name}.stderr"
    command = [VITRANK, "search", *OPTIONS, "--ray-address", address, "--out", str(run)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True
        )
    deadline = time.monotonic() + 300
    while True:
        text = err_path.read_text()
        if phase == "trials" and _completed(run / "study.db") >= 8:
            break
        if phase == "rung 1" and "rung 1 candidates:" in text:
            break
        if phase == "rung 2" and "rung 2: fine-tuning" in text:
            time.sleep(1.5)  # inside the Ray trial that fine-tunes
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"search never reached {phase}: {text[-3000:]}")
        time.sleep(0.1)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(command, proc.returncode, out, err_path.read_text())


def _winners(run: Path) -> list[dict]:
    found = []
    for directory in sorted((run / "winners").iterdir()):
        metrics = json.loads(
            (directory / "metrics.json").read_text(),
            parse_constant=lambda name, at=directory: pytest.fail(f"{at}: {name} in metrics.json"),
        )
        found.append({"dir": directory, **metrics})
    return found


CASES = [
    pytest.param("trials", signal.SIGINT, marks=pytest.mark.slow),
    pytest.param("trials", signal.SIGTERM, marks=pytest.mark.slow),
    pytest.param("rung 1", signal.SIGINT, marks=pytest.mark.slow),
    pytest.param("rung 1", signal.SIGTERM, marks=pytest.mark.slow),
    pytest.param("rung 2", signal.SIGINT, marks=pytest.mark.slow),
    pytest.param("rung 2", signal.SIGTERM),
]


@pytest.mark.parametrize(
    ("phase", "signum"), CASES, ids=lambda v: getattr(v, "name", str(v).replace(" ", ""))
)
def test_a_signal_in_any_phase_stops_cleanly_and_the_resume_finishes_the_run(
    phase: str, signum: int, cluster: str, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    stopped = _stop_in(phase, signum, run, cluster)
    assert stopped.returncode == 128 + signum, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    assert f"--resume --out {run}" in " ".join(stopped.stderr.split())  # rich wraps lines
    with sqlite3.connect(run / "study.db") as connection:
        running = connection.execute(
            "SELECT COUNT(*) FROM trials WHERE state = 'RUNNING'"
        ).fetchone()[0]
    assert running == 0, "a trial the stop cut short is left RUNNING, not flagged"
    # Whatever the winners folder holds says one thing: no half-written winner.
    for winner in _winners(run) if (run / "winners").is_dir() else []:
        assert (winner["dir"] / "model.safetensors").is_file()
    timings = json.loads((run / "timings.json").read_text())["sessions"]
    assert timings[-1].get("stopped") is True

    resumed = subprocess.run(
        [VITRANK, "search", "--out", str(run), "--resume", "--ray-address", cluster],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Failed to fetch metrics" not in resumed.stderr
    table = pd.read_parquet(run / "trials.parquet")
    assert table["number"].is_unique
    finished = table[~table["interrupted"].astype(bool)]
    assert (finished["state"] == "COMPLETE").sum() == TRIALS
    assert len(json.loads((run / "timings.json").read_text())["sessions"]) == 2

    winners = _winners(run)
    ranked_first = [w for w in winners if w.get("rank") == 1]
    assert len(ranked_first) == 1, [(w["dir"].name, w.get("rank")) for w in winners]
    winner = ranked_first[0]
    assert "selection_score" in winner, "the winner was not fine-tuned"
    measured = subprocess.run(
        [VITRANK, "eval", str(winner["dir"]), "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert measured.returncode == 0, measured.stderr[-2000:]
    accuracy = json.loads(measured.stdout)["accuracy"]
    assert accuracy == pytest.approx(winner["finetuned_accuracy"], abs=1e-9)
