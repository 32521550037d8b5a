"""Tiny timm ViT variants and full-rank specs shared by the apply / io / api tests."""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn
from torch.utils.data import TensorDataset
from vitrank.core.operators import operator
from vitrank.core.spec import AttentionSpec, BlockSpec, MlpSpec
from vitrank.core.structure import BlockShape, Fingerprint

BASE_ARGS: dict[str, Any] = {
    "img_size": 16,
    "patch_size": 4,
    "embed_dim": 24,
    "depth": 2,
    "num_heads": 3,
    "num_classes": 5,
}

# name -> (timm architecture, create_model kwargs): cls token; cls + distillation token
# with two heads; register tokens + average pooling + layer scale; no biases anywhere;
# per-head q/k LayerNorm.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit": ("vit_small_patch16_224", {}),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}),
    "registers": (
        "vit_base_patch16_reg4_gap_256",
        {"reg_tokens": 4, "class_token": False, "global_pool": "avg", "init_values": 0.5},
    ),
    "no_bias": ("vit_small_patch16_224", {"qkv_bias": False, "proj_bias": False}),
    "qk_norm": ("vit_small_patch16_224", {"qk_norm": True}),
}


def model_args(name: str) -> dict[str, Any]:
    return {**BASE_ARGS, **VARIANTS[name][1]}


def build(name: str, seed: int = 0) -> nn.Module:
    """A random-weight variant in eval mode, with weights large enough that attention is
    far from uniform and every block matters (timm's init leaves the logits tiny)."""
    torch.manual_seed(seed)
    model = timm.create_model(VARIANTS[name][0], pretrained=False, **model_args(name))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname and pname.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif p.ndim >= 2:
                p.normal_(0.0, 1.2 / p.shape[-1] ** 0.5)
            else:
                p.normal_(0.0, 0.2)
    return model.eval()


def images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def calibration(model: nn.Module):
    from vitrank.evaluators.calibration import calibrate

    data = TensorDataset(images(8, seed=2), torch.zeros(8, dtype=torch.long))
    return calibrate(model, data, batch_size=4, progress=False)


def full_rank(shape: BlockShape, attn_op: str, mlp_op: str, merge_ratio: float = 0.0) -> BlockSpec:
    """A spec that reproduces the block exactly: every knob at the top of its limits."""

    def top(part: str, name: str) -> AttentionSpec | MlpSpec:
        op = operator(part, name)
        return op.spec(**{knob: high for knob, (_, high) in op.limits(shape).items()})

    return BlockSpec(top("attn", attn_op), top("mlp", mlp_op), merge_ratio)  # type: ignore[arg-type]


def _linear(n_in: int, n_out: int, bias: bool, rank: int = 0) -> int:
    weights = rank * (n_in + n_out) if rank else n_in * n_out
    return weights + (n_out if bias else 0)


def expected_params(fp: Fingerprint, specs: list[BlockSpec]) -> int:
    """The parameter count a built model must have, counted from the specs alone."""
    total = fp.other_params
    for s, spec in zip(fp.blocks, specs, strict=True):
        d, heads, dh, hidden = s.dim, s.num_heads, s.head_dim, s.mlp_hidden
        a, m = spec.attn, spec.mlp
        if a.op in ("dense", "prune"):
            inner = (a.heads_kept if a.op == "prune" else heads) * dh
            attn = _linear(d, 3 * inner, s.qkv_bias) + _linear(inner, d, s.proj_bias)
        elif a.op == "lowrank":
            attn = _linear(d, 3 * s.attn_inner, s.qkv_bias, a.qkv_rank)
            attn += _linear(s.attn_inner, d, s.proj_bias, a.proj_rank)
        else:  # heads, cdcp: q', k' (biases with a qkv bias), key map (merging), v', out + bias
            qk, v = (a.qk_rank, a.vo_rank) if a.op == "heads" else (a.qk_kept, a.v_kept)
            attn = 2 * heads * qk * (d + s.qkv_bias)
            attn += heads * qk * dh if spec.merge_ratio > 0 else 0
            attn += 2 * heads * v * d + d
        kept = m.hidden_kept if m.op == "prune" else hidden
        r1, r2 = (m.fc1_rank, m.fc2_rank) if m.op == "lowrank" else (0, 0)
        mlp = _linear(d, kept, s.fc1_bias, r1) + _linear(kept, d, s.fc2_bias, r2)
        total += s.fixed_params + attn + mlp
    return total


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
