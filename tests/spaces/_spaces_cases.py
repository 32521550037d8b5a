"""Tiny timm ViT variants and random configs the spaces tests share."""

from __future__ import annotations

import functools
import random
from typing import Any

from torch import nn
from vitrank.core.spec import AttentionSpec, BlockSpec, MlpSpec
from vitrank.spaces import SearchSpace, build_space, search_families

from tests.conftest import TINY_VIT_ARGS, make_tiny_vit

# (timm name, overrides): a cls-token ViT with 3 blocks; a distilled DeiT (cls + dist tokens,
# two heads); registers + average pooling, no cls token; no qkv bias, layer scale, qk-norm.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit": ("vit_small_patch16_224", {"depth": 3}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {"embed_dim": 48, "num_heads": 3}),
    "reg_gap": ("vit_base_patch16_reg4_gap_256", {"img_size": 20, "num_heads": 4}),
    "qknorm_ls": (
        "vit_small_patch16_224",
        {"qkv_bias": False, "qk_norm": True, "init_values": 1e-5, "mlp_ratio": 3.0},
    ),
}


def variant_model(key: str) -> nn.Module:
    arch, overrides = VARIANTS[key]
    return make_tiny_vit(arch, **overrides)


@functools.cache
def variant_space(key: str, **kwargs: Any) -> SearchSpace:
    """The variant's space with every operator family (those off by default too), unless
    `ops` says otherwise."""
    arch, overrides = VARIANTS[key]
    args = {**TINY_VIT_ARGS, **overrides}
    kwargs.setdefault("ops", search_families())
    return build_space(variant_model(key), model_name=arch, model_args=args, **kwargs)


def random_specs(space: SearchSpace, rng: random.Random) -> list[BlockSpec]:
    """A random point of the space; sometimes a lowrank Linear left dense (rank 0)."""
    specs = []
    for choice in space.blocks:
        op = rng.choice(choice.attention_ops)
        knobs = {k: rng.choice(g) for k, g in choice.attention_grids(op).items()}
        if op == "lowrank" and rng.random() < 0.2:
            knobs[rng.choice(sorted(knobs))] = 0
        attn = AttentionSpec(op, **knobs)
        op = rng.choice(choice.mlp_ops)
        knobs = {k: rng.choice(g) for k, g in choice.mlp_grids(op).items()}
        if op == "lowrank" and rng.random() < 0.2:
            knobs[rng.choice(sorted(knobs))] = 0
        specs.append(BlockSpec(attn, MlpSpec(op, **knobs), rng.choice(choice.merge_ratios)))
    return specs
