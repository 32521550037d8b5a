"""Channel and head pruning: exact at keep=all, right sizes, compensation helps."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from vitrank.core.attention import DenseAttention
from vitrank.core.prune import (
    head_scores,
    mlp_unit_scores,
    prune_heads,
    prune_mlp,
    top_indices,
)


def _trained_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw the Linears at the scale of a trained network (timm's init is ~50x smaller,
    which leaves GELU nearly linear and every hidden mean near zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                fan_in = module.in_features
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
                module.weight.mul_(fan_in**-0.5)
                if module.bias is not None:
                    module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=generator))
    return model


def _block_inputs(model: nn.Module, images: Tensor, index: int) -> tuple[Tensor, Tensor]:
    """Normalised inputs of block ``index``'s attention and MLP on real tokens."""
    inputs: dict[str, Tensor] = {}
    block = model.blocks[index]
    hooks = [
        block.attn.register_forward_pre_hook(lambda _m, args: inputs.update(attn=args[0])),
        block.mlp.register_forward_pre_hook(lambda _m, args: inputs.update(mlp=args[0])),
    ]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    return inputs["attn"], inputs["mlp"]


def _input_of(layer: nn.Module, module: nn.Module, x: Tensor) -> Tensor:
    """The input that ``layer`` sees when ``module`` runs on ``x``, flattened to rows."""
    seen: list[Tensor] = []
    hook = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        module(x)
    hook.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])


def _mlp_from(pruned, act: nn.Module) -> nn.Sequential:
    fc1 = nn.Linear(pruned.fc1_weight.shape[1], pruned.fc1_weight.shape[0])
    fc2 = nn.Linear(pruned.fc2_weight.shape[1], pruned.fc2_weight.shape[0])
    with torch.no_grad():
        fc1.weight.copy_(pruned.fc1_weight)
        fc1.bias.copy_(pruned.fc1_bias)
        fc2.weight.copy_(pruned.fc2_weight)
        fc2.bias.copy_(pruned.fc2_bias)
    return nn.Sequential(fc1, act, fc2)


def _prune_mlp(mlp: nn.Module, hidden: Tensor, keep: int, compensate: bool = True):
    return prune_mlp(
        mlp.fc1.weight,
        mlp.fc1.bias,
        mlp.fc2.weight,
        mlp.fc2.bias,
        hidden.abs().mean(0),
        hidden.double().mean(0) if compensate else None,
        keep,
    )


def _prune_attn(attn: nn.Module, out: Tensor, keep: int, compensate: bool = True):
    heads, head_dim = attn.num_heads, attn.head_dim
    return prune_heads(
        attn.qkv.weight,
        attn.qkv.bias,
        attn.proj.weight,
        attn.proj.bias,
        out.reshape(-1, heads, head_dim).abs().mean(dim=(0, 2)),
        out.double().mean(0) if compensate else None,
        heads,
        head_dim,
        keep,
    )


def _attention_from(pruned, attn: nn.Module) -> DenseAttention:
    return DenseAttention.from_weights(
        pruned.qkv_weight,
        pruned.qkv_bias,
        pruned.proj_weight,
        pruned.proj_bias,
        len(pruned.kept),
        attn.head_dim,
        attn.scale,
    )


def _mse(a: Tensor, b: Tensor) -> float:
    return float((a - b).double().square().mean())


def test_mlp_keep_all_is_exact(tiny_vit) -> None:
    model = tiny_vit()
    _, x = _block_inputs(model, torch.randn(4, 3, 16, 16), 0)
    mlp = model.blocks[0].mlp
    hidden = _input_of(mlp.fc2, mlp, x)
    pruned = _prune_mlp(mlp, hidden, keep=hidden.shape[1])
    assert torch.equal(pruned.kept, torch.arange(hidden.shape[1]))
    with torch.no_grad():
        assert torch.equal(_mlp_from(pruned, mlp.act)(x), mlp(x))


def test_heads_keep_all_is_exact(tiny_vit) -> None:
    model = tiny_vit(num_heads=4)
    x, _ = _block_inputs(model, torch.randn(4, 3, 16, 16), 1)
    attn = model.blocks[1].attn
    out = _input_of(attn.proj, attn, x)
    pruned = _prune_attn(attn, out, keep=4)
    with torch.no_grad():
        assert torch.equal(_attention_from(pruned, attn)(x)[0], attn(x))


