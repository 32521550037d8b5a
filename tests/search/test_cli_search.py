"""`vitrank search` with its defaults on the embedded digits teacher, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.ray
def test_vitrank_search_defaults_leave_the_design_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    vitrank = Path(sys.executable).parent / "vitrank"
    start = time.monotonic()
    done = subprocess.run(
        [str(vitrank), "search", "--out", str(run)],
        cwd=tmp_path,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=1200,
    )
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("run.yaml", "study.db", "trials.parquet", "pareto.json"):
        assert (run / name).is_file(), name
    table = pd.read_parquet(run / "trials.parquet")
    assert len(table) == 40 and (table["state"] == "COMPLETE").all()
    pareto = json.loads((run / "pareto.json").read_text())
    assert pareto["budget"]["kind"] == "params"
    assert pareto["budget"]["limit"] == pytest.approx(0.5 * pareto["teacher"]["params"])
    winners = [p for p in (run / "winners").iterdir() if p.is_dir()]
    assert len(winners) == 1
    metrics = json.loads((winners[0] / "metrics.json").read_text())
    assert metrics["params"] <= pareto["budget"]["limit"]
    assert metrics["finetuned_accuracy"] >= 0.8
    assert f"winner: {winners[0]}" in done.stdout
    print(f"vitrank search (defaults) took {seconds:.0f} s")


@pytest.mark.parametrize(
    ("options", "rule"),
    [
        (["--budget-flops", "2"], "`0 < budget_flops < 1` must hold"),
        (["--budget-flops", "-1"], "`0 < budget_flops < 1` must hold"),
        (["--budget-params", "1.5"], "above 1 is a count and must be whole"),
        (["--budget-params", "-1"], "`value > 0` must hold"),
        (["--budget-latency", "-1"], "`budget_latency > 0` must hold"),
    ],
)
def test_unreadable_budgets_are_refused_with_the_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], rule: str
) -> None:
    from vitrank.cli import main

    out = tmp_path / "run"
    assert main(["search", *options, "--engine", "optuna", "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and rule in error[0]
    assert not out.exists()


def test_a_budget_the_teacher_meets_is_refused_with_its_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """11M parameters of the 115k-parameter digits teacher: nothing to compress."""
    from vitrank.cli import main

    out = tmp_path / "run"
    assert main(["search", "--budget-params", "11M", "--engine", "optuna", "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1
    assert "at or above the dense teacher's" in error[0] and "nothing to compress" in error[0]
    # The failed start is no search to keep: it can be started again with a budget.
    from vitrank.search import SearchSettings, resolve_run

    assert not (out / "study.db").exists()
    again = SearchSettings(out=str(out), engine="optuna", budget_params="0.5")
    assert resolve_run(again) is again


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run `vitrank ARGV`; it must exit 2 with a short message and no traceback."""
    from vitrank.cli import main

    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and len(error.strip().splitlines()) <= 6, error
    return " ".join(error.split())


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--sampler", "annealing"], "annealing"),
        (["--sampler", "baseline:magic"], "unknown baseline 'magic'"),
    ],
)
def test_settings_are_checked_before_anything_is_loaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], named: str
) -> None:
    out = tmp_path / "run"
    error = _refused(capsys, ["search", *options, "--engine", "optuna", "--out", str(out)])
    assert named in error
    assert not out.exists()


def test_batch_below_one_is_refused_by_the_options_and_the_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vitrank.search import SearchSettings

    from vitrank.cli import main

    assert main(["search", "--batch", "0", "--out", str(tmp_path / "run")]) == 2
    assert "`batch >= 1` must hold" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="`batch >= 1` must hold"):
        SearchSettings(batch=0)


def test_a_gpu_that_is_not_there_is_refused_before_the_teacher_is_loaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from vitrank.workloads import WorkloadSettings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(WorkloadSettings, "load", lambda self: pytest.fail("loaded"))
    out = tmp_path / "run"
    error = _refused(
        capsys, ["search", "--device", "cuda", "--engine", "optuna", "--out", str(out)]
    )
    assert "asks for a CUDA GPU" in error and "--device cpu" in error
    assert not out.exists()


@pytest.mark.parametrize(
    ("options", "asked"),
    [(["--gpus-per-trial", "1"], "1 GPU"), (["--cpus-per-trial", "100000"], "100000 CPU")],
)
def test_ray_trials_bigger_than_the_machine_are_refused_up_front(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    options: list[str],
    asked: str,
) -> None:
    """Tune would wait forever (a warning every 60 s) for a trial no node can hold."""
    import ray
    import torch

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    out = tmp_path / "run"
    error = _refused(capsys, ["search", "--engine", "ray", *options, "--out", str(out)])
    assert asked in error and "no node of this machine" in error and "--engine optuna" in error
    assert not out.exists()


def test_a_run_held_by_another_search_names_the_option_that_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vitrank.search import RunDir

    out = tmp_path / "run"
    holder = RunDir(out)
    holder.acquire()  # flock: a second open file of the lock conflicts, even in this process
    try:
        error = _refused(capsys, ["search", "--engine", "optuna", "--out", str(out)])
    finally:
        holder.release()
    assert "being written by another search" in error
    assert "--out" in error and "--name" not in error


def test_a_settings_file_that_is_not_yaml_is_named_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "settings.yaml"
    config.write_text("trials: 5\nsampler: [tpe\n")
    error = _refused(capsys, ["search", "--config", str(config), "--out", str(tmp_path / "r")])
    assert f"{config} is not valid YAML" in error and f'in "{config}", line' in error
    assert "<unicode string>" not in error


def test_a_damaged_study_is_refused_on_resume_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from vitrank.search import SearchSettings
    from vitrank.workloads import WorkloadSettings

    out = tmp_path / "run"
    out.mkdir()
    (out / "run.yaml").write_text(SearchSettings(engine="optuna", out=str(out)).to_yaml())
    (out / "study.db").write_bytes(b"SQLite format 3\x00" + b"\x13" * 3000)
    monkeypatch.setattr(WorkloadSettings, "load", lambda self: pytest.fail("loaded"))
    error = _refused(capsys, ["search", "--out", str(out), "--resume"])
    assert f"{out / 'study.db'} is damaged" in error and "another --out" in error
