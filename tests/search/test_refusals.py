"""A search refuses, before its long work and with the fix, what would fail it later."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from vitrank.search import SearchSettings, resolve_run, run_search

from tests.search.conftest import tiny_settings, tiny_workload


def _resume(run: Path, workload: Any = None) -> Path:
    settings = resolve_run(SearchSettings(out=str(run), resume=True), {"resume": True})
    return run_search(settings, workload or tiny_workload(), log=lambda message: None)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-trial run on the tiny workload, copied by each test that damages it."""
    torch.set_num_threads(1)
    settings = tiny_settings(tmp_path_factory.mktemp("base") / "run", trials=3, baselines=False)
    return run_search(settings, tiny_workload(), log=lambda message: None)


@pytest.fixture
def run(finished: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    (copy / "run.yaml").write_text(
        (copy / "run.yaml").read_text().replace(str(finished), str(copy))
    )
    return copy


def test_a_teacher_with_nan_in_its_head_is_refused_before_calibration(tmp_path: Path) -> None:
    workload = tiny_workload()
    with torch.no_grad():
        workload.model.head.weight[1] = float("nan")
    settings = tiny_settings(tmp_path / "run", trials=2, baselines=False)
    with pytest.raises(ValueError, match=r"but head\.weight holds 32 NaN/Inf values"):
        run_search(settings, workload, log=lambda message: None)
    assert not (tmp_path / "run" / "cache" / "stats.safetensors").exists()


def test_a_resumed_run_refuses_a_teacher_whose_weights_changed(run: Path) -> None:
    with pytest.raises(ValueError, match="weights of tiny changed since this run started"):
        _resume(run, tiny_workload(seed=1))
    _resume(run)  # the same teacher resumes


@pytest.mark.parametrize("name", ["teacher.safetensors", "stats.safetensors", "sensitivity.json"])
def test_a_truncated_cache_file_is_named_with_the_fix(run: Path, name: str) -> None:
    path = run / "cache" / name
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="damaged") as error:
        _resume(run)
    message = str(error.value)
    assert str(path) in message
    assert f"delete {run / 'cache'} and rerun with --resume" in message
    # The fix works: the cache is rebuilt and the scored trials are kept.
    shutil.rmtree(run / "cache")
    _resume(run)


def test_nan_in_the_cached_teacher_names_the_file_and_the_fix(run: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = run / "cache" / "teacher.safetensors"
    state = load_file(str(path))
    state["blocks.0.mlp.fc1.weight"][0, 0] = float("nan")
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"NaN/Inf values in blocks\.0\.mlp\.fc1\.weight") as error:
        _resume(run)
    assert str(path) in str(error.value)
    assert "delete" in str(error.value) and "--resume" in str(error.value)


def test_a_calibration_set_as_large_as_the_training_split_is_refused_before_calibration(
    tmp_path, monkeypatch
):
    import pytest
    from vitrank.evaluators import calibration
    from vitrank.search import run_search

    from tests.search.conftest import tiny_settings, tiny_workload

    monkeypatch.setattr(calibration, "calibrate", lambda *a, **k: pytest.fail("calibrated"))
    workload = tiny_workload()
    settings = tiny_settings(tmp_path / "run", calib_size=len(workload.train))
    with pytest.raises(ValueError, match="use a smaller --calib-size"):
        run_search(settings, workload)
