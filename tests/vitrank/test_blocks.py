"""CompressedBlock(s): exact at merge ratio 0, token schedule, protected tokens, unmerge."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from vitrank.core.attention import DenseAttention
from vitrank.core.blocks import CompressedBlock, CompressedBlocks
from vitrank.core.merge import unmerge
from vitrank.core.spec import token_schedule

ARCHS = {
    "cls": ("vit_small_patch16_224", {}),
    "distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers": ("vit_base_patch16_reg4_gap_256", {}),
}


def _merged_copy(teacher: nn.Module, ratios: list[float]) -> nn.Module:
    """The teacher with dense attention, its own MLPs and the given merge ratios."""
    model = copy.deepcopy(teacher)
    model.blocks = CompressedBlocks(
        CompressedBlock(
            block, DenseAttention.from_timm(block.attn), block.mlp, ratio, model.num_prefix_tokens
        )
        for block, ratio in zip(model.blocks, ratios, strict=True)
    )
    return model


def _tokens_in(model: nn.Module, images: Tensor) -> Tensor:
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_ratio_zero_reproduces_the_teacher_exactly(tiny_vit, arch: str) -> None:
    name, extra = ARCHS[arch]
    teacher = tiny_vit(arch=name, depth=3, **extra)
    model = _merged_copy(teacher, [0.0, 0.0, 0.0])
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = teacher(images)
        assert torch.equal(model(images), expected)
        tokens, size, source = model.blocks.forward_tokens(_tokens_in(model, images))
    assert torch.equal(size, torch.ones(size.shape))
    assert torch.equal(source, torch.arange(tokens.shape[1]).expand_as(source))


def test_compressed_model_shares_parameters_and_state_dict_keys(tiny_vit) -> None:
    teacher = tiny_vit()
    model = _merged_copy(teacher, [0.25, 0.5])
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in teacher.parameters()
    )
    assert set(model.state_dict()) == set(teacher.state_dict())
    assert model.blocks.merge_ratios == (0.25, 0.5)
    assert len(model.blocks) == 2 and isinstance(model.blocks[1], CompressedBlock)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "ratios", [[0.5, 0.5, 0.5], [0.3, 0.2, 0.1], [0.0, 0.45, 0.0], [0.1, 0.1, 0.1]]
)
def test_tokens_after_each_block_follow_the_schedule(tiny_vit, arch: str, ratios) -> None:
    name, extra = ARCHS[arch]
    teacher = tiny_vit(arch=name, depth=3, img_size=24, **extra)
    model = _merged_copy(teacher, ratios)
    prefix = model.num_prefix_tokens
    counts: list[int] = []
    for block in model.blocks:
        block.register_forward_hook(lambda _m, _i, out: counts.append(out[0].shape[1]))
    images = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        x = _tokens_in(model, images)
        tokens, size, source = model.blocks.forward_tokens(x)
        logits = model(images)
    schedule = token_schedule(ratios, x.shape[1], prefix)
    assert counts[:3] == schedule[1:]
    assert logits.shape == (2, 5)
    # Protected tokens stay themselves: own position, size 1, nothing merged into them.
    assert torch.equal(source[:, :prefix], torch.arange(prefix).expand(2, prefix))
    assert torch.equal(size[:, :prefix], torch.ones(2, prefix))
    assert not torch.isin(source[:, prefix:], torch.arange(prefix)).any()
    assert torch.equal(size.sum(1), torch.full((2,), float(x.shape[1])))
    full = unmerge(tokens, source)
    assert full.shape == x.shape
    assert torch.equal(full, tokens.gather(1, source[..., None].expand(-1, -1, x.shape[2])))


def test_twin_tokens_merge_losslessly_with_proportional_attention(tiny_vit) -> None:
    """Patch tokens in identical pairs: merging each pair (size 2, log 2 in the logits) and
    unmerging must give the teacher's own output for every token."""
    teacher = tiny_vit(depth=3)
    model = _merged_copy(teacher, [0.5, 0.0, 0.0])
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        x = _tokens_in(teacher, images)
        patches = x[:, 1:]
        x = torch.cat([x[:, :1], patches[:, 0::2].repeat_interleave(2, dim=1)], dim=1)
        expected = teacher.blocks(x)
        tokens, size, source = model.blocks.forward_tokens(x)
    assert tokens.shape[1] == 1 + 8
    assert torch.equal(size[:, 1:], torch.full((2, 8), 2.0))
    torch.testing.assert_close(unmerge(tokens, source), expected, rtol=1e-5, atol=1e-5)


class _RecordingAttention(nn.Module):
    """Dense attention that records the log sizes it was given."""

    def __init__(self, attn: nn.Module, seen: list) -> None:
        super().__init__()
        self.inner = DenseAttention.from_timm(attn)
        self.seen = seen

    def forward(self, x: Tensor, log_size: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self.seen.append(log_size)
        return self.inner(x, log_size)


def test_size_bias_only_after_the_first_merge(tiny_vit) -> None:
    teacher = tiny_vit(depth=3)
    seen: list = []
    blocks = CompressedBlocks(
        CompressedBlock(b, _RecordingAttention(b.attn, seen), b.mlp, ratio, 1)
        for b, ratio in zip(teacher.blocks, [0.0, 0.25, 0.0], strict=True)
    )
    with torch.no_grad():
        blocks(_tokens_in(teacher, torch.randn(1, 3, 16, 16)))
    assert seen[0] is None and seen[1] is None
    assert seen[2] is not None and seen[2].shape == (1, 17 - 4)
    assert torch.equal(seen[2].exp().sum(), torch.tensor(17.0))


def test_block_refuses_a_non_block_and_bad_ratio(tiny_vit) -> None:
    block = tiny_vit().blocks[0]
    with pytest.raises(TypeError, match="norm1"):
        CompressedBlock(nn.Linear(2, 2), block.attn, block.mlp)
    with pytest.raises(ValueError, match="merge_ratio"):
        CompressedBlock(block, DenseAttention.from_timm(block.attn), block.mlp, 1.0)


def test_running_blocks_one_by_one_fails_clearly(tiny_vit) -> None:
    model = _merged_copy(tiny_vit(), [0.25, 0.25])
    with pytest.raises(TypeError, match="CompressedBlocks container"):
        model.forward_intermediates(torch.randn(1, 3, 16, 16))


def test_gradients_reach_the_teacher_parts(tiny_vit) -> None:
    model = _merged_copy(tiny_vit(), [0.25, 0.25]).train()
    model(torch.randn(2, 3, 16, 16)).square().mean().backward()
    for name, parameter in model.blocks.named_parameters():
        assert parameter.grad is not None, name
