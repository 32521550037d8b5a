"""Calibration statistics: exact sums, every ViT variant, bounded state, the on-disk cache."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from vitrank.core.stats import CalibrationStats, linear_keys
from vitrank.evaluators import calibration
from vitrank.evaluators.calibration import calibrate, calibrate_cached


def _tiny(**overrides):
    from tests.conftest import make_tiny_vit

    return make_tiny_vit(**overrides)


def _data(n: int = 10, seed: int = 0, dtype=torch.float32) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 16, 16, generator=g).to(dtype)
    return TensorDataset(images, torch.zeros(n, dtype=torch.long))


def _reference(model, images):
    """Direct fp64 statistics from captured activations and timm's explicit attention."""
    inputs = {}
    handles = []
    for i, block in enumerate(model.blocks):
        for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "attn"):

            def hook(module, args, key=f"blocks.{i}.{name}"):
                inputs[key] = args[0].detach().double()

            handles.append(block.get_submodule(name).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    grams, heads = {}, {}
    for key, x in inputs.items():
        if key.endswith(".attn"):
            block = model.get_submodule(key[: -len(".attn")])
            attn = block.attn
            with torch.no_grad():
                B, N, _ = x.shape
                qkv = attn.qkv(x.to(attn.qkv.weight.dtype)).double()
                qkv = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
                q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
                A = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
            Ax = A @ x.unsqueeze(1)
            heads[int(key.split(".")[1])] = torch.einsum("bhni,bhnj->hij", Ax, Ax)
        else:
            x_bar = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1).reshape(-1, x.shape[-1] + 1)
            grams[key] = x_bar.T @ x_bar
    return grams, heads, inputs


@pytest.mark.parametrize(
    "overrides",
    [
        {"qkv_bias": True},
        {"qkv_bias": False, "class_token": False, "global_pool": "avg"},
        {"qk_norm": True},
        {"reg_tokens": 4, "no_embed_class": True},
    ],
)
def test_sums_equal_direct_computation(overrides):
    model = _tiny(**overrides).double()
    data = _data(7, dtype=torch.float64)
    stats = calibrate(model, data, batch_size=3, progress=False)
    grams, heads, inputs = _reference(model, data.tensors[0])
    assert sorted(stats.gram) == sorted(linear_keys(2))
    tokens = 7 * (16 + model.num_prefix_tokens)
    for key, gram in grams.items():
        torch.testing.assert_close(stats.gram[key], gram, rtol=1e-10, atol=1e-9)
        assert stats.tokens(key) == tokens
    for i, head_gram in heads.items():
        torch.testing.assert_close(stats.head_gram[i], head_gram, rtol=1e-10, atol=1e-9)
        hidden = inputs[f"blocks.{i}.mlp.fc2"].abs().reshape(tokens, -1).mean(0)
        torch.testing.assert_close(stats.hidden_abs_mean[i], hidden)
        o = inputs[f"blocks.{i}.attn.proj"].abs().reshape(tokens, 2, -1).mean((0, 2))
        torch.testing.assert_close(stats.head_abs_mean[i], o)
        torch.testing.assert_close(
            stats.mean(f"blocks.{i}.mlp.fc2"),
            inputs[f"blocks.{i}.mlp.fc2"].reshape(tokens, -1).mean(0),
        )
    C = stats.covariance("blocks.0.mlp.fc1")
    x = inputs["blocks.0.mlp.fc1"].reshape(tokens, -1)
    torch.testing.assert_close(C, x.T @ x / tokens)
    assert stats.num_images == 7 and stats.num_blocks == 2


def test_batch_size_max_images_and_dataloader_do_not_change_the_sums():
    model = _tiny(qkv_bias=True)
    data = _data(9)
    whole = calibrate(model, data, batch_size=9, progress=False)
    loader = DataLoader(TensorDataset(*[torch.cat([t, t]) for t in data.tensors]), batch_size=4)
    capped = calibrate(model, loader, max_images=9, progress=False)
    assert capped.num_images == 9
    for key in whole.gram:
        torch.testing.assert_close(capped.gram[key], whole.gram[key], rtol=1e-9, atol=1e-6)
    for i in whole.head_gram:
        torch.testing.assert_close(capped.head_gram[i], whole.head_gram[i], rtol=1e-9, atol=1e-6)


def test_model_is_left_as_found_and_fused_attention_untouched():
    model = _tiny(qkv_bias=True).train()
    images = _data(4).tensors[0]
    calibrate(model, _data(4), progress=False)
    assert model.training
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    model.eval()
    with torch.no_grad():
        before = model(images)
    calibrate(model, _data(4), progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(images), before, rtol=0, atol=0)


def test_non_finite_activations_are_reported():
    model = _tiny(qkv_bias=True)
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="blocks.1.mlp.fc2 holds .* NaN/Inf"):
        calibrate(model, _data(3), progress=False)


def test_save_load_round_trip(tmp_path):
    stats = calibrate(_tiny(qkv_bias=True), _data(3), progress=False)
    stats.save(tmp_path / "s.safetensors")
    loaded = CalibrationStats.load(tmp_path / "s.safetensors")
    assert loaded.num_images == 3
    for name, value in stats._named_tensors().items():
        assert torch.equal(loaded._named_tensors()[name], value)


def test_cache_hit_miss_and_damaged_file(tmp_path, monkeypatch):
    model = _tiny(qkv_bias=True)
    data = _data(4)
    runs = []
    real = calibration.calibrate

    def counted(*args, **kwargs):
        runs.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(calibration, "calibrate", counted)
    first = calibrate_cached(model, data, tmp_path, key="digits:calib:4", progress=False)
    again = calibrate_cached(model, data, tmp_path, key="digits:calib:4", progress=False)
    assert len(runs) == 1
    assert torch.equal(first.gram["blocks.1.mlp.fc2"], again.gram["blocks.1.mlp.fc2"])
    calibrate_cached(model, data, tmp_path, key="digits:calib:4", max_images=2, progress=False)
    calibrate_cached(model, data, tmp_path, key="other-data", progress=False)
    assert len(runs) == 3
    with torch.no_grad():
        model.blocks[0].attn.proj.weight[0, 0] += 1.0  # new weights: a new entry
    calibrate_cached(model, data, tmp_path, key="digits:calib:4", progress=False)
    assert len(runs) == 4
    path = calibration.cache_path(model, tmp_path, "digits:calib:4", 64, None)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match="damaged.*recomputing"):
        redone = calibrate_cached(model, data, tmp_path, key="digits:calib:4", progress=False)
    assert len(runs) == 5 and redone.num_images == 4
    assert CalibrationStats.load(path).num_images == 4  # rewritten whole


def test_unsupported_model_and_empty_data():
    from timm.models.vision_transformer import VisionTransformer
    from vitrank.core.structure import UnsupportedModelError

    with pytest.raises(UnsupportedModelError):
        calibrate(torch.nn.Linear(3, 3), _data(2), progress=False)
    model = _tiny()
    assert isinstance(model, VisionTransformer)
    with pytest.raises(ValueError, match="at least one image"):
        calibrate(model, TensorDataset(torch.zeros(0, 3, 16, 16), torch.zeros(0)), progress=False)
