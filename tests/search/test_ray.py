"""The ray engine: the same run directory as the optuna engine, and joining a cluster."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pandas as pd
import pytest
from vitrank.search import run_search

from tests.search.conftest import tiny_settings, tiny_workload

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray
    from vitrank.search._engines import init_ray

    init_ray(None, num_cpus=2)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_engine_fills_the_same_run_directory(local_ray: None, tmp_path: Path) -> None:
    run = run_search(tiny_settings(tmp_path / "run", engine="ray", trials=8), tiny_workload())
    table = pd.read_parquet(run / "trials.parquet")
    study = optuna.load_study(study_name="vitrank", storage=f"sqlite:///{run / 'study.db'}")
    assert len(table) == len(study.trials) == 8
    assert (table["state"] == "COMPLETE").all()
    # The recorder stored the proxy's metrics on every Optuna trial before it was told.
    assert table["proxy.kl"].notna().all()
    assert table["proxy"].tolist() == pytest.approx([t.values[0] for t in study.trials])
    assert table.head(5)["baseline"].tolist() == [
        "uniform-plain",
        "uniform-whitened",
        "greedy",
        "asvd",
        "flar",
    ]
    assert (run / "tune" / "session-0").is_dir()
    assert any((run / "winners").iterdir())


def test_rung1_goes_to_ray_only_where_candidates_can_run_side_by_side(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vitrank.search import SearchSettings, _run

    ray = SearchSettings(engine="ray")
    assert not _run.rung1_on_ray(ray, "cpu")  # torch already uses every core
    assert not _run.rung1_on_ray(SearchSettings(engine="optuna", ray_address="h:1"), "cpu")
    assert _run.rung1_on_ray(SearchSettings(engine="ray", ray_address="h:1"), "cpu")
    monkeypatch.setattr(_run, "local_gpus", lambda: 1)
    assert not _run.rung1_on_ray(ray, "cuda")
    monkeypatch.setattr(_run, "local_gpus", lambda: 2)
    assert _run.rung1_on_ray(ray, "cuda")


@pytest.mark.slow
def test_ray_engine_runs_the_fidelity_ladder_with_asha(
    local_ray: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vitrank.search import _run

    # as on a cluster or a machine with several GPUs
    monkeypatch.setattr(_run, "rung1_on_ray", lambda settings, device: True)
    settings = tiny_settings(
        tmp_path / "run", engine="ray", trials=8, promote=3, finetune_top=2, finetune_epochs=1
    )
    run = run_search(settings, tiny_workload())
    table = pd.read_parquet(run / "trials.parquet")
    promoted = table[table["rung1_score"].notna()]
    assert len(promoted) >= 3 and (promoted["rung1_units"] >= 1).all()
    assert (promoted["rung1_units"] == 4).any()  # ASHA lets the best run to the end
    assert table["final_accuracy"].notna().sum() == 2
    assert (run / "tune" / "rung1-0").is_dir()  # rung 1 ran as a Ray Tune experiment
    assert not list((run / "cache" / "rungs").glob("*.pt"))
    # Rung 1's Tuner shows a live count of the candidates done, as every phase does.
    err = capsys.readouterr().err
    assert f"rung 1 candidates: {len(promoted)}/{len(promoted)} (" in err, err[-2000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_search_joins_an_existing_cluster(tmp_path: Path) -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    port, temp_dir = start_cluster(num_cpus=1)
    try:
        settings = tiny_settings(
            tmp_path / "run", engine="ray", trials=5, ray_address=f"127.0.0.1:{port}"
        )
        run = run_search(settings, tiny_workload())
        table = pd.read_parquet(run / "trials.parquet")
        assert len(table) == 5 and (table["state"] == "COMPLETE").all()
        assert ray.is_initialized()
        assert ray.cluster_resources().get("CPU") == 1.0  # the cluster we started, not a new one
    finally:
        ray.shutdown()
        _stop_cluster(temp_dir)


def start_cluster(num_cpus: int) -> tuple[int, str]:
    """A Ray head node of this test run's own: its port and its private temp dir (a short
    one, as Ray's socket paths must stay short; it names the processes `_stop_cluster` stops)."""
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent))
    assert ray_bin is not None
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    failures = []
    for _ in range(3):  # another Ray on the machine may take a port between pick and start
        port = _free_port()
        temp_dir = tempfile.mkdtemp(prefix="vr", dir="/tmp")
        start = [
            ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}", "--include-dashboard=false", f"--temp-dir={temp_dir}",
        ]  # fmt: skip
        done = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
        if done.returncode == 0:
            return port, temp_dir
        failures.append((done.stdout + done.stderr)[-1500:])
        _stop_cluster(temp_dir)
    raise AssertionError("`ray start --head` failed three times:\n" + "\n---\n".join(failures))


