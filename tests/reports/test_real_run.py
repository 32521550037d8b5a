"""Reports and reuse commands on a real (tiny) search's run directory, not a synthetic one."""

from __future__ import annotations

import json

import pytest
import torch

from vitrank import reports
from vitrank.cli import main

pytestmark = pytest.mark.slow

TEACHER_ARGS = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished optuna-engine search of a tiny teacher on the digits; winners not fine-tuned."""
    import timm.models
    from vitrank.search import SearchSettings, run_search

    from tests.conftest import make_tiny_vit

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("real")
    timm.models.save_for_hf(
        make_tiny_vit(**TEACHER_ARGS),
        str(root / "teacher"),
        model_args=TEACHER_ARGS,
        safe_serialization=True,
    )
    settings = SearchSettings(
        workload=None,
        model=f"local-dir:{root / 'teacher'}",
        out=str(root / "runs"),
        name="tiny",
        engine="optuna",
        trials=8,
        finetune_top=1,
        finetune_epochs=0,
        compensate=True,  # winners are error-compensated: apply must redo it the same way
        granularity=4,
        calib_size=32,
        proxy="spectral",
    )
    return run_search(settings, log=lambda message: None)


def test_report_of_a_real_run(finished):
    paths = reports.build(finished)
    text = paths.html.read_text()
    assert "Pareto front: proxy vs params" in text and "Plotly.newPlot" in text
    summary = paths.summary.read_text()
    assert "| teacher |" in summary and "| W1 (trial " in summary
    run = reports.load_run(finished)
    assert len(reports.winners_table(run)) == len(list((finished / "winners").iterdir()))


def test_apply_of_a_winner_config_reproduces_the_saved_winner(finished, tmp_path):
    from vitrank.api import load

    winner = sorted((finished / "winners").iterdir())[0]
    # No --model: the teacher and calibration settings come from the run's run.yaml.
    assert main(["apply", str(winner / "config.json"), "--out", str(tmp_path / "applied")]) == 0
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = load(winner)(images)
        applied = load(tmp_path / "applied")(images)
    torch.testing.assert_close(applied, expected, rtol=1e-4, atol=1e-5)


def test_finetune_more_winners_later(finished):
    assert main(["finetune", str(finished), "--top", "1", "--epochs", "1"]) == 0
    for winner in (finished / "winners").iterdir():
        metrics = json.loads((winner / "metrics.json").read_text())
        if "finetuned_accuracy" in metrics:
            break
    else:
        raise AssertionError("no winner was fine-tuned")
    assert 0.0 <= metrics["finetuned_accuracy"] <= 1.0
    assert (finished / "report.html").is_file()
