"""A short search on fashion-vit end to end, as a user runs it: trials, winner, report."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from vitrank.workloads import FASHION_DATA_DIR, FASHION_DIR

pytestmark = [
    pytest.mark.skipif(
        not (FASHION_DATA_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
        reason="Fashion-MNIST is not installed: `apt-get install dataset-fashion-mnist`",
    ),
    pytest.mark.skipif(
        not (FASHION_DIR / "model.safetensors").is_file(),
        reason="the fashion-vit teacher is not built: `python benchmarks/train_fashion_teacher.py`",
    ),
]


@pytest.mark.slow  # the tiny searches take every path; this one is the real workload's size
def test_a_short_fashion_search_leaves_a_winner_and_a_report(tmp_path: Path) -> None:
    from vitrank.cli import main

    out = tmp_path / "fashion"
    options = ["--workload", "fashion-vit", "--trials", "8", "--engine", "optuna"]
    options += ["--finetune-top", "1", "--finetune-epochs", "0", "--baseline-seconds", "0"]
    options += ["--promote", "2", "--rung-images", "256"]  # a short fidelity ladder
    assert main(["search", *options, "--out", str(out)]) == 0
    table = pd.read_parquet(out / "trials.parquet")
    assert len(table) == 8 and table["feasible"].any()
    assert "flar" in set(table["baseline"].dropna())  # the FLAR-SVD-style baseline ran
    assert table["rung1_score"].notna().sum() >= 2  # rung 1 distilled the promoted ones
    pareto = json.loads((out / "pareto.json").read_text())
    assert pareto["teacher"]["accuracy"] >= 0.88
    (winner,) = sorted((out / "winners").iterdir())
    metrics = json.loads((winner / "metrics.json").read_text())
    assert 0.0 < metrics["initial_accuracy"] <= 1.0
    html = (out / "report.html").read_text()
    assert "fashion-vit" in html and "flar" in html
    assert (out / "summary.md").is_file()
