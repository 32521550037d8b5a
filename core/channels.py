"""Head-consistent channel pruning of attention, as pure functions (CDCP-like, see
docs/operators.md): the same query/key channels removed in every head, and the same value
channels, so every head keeps one width and the kernels stay dense.

The logit of head h is Σ_c q_{h,c} k_{h,c}: removing channel c of the query/key width
drops that term from every head's logits. Channel c scores Σ_h (E[q_{h,c}²] E[k_{h,c}²])^½,
a bound on its terms' mean magnitude (Cauchy-Schwarz), from the second moment of qkv's
input (`CalibrationStats.augmented_covariance`, biases included). Value channel c of head h
reaches the output through the proj columns of (h, c); it scores
Σ_h Var[o_{h,c}] ‖W_proj[:, (h, c)]‖², the output energy its removal leaves after the
removed channels' mean contribution W_proj[:, removed] E[o_removed] is folded into the
output bias (exact in the mean: the mean of a removed channel of the attention output is a
constant the output bias can carry). The kept value bias folds into the output bias too,
exactly, because every row of the attention matrix sums to one.

The kept channels keep the teacher's softmax scale head_dim^-½: the logits lose terms,
their scale does not change.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from vitrank.core.prune import top_indices


class PrunedChannels(NamedTuple):
    q_weight: Tensor  # (H · qk_kept, d): head h's kept channels at rows h · qk_kept + j
    q_bias: Tensor | None
    k_weight: Tensor
    k_bias: Tensor | None
    v_weight: Tensor  # (H · v_kept, d), no bias (folded into out_bias)
    out_weight: Tensor  # (d, H · v_kept)
    out_bias: Tensor  # (d,)
    key_map: Tensor | None  # (head_dim, H · qk_kept): mean_h of the teacher's keys, fitted
    qk_kept: Tensor  # channel indices within a head, ascending
    v_kept: Tensor


def _heads(weight: Tensor, bias: Tensor | None, part: int, heads: int, head_dim: int) -> Tensor:
    """[W, b] of q (part 0), k (1) or v (2) of a timm qkv, per head: (H, head_dim, d + 1)."""
    inner = heads * head_dim
    rows = slice(part * inner, (part + 1) * inner)
    w = weight[rows].double()
    b = w.new_zeros(inner) if bias is None else bias[rows].double()
    return torch.cat([w, b[:, None]], dim=1).reshape(heads, head_dim, -1)


def channel_energy(augmented: Tensor, second_moment: Tensor) -> Tensor:
    """E[(w̄ · x̄)²] for every row w̄ of `augmented` (..., d + 1), x̄ = [x, 1] of moment M."""
    moment = second_moment.to(augmented.device, torch.float64)
    return torch.einsum("...i,ij,...j->...", augmented, moment, augmented).clamp_min(0.0)


def qk_channel_scores(
    qkv_weight: Tensor, qkv_bias: Tensor | None, moment: Tensor, heads: int, head_dim: int
) -> Tensor:
    """Σ_h (E[q_{h,c}²] E[k_{h,c}²])^½ per query/key channel c (head_dim,), fp64; `moment`:
    E[x̄ x̄ᵀ] of qkv's input."""
    q = channel_energy(_heads(qkv_weight, qkv_bias, 0, heads, head_dim), moment)
    k = channel_energy(_heads(qkv_weight, qkv_bias, 1, heads, head_dim), moment)
    return (q * k).sqrt().sum(dim=0)


def v_channel_scores(proj_weight: Tensor, out_moment: Tensor, heads: int, head_dim: int) -> Tensor:
    """(Σ_h Var[o_{h,c}] ‖W_proj[:, (h, c)]‖²)^½ per value channel c (head_dim,), fp64;
    `out_moment`: E[ō ōᵀ] of proj's input (the attention output), ō = [o, 1]."""
    moment = out_moment.double().to(proj_weight.device)
    mean = moment[-1, :-1]
    variance = (moment.diagonal()[:-1] - mean.square()).clamp_min(0.0)
    column = proj_weight.double().square().sum(dim=0)
    return (variance * column).reshape(heads, head_dim).sum(dim=0).sqrt()


