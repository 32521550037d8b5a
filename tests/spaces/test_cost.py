"""Params and FLOPs predicted from (config, fingerprint) equal the built model's."""

from __future__ import annotations

import random

import pytest
import torch
from _spaces_cases import random_specs, variant_model, variant_space
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from vitrank.core.operators import OPERATORS
from vitrank.core.spec import AttentionSpec, BlockSpec, MlpSpec
from vitrank.core.structure import inspect_vit
from vitrank.spaces import CompressionConfig, count_flops, count_params, dense_flops, dense_params
from vitrank.spaces._latency import random_weight_model


def built(model: nn.Module, specs: list[BlockSpec]) -> nn.Module:
    # Built as `apply` builds it (apply_specs, structure_only), with random weights.
    return random_weight_model(
        model, CompressionConfig.dense("m", {}, inspect_vit(model)).replace(blocks=tuple(specs))
    ).eval()


def measured_flops(model: nn.Module, batch: int) -> int:
    image = model.patch_embed.img_size
    x = torch.randn(batch, model.patch_embed.proj.in_channels, *image)
    # The math SDPA backend decomposes attention into matmuls the counter sees; the fused
    # CPU kernel is not registered with torch.utils.flop_counter.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as c:
        model(x)
    return c.get_total_flops()


def test_dense_counts_equal_the_teacher(variant: str) -> None:
    model = variant_model(variant)
    space = variant_space(variant)
    assert dense_params(space.fingerprint) == sum(p.numel() for p in model.parameters())
    assert count_params(space.dense()) == dense_params(space.fingerprint)
    assert count_flops(space.dense(), batch=2) == measured_flops(model, 2)
    assert dense_flops(space.fingerprint) == count_flops(space.dense())


def test_random_configs_match_built_models(variant: str) -> None:
    model = variant_model(variant)
    space = variant_space(variant)
    rng = random.Random(variant)
    merged = 0
    for _ in range(8):
        specs = random_specs(space, rng)
        config = space.config(specs)
        student = built(model, specs)
        assert count_params(config) == sum(p.numel() for p in student.parameters()), specs
        predicted, counted = count_flops(config, batch=2), measured_flops(student, 2)
        assert abs(predicted - counted) <= 0.01 * counted, (predicted, counted, specs)
        merged += config.token_schedule[-1] < space.fingerprint.num_tokens
    assert merged > 0  # token merging was exercised


def test_extreme_settings_match(variant: str) -> None:
    """Full ranks, one head kept, one hidden unit kept, most merging, in every block."""
    model = variant_model(variant)
    space = variant_space(variant)
    shape = space.fingerprint.blocks[0]
    d, inner = shape.dim, shape.attn_inner
    attns = [
        AttentionSpec("lowrank", qkv_rank=min(d, 3 * inner), proj_rank=0),
        AttentionSpec("prune", heads_kept=1),
    ]
    if not shape.qk_norm:
        attns.append(AttentionSpec("heads", qk_rank=1, vo_rank=shape.head_dim))
    mlps = [MlpSpec("prune", hidden_kept=1), MlpSpec("lowrank", fc1_rank=0, fc2_rank=1)]
    for attn in attns:
        for mlp in mlps:
            specs = [BlockSpec(attn, mlp, 0.9) for _ in space.blocks]
            config = space.config(specs)
            student = built(model, specs)
            assert count_params(config) == sum(p.numel() for p in student.parameters())
            assert count_flops(config) == measured_flops(student, 1)


def test_merging_lowers_flops_quadratically_in_attention() -> None:
    space = variant_space("vit")
    dense = space.dense()
    merged = space.config([BlockSpec(merge_ratio=0.25) for _ in space.blocks])
    assert count_params(merged) == count_params(dense)
    assert count_flops(merged) < count_flops(dense)
    assert count_flops(dense, batch=3) == 3 * count_flops(dense)
    with pytest.raises(ValueError, match="batch >= 1"):
        count_flops(dense, batch=0)


@pytest.mark.parametrize("key", OPERATORS.names())
def test_every_registered_operator_is_counted_exactly(key: str, variant: str) -> None:
    """Params and FLOPs of each operator alone (at every grid's middle) equal the built model's."""
    from vitrank.core.operators import operator

    part, name = key.split(".")
    model = variant_model(variant)
    space = variant_space(variant)
    if name not in space.blocks[0].ops(part):
        pytest.skip(f"{key} is not offered on {variant}")
    specs = []
    for choice in space.blocks:
        grids = choice.grids(part, name)
        spec = operator(part, name).spec(**{k: g[len(g) // 2] for k, g in grids.items()})
        specs.append(BlockSpec(attn=spec) if part == "attn" else BlockSpec(mlp=spec))
    config = space.config(specs)
    student = built(model, specs)
    assert count_params(config) == sum(p.numel() for p in student.parameters())
    assert count_flops(config, batch=2) == measured_flops(student, 2)
