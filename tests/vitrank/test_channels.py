"""Head-consistent channel pruning (attention operator "cdcp"): one width in every head,
the same channels in every head, the removed values' mean kept, the merge keys read back."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _compress_cases import build, calibration, full_rank, images
from vitrank.core.apply import apply_specs
from vitrank.core.attention import HeadFactorizedAttention
from vitrank.core.channels import prune_channels, qk_channel_scores, v_channel_scores
from vitrank.core.operators import operator
from vitrank.core.spec import BlockSpec, MlpSpec
from vitrank.core.structure import inspect_vit


@pytest.fixture(scope="module")
def case():
    model = build("vit")
    return model, calibration(model), inspect_vit(model)


def _specs(fp, qk: int, v: int, merge_ratio: float = 0.0) -> list[BlockSpec]:
    spec = operator("attn", "cdcp").spec(qk_kept=qk, v_kept=v)
    return [BlockSpec(attn=spec, mlp=MlpSpec(), merge_ratio=merge_ratio) for _ in fp.blocks]


def test_every_head_keeps_the_same_channels_at_one_width(case) -> None:
    teacher, stats, fp = case
    student = apply_specs(teacher, _specs(fp, 3, 5), None, stats)
    for i, block in enumerate(student.blocks):
        attn, source = block.attn, teacher.blocks[i].attn
        heads, dh = source.num_heads, source.head_dim
        assert isinstance(attn, HeadFactorizedAttention)
        assert (attn.qk_rank, attn.vo_rank) == (3, 5)
        assert attn.q.out_features == attn.k.out_features == heads * 3
        assert attn.v.out_features == attn.out.in_features == heads * 5
        q_teacher = source.qkv.weight[: heads * dh].reshape(heads, dh, -1)
        k_teacher = source.qkv.weight[heads * dh : 2 * heads * dh].reshape(heads, dh, -1)
        q_rows = attn.q.weight.reshape(heads, 3, -1)
        k_rows = attn.k.weight.reshape(heads, 3, -1)
        # each kept row is the teacher's row of the same channel, the same channels per head
        kept = [
            [int((q_teacher[h] - row).abs().sum(-1).argmin()) for row in q_rows[h]]
            for h in range(heads)
        ]
        assert all(channels == kept[0] for channels in kept) and kept[0] == sorted(kept[0])
        torch.testing.assert_close(q_rows, q_teacher[:, kept[0]])
        torch.testing.assert_close(k_rows, k_teacher[:, kept[0]])


def test_the_removed_values_mean_is_folded_into_the_output_bias(case) -> None:
    """With every query/key channel kept, the attention output's mean over the calibration
    tokens is the teacher's: what the removed value channels contributed on average stays."""
    teacher, stats, fp = case
    student = apply_specs(teacher, _specs(fp, fp.blocks[0].head_dim, 2), None, stats)
    x = teacher.norm_pre(teacher._pos_embed(teacher.patch_embed(images(8, seed=2))))
    normed = teacher.blocks[0].norm1(x)
    with torch.no_grad():
        want = teacher.blocks[0].attn(normed).double().mean(dim=(0, 1))
        got = student.blocks[0].attn(normed)[0].double().mean(dim=(0, 1))
        without = got - student.blocks[0].attn.out.bias.double()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (without - want).abs().max() > 1e-3  # the bias does carry something


def test_channels_rank_by_their_energy(case) -> None:
    teacher, stats, fp = case
    attn, heads, dh = teacher.blocks[0].attn, fp.blocks[0].num_heads, fp.blocks[0].head_dim
    weight, bias = attn.qkv.weight.detach().clone(), attn.qkv.bias.detach().clone()
    inner = heads * dh
    for h in range(heads):  # channel 2 of the keys is dead in every head
        weight[inner + h * dh + 2] = 0.0
        bias[inner + h * dh + 2] = 0.0
    moment = stats.augmented_covariance("blocks.0.attn.qkv")
    scores = qk_channel_scores(weight, bias, moment, heads, dh)
    assert scores[2] == 0 and (scores[torch.arange(dh) != 2] > 0).all()
    pruned = prune_channels(
        weight, bias, attn.proj.weight, attn.proj.bias, moment,
        stats.augmented_covariance("blocks.0.attn.proj"), heads, dh, dh - 1, dh,
    )  # fmt: skip
    assert 2 not in pruned.qk_kept.tolist()
    proj = attn.proj.weight.detach().clone()
    proj[:, [h * dh + 5 for h in range(heads)]] = 0.0  # value channel 5 reaches nothing
    out_moment = stats.augmented_covariance("blocks.0.attn.proj")
    assert v_channel_scores(proj, out_moment, heads, dh).argmin() == 5


def test_full_width_reproduces_the_teacher_with_merging_and_reads_its_keys(case) -> None:
    teacher, stats, fp = case
    x = images()
    dense = [
        dataclasses.replace(full_rank(s, "dense", "dense"), merge_ratio=0.3) for s in fp.blocks
    ]
    full = _specs(fp, fp.blocks[0].head_dim, fp.blocks[0].head_dim, merge_ratio=0.3)
    reference = apply_specs(teacher, dense, None, stats)
    student = apply_specs(teacher, full, None, stats)
    with torch.no_grad():
        torch.testing.assert_close(student(x), reference(x), atol=1e-4, rtol=1e-4)
    # narrower: still a model that merges by (fitted) teacher keys and runs
    narrow = apply_specs(teacher, _specs(fp, 4, 4, merge_ratio=0.3), None, stats)
    assert narrow.blocks[0].attn.key_map is not None
    assert torch.isfinite(narrow(x)).all()


def test_refused_under_qk_norm_with_the_way_out() -> None:
    model = build("qk_norm")
    fp = inspect_vit(model)
    with pytest.raises(ValueError, match="qk_norm=True.*'prune'"):
        apply_specs(model, _specs(fp, 2, 2), None, calibration(model))


def test_needs_calibration_statistics(case) -> None:
    teacher, _, fp = case
    with pytest.raises(ValueError, match="stats"):
        apply_specs(teacher, _specs(fp, 2, 2), None, None)
