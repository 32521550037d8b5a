"""Every file and folder a run writes is readable by others under the usual umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from vitrank.search import run_search

from tests.search.conftest import tiny_settings, tiny_workload


@pytest.fixture(scope="module")
def finished_under_umask_022(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from vitrank import reports

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("modes") / "run"
    previous = os.umask(0o022)
    try:
        run = run_search(tiny_settings(out, trials=6, finetune_epochs=1), tiny_workload())
        reports.build(run)
    finally:
        os.umask(previous)
    return run


def test_every_file_and_folder_of_a_finished_run_is_readable_by_others(
    finished_under_umask_022: Path,
) -> None:
    run = finished_under_umask_022
    paths = sorted(run.rglob("*"))
    names = {p.relative_to(run).as_posix() for p in paths}
    # The run wrote what it writes: settings, study, tables, reports, cache, winners.
    assert {"run.yaml", "study.db", "trials.parquet", "pareto.json", "report.html"} <= names
    assert any(n.startswith("cache/") for n in names)
    assert any(n.startswith("baselines/") for n in names)
    assert any(n.endswith("/model.safetensors") for n in names)
    # Others read files, and list and enter folders.
    needed = {False: stat.S_IROTH, True: stat.S_IROTH | stat.S_IXOTH}
    unreadable = [
        f"{p.relative_to(run)} {stat.filemode(p.stat().st_mode)}"
        for p in paths
        if p.stat().st_mode & needed[p.is_dir()] != needed[p.is_dir()]
    ]
    assert unreadable == []
    assert not [p for p in paths if p.name.endswith(".tmp")]


def test_every_json_file_of_a_finished_run_is_strict_json(finished_under_umask_022: Path) -> None:
    """A bare NaN or Infinity (Python's json default) is refused by strict parsers; a run
    writes null instead (the first epoch's training loss of a fine-tuning, say)."""
    import json

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in a JSON file")

    files = sorted(finished_under_umask_022.rglob("*.json"))
    assert any(p.name == "metrics.json" for p in files) and any(
        p.name == "pareto.json" for p in files
    )
    for path in files:
        try:
            json.loads(path.read_text(), parse_constant=refuse)
        except AssertionError as error:
            raise AssertionError(f"{path.relative_to(finished_under_umask_022)}: {error}") from None
    metrics = next(p for p in files if p.name == "metrics.json")
    history = json.loads(metrics.read_text())["finetune_history"]
    assert history[0]["train_loss"] is None  # no training before the first epoch


@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_give_the_mode_of_a_new_file_under_the_umask(
    tmp_path: Path, umask: int, expected: int
) -> None:
    """mkstemp's 0600 (and safetensors' own 0600 files) never reach the artefact."""
    from safetensors.torch import save_file
    from vitrank.core.files import atomic_write, atomic_write_json, atomic_write_text

    replaced = tmp_path / "pareto.json"
    replaced.write_text("{}")
    replaced.chmod(0o600)
    previous = os.umask(umask)
    try:
        atomic_write_json(replaced, {"front": []})
        atomic_write_text(tmp_path / "new" / "summary.md", "# run\n")
        weights = {"w": torch.ones(1)}
        atomic_write(tmp_path / "model.safetensors", lambda tmp: save_file(weights, tmp))
    finally:
        os.umask(previous)
    for path in (replaced, tmp_path / "new" / "summary.md", tmp_path / "model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == expected, path.name
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o777 & ~umask
