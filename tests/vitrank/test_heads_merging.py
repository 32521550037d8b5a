"""`heads` attention under token merging: the teacher's merge metric, no zero q/k biases,
and states saved before either change still load."""

from __future__ import annotations

import copy
from itertools import pairwise

import pytest
import torch
from _compress_cases import (
    VARIANTS,
    build,
    calibration,
    count_params,
    expected_params,
    full_rank,
    model_args,
)
from _compress_cases import images as make_images
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from vitrank.core.apply import apply_specs
from vitrank.core.attention import DenseAttention, HeadFactorizedAttention
from vitrank.core.factorize import FactorCache
from vitrank.core.io import load_model, save_model
from vitrank.core.spec import AttentionSpec, BlockSpec
from vitrank.core.structure import inspect_vit

HEAD_VARIANTS = [name for name in sorted(VARIANTS) if name != "qk_norm"]


@pytest.fixture(scope="module", params=HEAD_VARIANTS)
def teacher(request):
    """(name, fp64 teacher, stats, {svd kind: FactorCache})."""
    model = build(request.param).double()
    stats = calibration(model)
    factors = {"whitened": FactorCache(model, stats), "plain": FactorCache(model, None)}
    return request.param, model, stats, factors


def _tokens_out(model, x):
    tokens = model._pos_embed(model.patch_embed(x))
    return model.blocks.forward_tokens(tokens)


