"""Error compensation: never worse on the calibration data, usually better; generic params."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from vitrank.core.apply import apply_specs
from vitrank.core.compensate import compensate, factorized_parameters
from vitrank.core.factorize import FactorCache
from vitrank.core.lowrank import LowRankLinear
from vitrank.core.spec import AttentionSpec, BlockSpec, MlpSpec
from vitrank.evaluators.calibration import calibrate


@pytest.fixture(scope="module")
def setup():
    from tests.conftest import make_tiny_vit

    teacher = make_tiny_vit(qkv_bias=True)
    images = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(images, torch.zeros(24, dtype=torch.long))
    stats = calibrate(teacher, data, progress=False)
    return teacher, images, stats, FactorCache(teacher, stats)


def _logit_error(student, teacher, images) -> float:
    with torch.no_grad():
        return float((student(images) - teacher(images)).square().mean())


@pytest.mark.parametrize("merge_ratio", [0.0, 0.25])
def test_compensation_never_worse_and_improves_heavy_compression(setup, merge_ratio):
    teacher, images, stats, factors = setup
    spec = BlockSpec(
        AttentionSpec("heads", qk_rank=3, vo_rank=3),
        MlpSpec("lowrank", fc1_rank=4, fc2_rank=4),
        merge_ratio=merge_ratio,
    )
    student = apply_specs(teacher, [spec, spec], factors, stats)
    untouched = copy.deepcopy(student)
    before = _logit_error(student, teacher, images)
    records = compensate(student, teacher, images, steps=30, lr=1e-3, batch_size=10)
    assert len(records) == 2
    for record in records:
        assert record.parameters > 0
        assert record.error_after <= record.error_before
    assert records[0].error_after < records[0].error_before  # 30 Adam steps do something
    assert _logit_error(student, teacher, images) < before
    # Only factorized modules moved: norms, embeddings and head are the teacher's.
    moved = {
        name
        for (name, p), (_, q) in zip(
            student.named_parameters(), untouched.named_parameters(), strict=True
        )
        if not torch.equal(p, q)
    }
    assert moved and all(".attn." in n or ".mlp." in n for n in moved)
    # Flags are restored (the `heads` key map is fixed, everything else trainable).
    flags = [(n, p.requires_grad) for n, p in student.named_parameters()]
    assert flags == [(n, p.requires_grad) for n, p in untouched.named_parameters()]
    assert all(flag != n.endswith("key_map.weight") for n, flag in flags)


def test_no_steps_or_no_factorized_modules_change_nothing(setup):
    teacher, images, stats, factors = setup
    dense = apply_specs(teacher, [BlockSpec(), BlockSpec()], factors, stats)
    assert factorized_parameters(dense.blocks[0]) == []
    state = copy.deepcopy(dense.state_dict())
    records = compensate(dense, teacher, images, steps=5)
    assert all(r.parameters == 0 for r in records)
    assert records[0].error_before == pytest.approx(0.0, abs=1e-10)
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in state.items())


def test_a_huge_learning_rate_cannot_make_it_worse(setup):
    teacher, images, stats, factors = setup
    spec = BlockSpec(mlp=MlpSpec("lowrank", fc1_rank=6, fc2_rank=6))
    student = apply_specs(teacher, [spec, spec], factors, stats)
    before = _logit_error(student, teacher, images)
    records = compensate(student, teacher, images, steps=3, lr=10.0)
    assert all(r.error_after <= r.error_before for r in records)
    assert _logit_error(student, teacher, images) <= before * (1 + 1e-6)


def test_plain_timm_student_with_low_rank_linears(setup):
    teacher, images, _, factors = setup
    student = copy.deepcopy(teacher)
    for i, block in enumerate(student.blocks):
        block.mlp.fc1 = LowRankLinear.from_factors(*factors.linear(f"blocks.{i}.mlp.fc1", 5))
    records = compensate(student, teacher, images, steps=20, lr=1e-3)
    assert [r.parameters for r in records] == [5 * (32 + 128) + 128] * 2
    assert records[1].error_after < records[1].error_before


def _logit_error_in(student, teacher, images, dtype) -> float:
    with torch.no_grad():
        x = images.to(dtype)
        return float((student(x).float() - teacher(x).float()).square().mean())


@pytest.mark.parametrize("merge_ratio", [0.0, 0.25])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_students_are_compensated_on_fp32_masters(dtype, merge_ratio):
    """fp16/bf16 teacher: calibration -> factors -> student -> compensation, no dtype error,
    and the steps lower every block's error (in half precision Adam made it NaN at once)."""
    from tests.conftest import make_tiny_vit

    teacher = make_tiny_vit(qkv_bias=True).to(dtype)
    images = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(images.to(dtype), torch.zeros(24, dtype=torch.long))
    stats = calibrate(teacher, data, progress=False)
    factors = FactorCache(teacher, stats)
    spec = BlockSpec(
        AttentionSpec("heads", qk_rank=3, vo_rank=3),
        MlpSpec("lowrank", fc1_rank=4, fc2_rank=4),
        merge_ratio=merge_ratio,
    )
    student = apply_specs(teacher, [spec, spec], factors, stats)
    before = _logit_error_in(student, teacher, images, dtype)
    records = compensate(student, teacher, images, steps=30, lr=1e-3, batch_size=10)
    for record in records:
        assert math.isfinite(record.error_before) and math.isfinite(record.error_after)
        assert record.error_after < record.error_before, record
    assert {p.dtype for p in student.parameters()} == {dtype}
    assert _logit_error_in(student, teacher, images, dtype) < before


def test_a_non_finite_error_stops_the_steps_with_a_warning_and_keeps_the_best(setup, monkeypatch):
    from vitrank.core import compensate as module

    teacher, images, stats, factors = setup
    spec = BlockSpec(mlp=MlpSpec("lowrank", fc1_rank=6, fc2_rank=6))
    student = apply_specs(teacher, [spec, spec], factors, stats)
    real, calls = module._error, []

    def poisoned(*args, **kwargs):
        calls.append(None)
        return float("nan") if len(calls) == 4 else real(*args, **kwargs)

    monkeypatch.setattr(module, "_error", poisoned)
    with pytest.warns(RuntimeWarning, match=r"blocks\.0: the compensation error became nan"):
        records = compensate(student, teacher, images, steps=10, lr=1e-3)
    assert all(math.isfinite(r.error_after) and r.error_after <= r.error_before for r in records)
    assert records[0].error_after < records[0].error_before  # the 3 good steps are kept
    assert all(bool(torch.isfinite(p).all()) for p in student.parameters())
