"""`vitrank space` shows the search space; `vitrank latency` measures and saves a table."""

from __future__ import annotations

from pathlib import Path

import pytest
from vitrank.spaces import LatencyTable
from vitrank.workloads import DIGITS_DIR

from vitrank.cli import main

needs_digits = pytest.mark.skipif(
    not (DIGITS_DIR / "model.safetensors").is_file(),
    reason="the digits teacher is built by benchmarks/train_digits_teacher.py",
)


@needs_digits
def test_space_describes_the_search_space(capsys) -> None:
    assert main(["space", "--ops", "lowrank,tokens", "--granularity", "4"]) == 0
    out = capsys.readouterr().out
    assert "Search space for" in out and "granularity=4" in out
    row = next(line for line in out.splitlines() if line.startswith("blocks.0 "))
    assert row.split()[1:2] == ["dense|lowrank"] and "0.0..0.25 step 0.05" in row
    assert "smallest reachable" in out


@needs_digits
def test_latency_saves_a_table(tmp_path: Path, capsys) -> None:
    out = tmp_path / "table.json"
    assert main(["latency", "--repeats", "2", "--out", str(out)]) == 0
    assert f"saved {out}" in capsys.readouterr().out
    table = LatencyTable.load(out)
    assert table.device == "cpu" and table.batch == 1 and table.threads == 1
    assert table.entries and table.dense_ms > 0