def _stop_cluster(temp_dir: str) -> None:
    """Stop the head node this test started, and only it.

    `ray stop` would stop every Ray process of the user on the machine (other sessions
    included), so the processes are found by the private temp dir in their command line.
    """
    mine = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if temp_dir in command:
            mine.append(int(entry.name))
    for pid in mine:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in mine):
        time.sleep(0.2)
    for pid in mine:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_tune_logger_settings_do_not_outlive_the_search(monkeypatch: pytest.MonkeyPatch) -> None:
    from vitrank.search._engines import tune_environment

    monkeypatch.delenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", raising=False)
    monkeypatch.delenv("TUNE_DISABLE_SIGINT_HANDLER", raising=False)
    monkeypatch.setenv("RAY_AIR_NEW_OUTPUT", "1")
    with tune_environment():
        assert os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] == "1"
        assert os.environ["TUNE_DISABLE_SIGINT_HANDLER"] == "1"  # vitrank's stop rule decides
        assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1"  # the user's own value wins
    assert "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS" not in os.environ
    assert "TUNE_DISABLE_SIGINT_HANDLER" not in os.environ
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "1"


@pytest.mark.slow
def test_the_digits_default_prints_no_ray_banner_or_tensorboard_hint(tmp_path: Path) -> None:
    """`vitrank search` as the README's first command runs it (ray engine, digits)."""
    import subprocess
    import sys

    # rung 2 runs as a Ray Tune experiment too; rung 1 here, on the one CPU device
    command = [sys.executable, "-m", "vitrank", "search", "--trials", "6", "--promote", "2"]
    proc = subprocess.run(
        [*command, "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    for banner in (
        "Configuration for experiment",
        "TensorBoard",
        "tensorboard --logdir",
        "View detailed results",
    ):
        assert banner not in output, banner
    assert "report: " in proc.stdout
    # Both rungs' Tuners show a live count of the trials done (rung 2 runs on Ray here: the
    # workers load the workload by its name).
    assert "rung 1 distillation parts: " in proc.stderr
    assert "rung 2 winners: 1/1 (" in proc.stderr


DRIVER = """
import time
from vitrank.search._engines import init_ray
init_ray(None, num_cpus=1)
print("READY", flush=True)
time.sleep(600)
"""


def test_agents_of_a_killed_driver_are_stopped_by_the_next_start() -> None:
    """SIGKILL of a search leaves Ray's dashboard and runtime-env agents running; the next
    local start (`init_ray`) stops the processes of that session, and only those."""
    from vitrank.search._ray_session import DRIVER_FILE, _running, _uses, reap_orphans

    # A private, short Ray temp dir (socket paths must stay short): no other session there.
    temp = Path(tempfile.mkdtemp(prefix="vr", dir="/tmp"))
    env = {**os.environ, "RAY_TMPDIR": str(temp), "PYTHONPATH": str(Path(__file__).parents[2])}
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert driver.stdout is not None and "READY" in driver.stdout.readline()
        markers = (temp / "ray").glob(f"session_*/{DRIVER_FILE}")
        (marker,) = [m for m in markers if not m.parent.is_symlink()]  # not session_latest
        session = str(marker.parent)
        deadline = time.monotonic() + 60
        agents: list[int] = []
        while time.monotonic() < deadline and len(agents) < 2:
            agents = [
                int(p.name)
                for p in Path("/proc").iterdir()
                if p.name.isdigit()
                and int(p.name) != driver.pid
                and "Agent" in (p / "cmdline").read_bytes().decode(errors="replace")
                and _uses(int(p.name), session)
            ]
            time.sleep(0.5)
        assert agents, "Ray started no agents"
        assert reap_orphans(temp / "ray") == []  # the driver lives: its session is left alone
        driver.kill()
        driver.wait()
        stopped = reap_orphans(temp / "ray")
        assert set(agents) <= set(stopped)
        assert not any(_running(pid) for pid in stopped)
        assert not marker.exists()
    finally:
        driver.kill()
        _stop_cluster(str(temp))


def test_trials_bigger_than_any_node_of_the_session_are_refused(local_ray: None) -> None:
    """The session has 2 CPUs: Tune would wait forever for these trials."""
    import ray
    from vitrank.search._engines import check_trial_resources, init_ray

    init_ray(None, num_cpus=2)  # again, if the cluster test shut the fixture's session down
    check_trial_resources(2, 0)
    with pytest.raises(ValueError, match=r"4 CPU and 0 GPU .* Ray session has that much \(2 CPU"):
        check_trial_resources(4, 0)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    with pytest.raises(ValueError, match=f"{gpus + 1} GPU"):
        check_trial_resources(1, gpus + 1)


def test_the_rungs_progress_callback_counts_ended_trials_and_pickles_without_its_hook() -> None:
    from ray import cloudpickle
    from vitrank.search._engines import trials_done_callback

    ended: list[int] = []
    callback = trials_done_callback(lambda: ended.append(1))
    callback.on_trial_complete(0, [], None)
    callback.on_trial_error(1, [], None)  # a failed trial ends too
    assert len(ended) == 2
    # Tune saves its callbacks (cloudpickled) with the experiment's state.
    copy = cloudpickle.loads(cloudpickle.dumps(callback))
    copy.on_trial_complete(2, [], None)
    assert len(ended) == 2
