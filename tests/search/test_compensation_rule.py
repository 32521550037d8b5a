"""Compensation is kept by evidence: the rung-2 rule, on the selection images."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from vitrank.core import model as core_model
from vitrank.core.compensate import factorized_parameters
from vitrank.search import BASELINES
from vitrank.search._build import build_winner

from tests.search.conftest import tiny_workload
from tests.search.test_baselines import _inputs


def _row(problem: Any) -> dict[str, Any]:
    config = BASELINES["uniform-whitened"](_inputs(problem, "0.5"))
    return {"number": 3, "config": config.to_json(), "proxy": 0.0, "baseline": None}


def _outputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


@pytest.mark.parametrize("harmful", [True, False])
def test_compensation_that_hurts_on_the_selection_images_is_dropped(
    tiny_problem: Any, monkeypatch: pytest.MonkeyPatch, harmful: bool
) -> None:
    """A compensation that wrecks the factors is dropped (the config alone is handed out,
    its config saying so); one that changes nothing is kept."""

    def refine(student: nn.Module, teacher: nn.Module, images: Any, steps: int) -> None:
        if harmful:
            with torch.no_grad():
                for block in student.blocks:
                    for parameter in factorized_parameters(block):
                        parameter.mul_(-3.0)

    monkeypatch.setattr(core_model, "refine", refine)
    monkeypatch.setattr(tiny_problem, "compensated", {})  # built afresh with this `refine`
    workload = tiny_workload()
    row = _row(tiny_problem)
    alone, _ = build_winner(tiny_problem, workload, row, False, "cpu")
    built, metrics = build_winner(tiny_problem, workload, row, True, "cpu")
    assert metrics["compensation_kept"] is (not harmful)
    assert built.vitrank_config.compensate is (not harmful)
    images = tiny_problem.heldout[0][:8]
    if harmful:
        torch.testing.assert_close(_outputs(built, images), _outputs(alone, images))
        assert metrics["initial_accuracy"] == metrics["compressed_accuracy"]
        assert metrics["compensated_accuracy"] < metrics["compressed_accuracy"]
    else:
        assert metrics["initial_accuracy"] == metrics["compensated_accuracy"]


def test_a_config_is_compensated_once_per_process(
    tiny_problem: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rung 1, the winners and the baselines' comparison build the same configs: the second
    build restores the refined parameters (and the rule's verdict) instead of refining."""
    calls = []
    original = core_model.refine

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(core_model, "refine", counted)
    monkeypatch.setattr(tiny_problem, "compensated", {})
    workload, row = tiny_workload(), _row(tiny_problem)
    first, metrics = build_winner(tiny_problem, workload, row, True, "cpu")
    again, metrics_again = build_winner(tiny_problem, workload, row, True, "cpu")
    assert len(calls) == 1
    assert metrics_again == metrics and again is not first
    assert again.vitrank_config.compensate == first.vitrank_config.compensate
    for (name, a), (_, b) in zip(
        first.state_dict().items(), again.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    images = tiny_problem.heldout[0][:8]
    torch.testing.assert_close(_outputs(again, images), _outputs(first, images))
    # fine-tuning one build in place leaves the next one as compensated
    with torch.no_grad():
        for p in again.parameters():
            p.zero_()
    third, _ = build_winner(tiny_problem, workload, row, True, "cpu")
    torch.testing.assert_close(_outputs(third, images), _outputs(first, images))


@pytest.mark.parametrize("steps", [0, 3])
def test_compensation_steps_bound_or_skip_it_and_its_time_is_recorded(
    tmp_path: Any, steps: int
) -> None:
    """`--compensation-steps N` sets the gradient steps; 0 builds every candidate and winner
    from the closed-form factors alone. timings.json says how long compensating took,
    spread over the phases that build."""
    import json

    from vitrank.search import run_search

    from tests.search.conftest import tiny_settings

    lines: list[str] = []
    settings = tiny_settings(
        tmp_path / "run", compensate=True, compensation_steps=steps, promote=2, finetune_top=1
    )
    run = run_search(settings, tiny_workload(), log=lambda *a: lines.append(" ".join(map(str, a))))
    built = [line for line in lines if line.startswith("building winner")]
    assert built and all(("with error compensation" in line) is (steps > 0) for line in built)
    metrics = [json.loads(p.read_text()) for p in run.glob("winners/*/metrics.json")]
    assert all(("compensation_kept" in m) is (steps > 0) for m in metrics)
    session = json.loads((run / "timings.json").read_text())["sessions"][-1]
    seconds = session["within_phases"]["compensation"]
    assert (seconds > 0) if steps else (seconds == 0)
    with pytest.raises(ValueError, match="compensation_steps >= 0"):
        tiny_settings(tmp_path / "bad", compensation_steps=-1)
