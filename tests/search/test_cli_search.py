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
