"""Search spaces: only saving ranks, operator families as asked, reachable extremes."""

from __future__ import annotations

import random

import pytest
from _spaces_cases import random_specs, variant_model, variant_space
from vitrank.core.spec import AttentionSpec, BlockSpec
from vitrank.core.structure import inspect_vit
from vitrank.spaces import build_space, count_flops, count_params, saving_ranks
from vitrank.spaces._cost import attention_linears


def test_saving_ranks() -> None:
    assert saving_ranks(32, 96, 8) == (8, 16)  # 24 * 128 = 3072 == 32 * 96 does not save
    assert saving_ranks(384, 1536, 8)[-1] == 304  # < 384·1536/1920 = 307.2
    assert saving_ranks(8, 8, 8) == ()


def test_grids_hold_only_saving_values(variant: str) -> None:
    space = variant_space(variant)
    for shape, choice in zip(space.fingerprint.blocks, space.blocks, strict=True):
        d, inner, hidden = shape.dim, shape.attn_inner, shape.mlp_hidden
        pairs = [
            (choice.grid("attn", "lowrank", "qkv_rank"), d, 3 * inner),
            (choice.grid("attn", "lowrank", "proj_rank"), inner, d),
            (choice.grid("mlp", "lowrank", "fc1_rank"), d, hidden),
            (choice.grid("mlp", "lowrank", "fc2_rank"), hidden, d),
        ]
        for grid, n_in, n_out in pairs:
            assert grid, (shape.name, n_in, n_out)
            assert all(r % space.granularity == 0 for r in grid)
            assert all(r * (n_in + n_out) < n_in * n_out for r in grid)
        dense_attn = sum(x.params for x in attention_linears(shape, AttentionSpec()))
        for qk in choice.grid("attn", "heads", "qk_rank"):
            for vo in choice.grid("attn", "heads", "vo_rank"):
                heads = AttentionSpec("heads", qk_rank=qk, vo_rank=vo)
                assert sum(x.params for x in attention_linears(shape, heads)) < dense_attn
        assert all(0 < k < shape.num_heads for k in choice.grid("attn", "prune", "heads_kept"))
        assert all(0 < k < hidden for k in choice.grid("mlp", "prune", "hidden_kept"))
        assert ("heads" in choice.attention_ops) == (not shape.qk_norm)


def test_head_rank_step_follows_head_dim() -> None:
    # head_dim 16: step min(8, 16 // 4) = 4; head_dim 8 (reg_gap: 32 / 4 heads): step 2.
    assert variant_space("vit").blocks[0].grid("attn", "heads", "qk_rank") == (4, 8, 12)
    assert variant_space("reg_gap").blocks[0].grid("attn", "heads", "qk_rank") == (2, 4, 6)
    assert variant_space("vit", granularity=2).blocks[0].grid("attn", "heads", "qk_rank") == tuple(
        range(2, 16, 2)
    )


def test_ops_restrict_the_choices() -> None:
    space = variant_space("vit", ops=("lowrank",))
    for choice in space.blocks:
        assert choice.attention_ops == ("dense", "lowrank")
        assert choice.mlp_ops == ("dense", "lowrank")
        assert choice.merge_ratios == (0.0,)
    space = variant_space("vit", ops="heads,tokens")
    assert space.blocks[0].attention_ops == ("dense", "heads")
    assert space.blocks[0].mlp_ops == ("dense",)
    assert max(space.blocks[0].merge_ratios) == 0.25
    with pytest.raises(ValueError, match=r"Unknown operator families \['pruning'\].*known"):
        variant_space("vit", ops=("pruning",))
    with pytest.raises(ValueError, match="granularity >= 1"):
        variant_space("vit", granularity=0)


def test_fingerprint_or_model_give_the_same_space() -> None:
    model = variant_model("vit")
    from_model = build_space(model, model_name="m")
    from_fingerprint = build_space(inspect_vit(model), model_name="m")
    assert from_model == from_fingerprint
    assert from_model.fingerprint == inspect_vit(model)  # what apply checks against


def test_smallest_reachable_bounds_every_config(variant: str) -> None:
    space = variant_space(variant)
    smallest_params, smallest_flops = space.min_params, space.min_flops
    assert smallest_params < space.dense_params
    assert smallest_flops < space.dense_flops
    rng = random.Random(1)
    for _ in range(30):
        config = space.config(random_specs(space, rng))
        assert count_params(config) >= smallest_params
        assert count_flops(config) >= smallest_flops


def test_describe_is_a_table() -> None:
    space = variant_space("deit_distilled")
    text = space.describe()
    lines = text.splitlines()
    assert len(lines) == 3 + len(space.blocks) + 1
    assert lines[3].startswith("blocks.0") and "dense|lowrank|heads|prune" in lines[3]
    assert f"dense {space.dense_params:,}" in text
    assert f"smallest reachable {space.min_params:,}" in text


def test_describe_has_a_column_for_every_registered_operators_knobs() -> None:
    from vitrank.core.operators import OPERATORS

    space = variant_space("vit")
    header = space.describe().splitlines()[1]
    for key, op in OPERATORS.items():
        if op.knobs:
            assert f"{op.name} {'/'.join(op.knobs)}" in header, key


def test_config_of_a_space() -> None:
    space = variant_space("vit")
    config = space.config([BlockSpec(merge_ratio=0.1)] * len(space.blocks))
    assert config.model == "vit_small_patch16_224"
    assert config.model_args["depth"] == 3
    assert config.fingerprint == space.fingerprint