def _key_map(
    qkv_weight: Tensor,
    qkv_bias: Tensor | None,
    moment: Tensor,
    kept: Tensor,
    heads: int,
    head_dim: int,
) -> Tensor:
    """The least-squares map from the kept keys of every head to the teacher's
    head-averaged keys (what token merging compares): (head_dim, H · qk_kept).

    Per head, k_h ≈ k_h[kept] G_h with G_h = S[kept, kept]⁻¹ S[kept, :], S = E[k_h k_hᵀ] on
    the calibration data; at full width G_h = I and the map is exact."""
    keys = _heads(qkv_weight, qkv_bias, 1, heads, head_dim)  # (H, dh, d + 1)
    m = moment.to(keys.device, torch.float64)
    second = keys @ m @ keys.transpose(1, 2)  # (H, dh, dh)
    sub = second[:, kept][:, :, kept]
    ridge = 1e-10 * sub.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)
    sub = sub + ridge[:, None, None] * torch.eye(len(kept), dtype=sub.dtype, device=sub.device)
    fit = torch.linalg.solve(sub, second[:, kept])  # (H, r, dh)
    return fit.reshape(heads * len(kept), head_dim).T / heads


def prune_channels(
    qkv_weight: Tensor,
    qkv_bias: Tensor | None,
    proj_weight: Tensor,
    proj_bias: Tensor | None,
    qkv_moment: Tensor,
    out_moment: Tensor,
    heads: int,
    head_dim: int,
    qk_keep: int,
    v_keep: int,
    *,
    key_map: bool = False,
) -> PrunedChannels:
    """Keep `qk_keep` query/key and `v_keep` value channels in every head of a timm
    Attention (qkv laid out as (q heads, k heads, v heads)); see the module docstring.

    `qkv_moment` and `out_moment` are E[x̄ x̄ᵀ] of qkv's and proj's inputs
    (`CalibrationStats.augmented_covariance` of "blocks.{i}.attn.qkv" / ".attn.proj").
    `key_map` also fits the map token merging reads the teacher's keys back with."""
    inner = heads * head_dim
    if qkv_weight.shape[0] != 3 * inner or proj_weight.shape[1] != inner:
        raise ValueError(
            "`qkv_weight.shape[0] == 3 * heads * head_dim` and `proj_weight.shape[1] == "
            f"heads * head_dim` must hold, but got {tuple(qkv_weight.shape)=}, "
            f"{tuple(proj_weight.shape)=}, {heads=}, {head_dim=}."
        )
    dim = qkv_weight.shape[1]
    if qkv_moment.shape != (dim + 1, dim + 1) or out_moment.shape != (inner + 1, inner + 1):
        raise ValueError(
            f"`qkv_moment` must be ({dim + 1}, {dim + 1}) and `out_moment` "
            f"({inner + 1}, {inner + 1}), but got {tuple(qkv_moment.shape)} and "
            f"{tuple(out_moment.shape)}."
        )
    qk = top_indices(qk_channel_scores(qkv_weight, qkv_bias, qkv_moment, heads, head_dim), qk_keep)
    v = top_indices(v_channel_scores(proj_weight, out_moment, heads, head_dim), v_keep)
    offsets = torch.arange(heads, device=qk.device)[:, None] * head_dim

    def rows(kept: Tensor, part: int) -> Tensor:
        return (offsets + kept.to(offsets.device)[None, :]).reshape(-1) + part * inner

    q_rows, k_rows, v_rows = rows(qk, 0), rows(qk, 1), rows(v, 2)
    v_columns = v_rows - 2 * inner
    removed = torch.ones(inner, dtype=torch.bool, device=proj_weight.device)
    removed[v_columns] = False
    p = proj_weight.double()
    out_bias = p.new_zeros(p.shape[0]) if proj_bias is None else proj_bias.double()
    if qkv_bias is not None:
        out_bias = out_bias + p[:, v_columns] @ qkv_bias.double()[v_rows]
    mean = out_moment.double().to(p.device)[-1, :-1]
    out_bias = out_bias + p[:, removed] @ mean[removed]
    dtype = proj_weight.dtype
    return PrunedChannels(
        qkv_weight[q_rows].clone(),
        None if qkv_bias is None else qkv_bias[q_rows].clone(),
        qkv_weight[k_rows].clone(),
        None if qkv_bias is None else qkv_bias[k_rows].clone(),
        qkv_weight[v_rows].clone(),
        proj_weight[:, v_columns].clone(),
        out_bias.to(dtype),
        _key_map(qkv_weight, qkv_bias, qkv_moment, qk, heads, head_dim).to(dtype)
        if key_map
        else None,
        qk,
        v,
    )
