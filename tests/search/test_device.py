"""One device and one dtype for the whole pipeline (CUDA tests skip without a GPU)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.search.conftest import tiny_settings

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def test_device_names_resolve_and_absent_ones_are_refused() -> None:
    from vitrank.core.device import resolve_device, resolve_dtype

    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == torch.device(expected)
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees none"):
            resolve_device("cuda:1")
    assert resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")
    # auto: float32 on the CPU, bfloat16 on a GPU that has it
    assert resolve_dtype("auto") is torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    if torch.cuda.is_available():
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        assert resolve_dtype("auto", torch.device("cuda:0")) is expected


def test_a_run_records_its_device_and_the_sizes_it_chose(tmp_path: Path, workload: Any) -> None:
    from vitrank.search import run_search

    messages: list[str] = []
    settings = tiny_settings(tmp_path / "run", trials=3, finetune_top=0, device="auto")
    run = run_search(settings, workload, log=messages.append)
    pareto = json.loads((run / "pareto.json").read_text())
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert pareto["teacher"]["device"] == expected
    timings = json.loads((run / "timings.json").read_text())["sessions"][-1]
    assert timings["device"] == expected
    # the default dtype, auto, resolved: bfloat16 on a GPU that has it, float32 on the CPU
    on_gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert pareto["teacher"]["dtype"] == ("bfloat16" if on_gpu else "float32")
    assert {"calibration", "factorization", "sensitivity", "trials"} <= set(timings["seconds"])
    assert any(m.startswith("images: 32 for calibration") for m in messages)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_score_trials_and_build_winners(
    tmp_path: Path, workload: Any, dtype: str
) -> None:
    from vitrank.search import run_search

    settings = tiny_settings(
        tmp_path / "run", trials=2, finetune_top=1, finetune_epochs=1, compensate=True, dtype=dtype
    )
    run = run_search(settings, workload, log=lambda message: None)
    (winner,) = sorted((run / "winners").iterdir())
    metrics = json.loads((winner / "metrics.json").read_text())
    for key in ("compressed_accuracy", "initial_accuracy", "finetuned_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])


@pytest.mark.cuda
@CUDA
def test_a_small_search_runs_on_the_gpu(tmp_path: Path, workload: Any) -> None:
    from vitrank.search import run_search

    settings = tiny_settings(tmp_path / "run", trials=6, finetune_top=1, finetune_epochs=1)
    settings.device = "cuda"
    run = run_search(settings, workload, log=lambda message: None)
    pareto = json.loads((run / "pareto.json").read_text())
    assert pareto["teacher"]["device"].startswith("cuda")
    assert sorted((run / "winners").iterdir())
