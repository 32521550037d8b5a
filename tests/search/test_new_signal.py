"""A new ladder signal is one `Signal` and its registry line: registered here, in this file
only, it is measured at both rungs and shows up in the trials table, `rungs.json` (with its
Kendall τ) and the report's ladder table, and the ladder can rank by it."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from vitrank.evaluators.signals import SIGNALS, Signal
from vitrank.search import run_search

from tests.search.conftest import tiny_settings, tiny_workload


def _margin(logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The logit of the label minus the largest other logit (a toy confidence margin)."""
    right = logits.gather(1, labels.view(-1, 1).to(logits.device)).squeeze(1)
    others = logits.scatter(1, labels.view(-1, 1).to(logits.device), float("-inf"))
    return right - others.max(1).values


@pytest.fixture
def margin_signal():
    SIGNALS.add("margin", Signal("margin", "label logit minus the best other", _margin))
    yield
    SIGNALS.remove("margin")


def test_a_registered_signal_reaches_every_output_of_the_ladder(tmp_path: Path, margin_signal):
    settings = tiny_settings(
        tmp_path / "run", trials=8, promote=2, finetune_top=1, finetune_epochs=1,
        ladder_signal="margin",
    )  # fmt: skip
    run = run_search(settings, tiny_workload())
    table = pd.read_parquet(run / "trials.parquet")
    promoted = table[table["rung1_score"].notna()]
    assert len(promoted) >= 2 and promoted["rung1_margin"].notna().all()
    assert (promoted["rung1_signal"] == "margin").all()
    assert (promoted["rung1_score"] == promoted["rung1_margin"]).all()  # it ranks rung 1
    assert table["rung2_margin"].notna().sum() == 1
    rungs = json.loads((run / "rungs.json").read_text())
    assert {"rung1 margin", "rung2 margin"} <= set(rungs["agreement"])
    assert all("rung1_margin" in c for c in rungs["candidates"])
    from vitrank import reports

    page = reports.build(run).html.read_text()
    ladder = page.split("Fidelity ladder", 1)[1]
    assert "rung1 margin (ranks)" in ladder and "rung2 margin" in ladder
    assert "margin: label logit minus the best other" in ladder