def _without_key_maps(model):
    """`model` as saved before key maps: merging compares the factorized keys."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("key_map.weight")}
    legacy = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="predates key maps"):
        legacy.load_state_dict(state)
    return legacy


@pytest.mark.parametrize("kind", ["whitened", "plain"])
@pytest.mark.parametrize("merge_ratio", [0.25, 0.4])
def test_full_rank_heads_merge_exactly_like_the_dense_teacher(teacher, kind, merge_ratio):
    name, model, stats, factors = teacher
    fp = inspect_vit(model)
    x = make_images(16).double()
    dense = apply_specs(
        model, [full_rank(s, "dense", "dense", merge_ratio) for s in fp.blocks], None
    )
    specs = [full_rank(s, "heads", "dense", merge_ratio) for s in fp.blocks]
    heads = apply_specs(model, specs, factors[kind], stats)
    with torch.no_grad():
        _, ref_size, ref_source = _tokens_out(dense, x)
        _, size, source = _tokens_out(heads, x)
        assert source.amax() < fp.num_tokens - 1  # tokens were merged
        assert torch.equal(source, ref_source) and torch.equal(size, ref_size)
        ref = dense(x)
        torch.testing.assert_close(heads(x), ref, rtol=0, atol=1e-8)
        # Comparing the factorized keys instead (as before key maps) merges other tokens.
        assert (_without_key_maps(heads)(x) - ref).abs().max() > 1e-2
    assert count_params(heads) == expected_params(fp, specs)


@torch.no_grad()
def _attention_inputs(model, x) -> list[torch.Tensor]:
    inputs: dict[int, torch.Tensor] = {}
    handles = [
        block.attn.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
        for i, block in enumerate(model.blocks)
    ]
    model(x)
    for handle in handles:
        handle.remove()
    return [inputs[i] for i in range(len(handles))]


def _teacher_key_factors(attn) -> torch.Tensor:
    """[W_kʰ, b_kʰ]ᵀ per head: (H, d + 1, d_h)."""
    inner = attn.num_heads * attn.head_dim
    W = attn.qkv.weight.detach()[inner : 2 * inner]
    b = (
        attn.qkv.bias.detach()[inner : 2 * inner]
        if attn.qkv.bias is not None
        else W.new_zeros(inner)
    )
    return torch.cat([W, b[:, None]], 1).reshape(attn.num_heads, attn.head_dim, -1).mT


@pytest.mark.parametrize("kind", ["whitened", "plain"])
def test_merge_metric_error_falls_as_the_rank_grows(teacher, kind):
    name, model, stats, factors = teacher
    cache = factors[kind]
    inputs = _attention_inputs(model, make_images(16, seed=5).double())
    for i, (block, x) in enumerate(zip(model.blocks, inputs, strict=True)):
        attn, dh = block.attn, block.attn.head_dim
        with torch.no_grad():
            ref = DenseAttention.from_timm(attn)(x)[1]
        C_bar = stats.augmented_covariance(f"blocks.{i}.attn.qkv")
        k_bar = _teacher_key_factors(attn)
        metric_errors, key_errors = [], []
        for rank in range(1, dh + 1):
            P, Q = cache.qk(i, rank)
            V, out_factor, out_bias = cache.vo(i, dh)
            module = HeadFactorizedAttention.from_factors(
                P, Q, cache.key_maps(i, rank), V, out_factor, out_bias, attn.scale,
                qk_bias=attn.qkv.bias is not None,
            )  # fmt: skip
            with torch.no_grad():
                keys = module(x)[1]
            metric_errors.append(float((keys - ref).norm() / ref.norm()))
            # Per head, E‖k_h - k'_h G_h‖² on the calibration tokens.
            delta = k_bar - Q @ cache.key_maps(i, rank)
            key_errors.append(float(torch.einsum("hij,ik,hkj->", delta, C_bar, delta)))
        energy = float(torch.einsum("hij,ik,hkj->", k_bar, C_bar, k_bar))
        assert metric_errors[-1] < 1e-12 and key_errors[-1] < 1e-20 * energy
        # Held-out tokens: the head-averaged keys get closer with every rank.
        assert all(a > b for a, b in pairwise(metric_errors)), metric_errors
        if kind == "whitened":  # least squares on the calibration tokens: never worse
            assert all(a >= b for a, b in pairwise(key_errors)), key_errors


def test_no_qkv_bias_means_no_q_k_bias():
    for name, has_bias in (("no_bias", False), ("vit", True)):
        model = build(name)
        stats = calibration(model)
        fp = inspect_vit(model)
        cache = FactorCache(model, stats)
        specs = [BlockSpec(AttentionSpec("heads", qk_rank=3, vo_rank=5)) for _ in fp.blocks]
        student = apply_specs(model, specs, cache, stats)
        for block in student.blocks:
            assert (block.attn.q.bias is not None) == (block.attn.k.bias is not None) == has_bias
        assert count_params(student) == expected_params(fp, specs)
        if not has_bias:  # the dropped rows are zero up to rounding
            P, Q = cache.qk(0, 8)
            assert P[:, -1].abs().max() <= 1e-6 * P.abs().max()
            assert Q[:, -1].abs().max() <= 1e-6 * Q.abs().max()
        skeleton = apply_specs(model, specs, None, structure_only=True)
        assert {k: v.shape for k, v in skeleton.state_dict().items()} == {
            k: v.shape for k, v in student.state_dict().items()
        }


def _saved_no_bias_model(tmp_path):
    model = build("no_bias")
    stats = calibration(model)
    specs = [
        BlockSpec(AttentionSpec("heads", qk_rank=3, vo_rank=5), merge_ratio=0.3)
        for _ in inspect_vit(model).blocks
    ]
    student = apply_specs(model, specs, FactorCache(model, stats), stats)
    meta = {"model": VARIANTS["no_bias"][0], "model_args": model_args("no_bias"), "blocks": specs}
    save_model(student, tmp_path, meta)
    return student


def _rewrite_weights(path, change):
    state = load_file(str(path))
    change(state)
    save_file(state, str(path), metadata={"format": "pt"})


def test_models_saved_with_zero_q_k_biases_and_no_key_maps_still_load(tmp_path):
    student = _saved_no_bias_model(tmp_path)

    def to_old_format(state):
        for key in [k for k in state if k.endswith("key_map.weight")]:
            del state[key]
        for i in range(len(student.blocks)):
            for name in ("q", "k"):
                # What factorizing a bias-free teacher used to store: zero up to rounding.
                weight = state[f"blocks.{i}.attn.{name}.weight"]
                state[f"blocks.{i}.attn.{name}.bias"] = torch.full(weight.shape[:1], 1e-12)

    _rewrite_weights(tmp_path / "model.safetensors", to_old_format)
    with pytest.warns(UserWarning, match="predates key maps"):
        loaded, _ = load_model(tmp_path)
    assert all(block.attn.q.bias is None for block in loaded.blocks)
    x = make_images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), _without_key_maps(student).eval()(x))


def test_a_trained_q_bias_where_the_structure_has_none_is_refused(tmp_path):
    _saved_no_bias_model(tmp_path)

    def add_bias(state):
        weight = state["blocks.0.attn.q.weight"]
        state["blocks.0.attn.q.bias"] = torch.full(weight.shape[:1], 0.1)

    _rewrite_weights(tmp_path / "model.safetensors", add_bias)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q\.bias.*non-zero"):
        load_model(tmp_path)


def test_factor_files_without_key_maps_get_them_from_the_teacher(tmp_path):
    model = build("vit").double()
    stats = calibration(model)
    cache = FactorCache(model, stats)
    path = tmp_path / "factors.safetensors"
    cache.save(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.endswith(".keys")}
    save_file(tensors, str(path), metadata=metadata)
    loaded = FactorCache.load(path, model)
    for i in range(len(model.blocks)):
        for rank in (1, 5, 8):
            torch.testing.assert_close(
                loaded.key_maps(i, rank), cache.key_maps(i, rank), rtol=1e-7, atol=1e-9
            )
