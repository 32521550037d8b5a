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
    from search import SearchSettings, resolve_run

    assert not (out / "study.db").exists()
    again = SearchSettings(out=str(out), engine="optuna", budget_params="0.5")
    assert resolve_run(again) is again