@pytest.mark.parametrize("keep", [1, 37, 100])
def test_mlp_pruned_size_and_compensation(tiny_vit, keep: int) -> None:
    model = _trained_like(tiny_vit())
    calib = _block_inputs(model, torch.randn(16, 3, 16, 16), 1)[1]
    held_out = _block_inputs(model, torch.randn(16, 3, 16, 16), 1)[1]
    mlp = model.blocks[1].mlp
    dim, full_hidden = mlp.fc1.in_features, mlp.fc1.out_features
    hidden = _input_of(mlp.fc2, mlp, calib)

    pruned = _prune_mlp(mlp, hidden, keep)
    plain = _prune_mlp(mlp, hidden, keep, compensate=False)
    compensated, removed = _mlp_from(pruned, mlp.act), _mlp_from(plain, mlp.act)
    params = sum(p.numel() for p in compensated.parameters())
    assert params == keep * (dim + 1) + dim * keep + dim
    assert params < sum(p.numel() for p in mlp.parameters())
    assert torch.equal(pruned.kept, plain.kept) and len(pruned.kept) == keep < full_hidden
    with torch.no_grad():
        reference = mlp(held_out)
        error_compensated = _mse(compensated(held_out), reference)
        error_removed = _mse(removed(held_out), reference)
    assert error_compensated < 0.9 * error_removed, (error_compensated, error_removed)


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_heads_pruned_size_and_compensation(tiny_vit, keep: int) -> None:
    model = _trained_like(tiny_vit(num_heads=4))
    calib = _block_inputs(model, torch.randn(16, 3, 16, 16), 1)[0]
    held_out = _block_inputs(model, torch.randn(16, 3, 16, 16), 1)[0]
    attn = model.blocks[1].attn
    dim, head_dim = attn.qkv.in_features, attn.head_dim
    out = _input_of(attn.proj, attn, calib)

    pruned = _attention_from(_prune_attn(attn, out, keep), attn)
    plain = _attention_from(_prune_attn(attn, out, keep, compensate=False), attn)
    params = sum(p.numel() for p in pruned.parameters())
    assert params == 3 * keep * head_dim * (dim + 1) + dim * keep * head_dim + dim
    with torch.no_grad():
        reference = attn(held_out)
        error_compensated = _mse(pruned(held_out)[0], reference)
        error_removed = _mse(plain(held_out)[0], reference)
    assert error_compensated < 0.9 * error_removed, (error_compensated, error_removed)


def test_pruned_heads_equal_the_teacher_with_those_heads_silenced(tiny_vit) -> None:
    model = tiny_vit(num_heads=4)
    x, _ = _block_inputs(model, torch.randn(2, 3, 16, 16), 0)
    attn = model.blocks[0].attn
    out = _input_of(attn.proj, attn, x)
    pruned = _prune_attn(attn, out, keep=2, compensate=False)
    silenced = torch.ones(4, attn.head_dim)
    silenced[[h for h in range(4) if h not in pruned.kept.tolist()]] = 0
    hook = attn.proj.register_forward_pre_hook(lambda _m, args: args[0] * silenced.reshape(-1))
    with torch.no_grad():
        expected = attn(x)
    hook.remove()
    with torch.no_grad():
        got = _attention_from(pruned, attn)(x)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_scores_rank_by_activation_times_weight_norm() -> None:
    fc2 = torch.ones(3, 5)
    fc2[:, 1] = 0  # a unit that cannot move the output
    abs_mean = torch.tensor([1.0, 9.0, 0.5, 2.0, 3.0])
    scores = mlp_unit_scores(fc2, abs_mean)
    assert top_indices(scores, 3).tolist() == [0, 3, 4]
    proj = torch.ones(4, 6)  # 3 heads of 2 channels
    proj[:, 4:] *= 10
    assert top_indices(head_scores(proj, torch.tensor([1.0, 2.0, 0.5]), 3, 2), 1).tolist() == [2]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="keep <= 5"):
        top_indices(torch.ones(5), 6)
    with pytest.raises(ValueError, match="keep <= 5"):
        top_indices(torch.ones(5), 0)
    with pytest.raises(ValueError, match="hidden_abs_mean"):
        mlp_unit_scores(torch.ones(3, 5), torch.ones(4))


def test_bias_free_layers_are_pruned_without_compensation() -> None:
    fc1, fc2 = torch.randn(6, 4), torch.randn(4, 6)
    pruned = prune_mlp(fc1, None, fc2, None, torch.rand(6), torch.rand(6), keep=3)
    assert pruned.fc1_bias is None and pruned.fc2_bias is None
    assert pruned.fc1_weight.shape == (3, 4) and pruned.fc2_weight.shape == (4, 3)


def test_pruned_and_merged_model_costs_what_the_config_predicts(tiny_vit) -> None:
    """Pruning composes with merging in one model, whose parameters and FLOPs are the
    cost model's predictions (FLOPs counted on the real model, attention as matmuls)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.data import TensorDataset
    from torch.utils.flop_counter import FlopCounterMode
    from vitrank.core.apply import apply_specs
    from vitrank.core.spec import AttentionSpec, BlockSpec, MlpSpec
    from vitrank.core.structure import inspect_vit
    from vitrank.evaluators.calibration import calibrate
    from vitrank.spaces import CompressionConfig, count_flops, count_params

    from tests.conftest import TINY_VIT_ARGS

    model = tiny_vit(num_heads=4, depth=3)
    images = torch.randn(8, 3, 16, 16)
    stats = calibrate(model, TensorDataset(images, torch.zeros(8)), progress=False)
    specs = (
        BlockSpec(AttentionSpec("prune", heads_kept=3), MlpSpec("prune", hidden_kept=40), 0.25),
        BlockSpec(mlp=MlpSpec("prune", hidden_kept=7)),
        BlockSpec(AttentionSpec("prune", heads_kept=1), merge_ratio=0.4),
    )
    config = CompressionConfig(
        model="vit_small_patch16_224",
        model_args={**TINY_VIT_ARGS, "num_heads": 4, "depth": 3},
        fingerprint=inspect_vit(model),
        blocks=specs,
    )
    student = apply_specs(model, specs, None, stats)
    assert sum(p.numel() for p in student.parameters()) == count_params(config)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        student(images[:1])
    assert counter.get_total_flops() == count_flops(config)
