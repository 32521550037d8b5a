from __future__ import annotations

import pytest
import torch
from vitrank.evaluators import LatencyResult, measure_latency


def test_latency_result_fields_and_thread_count_restored(tiny_vit):
    model = tiny_vit()
    before = torch.get_num_threads()
    result = measure_latency(model, (3, 16, 16), batch=2, warmup=1, repeats=5, threads=1)
    assert isinstance(result, LatencyResult)
    assert result.threads == 1
    assert torch.get_num_threads() == before
    assert result.batch == 2 and result.device == "cpu" and result.repeats == 5
    assert result.input_size == (3, 16, 16)
    assert 0 < result.median_ms <= result.p90_ms
    assert set(result.to_dict()) >= {"median_ms", "p90_ms", "threads", "device", "batch"}


def test_latency_records_current_threads_and_validates():
    model = torch.nn.Flatten()
    result = measure_latency(model, 4, warmup=0, repeats=1)
    assert result.threads == torch.get_num_threads()
    assert result.input_size == (3, 4, 4)
    with pytest.raises(ValueError, match="repeats >= 1"):
        measure_latency(model, 4, repeats=0)
    with pytest.raises(ValueError, match="input_size"):
        measure_latency(model, (1, 2, 3, 4))
