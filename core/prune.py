"""Structured pruning of MLP hidden units and attention heads, as pure functions.

Unit j of an MLP scores E|h_j| · ‖W_fc2[:, j]‖ (how much it moves fc2's output on
calibration data, CAIT-style activation-aware importance); a head scores
E|o_h| · ‖W_proj[:, head h]‖ the same way on the attention output. The top ``keep`` are
kept in their original order and the rest removed, so the result is genuinely smaller
Linears. The removed units' mean contribution W[:, pruned] · E[h_pruned] is added to the
following layer's bias: on average the output does not move, and among all constant
corrections this one minimises the mean squared output error.

A layer without a bias gets no compensation: adding a bias would add parameters that the
cost model of a pruned layer does not count.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class PrunedMlp(NamedTuple):
    fc1_weight: Tensor  # (keep, d)
    fc1_bias: Tensor | None  # (keep,)
    fc2_weight: Tensor  # (d_out, keep)
    fc2_bias: Tensor | None  # (d_out,), compensated
    kept: Tensor  # indices of the kept hidden units, ascending


class PrunedHeads(NamedTuple):
    qkv_weight: Tensor  # (3 · keep · head_dim, d), timm's (q heads, k heads, v heads) layout
    qkv_bias: Tensor | None
    proj_weight: Tensor  # (d, keep · head_dim)
    proj_bias: Tensor | None  # compensated
    kept: Tensor  # indices of the kept heads, ascending


def top_indices(scores: Tensor, keep: int) -> Tensor:
    """Indices of the ``keep`` highest scores, ascending; ties go to the earlier index."""
    if not 1 <= keep <= scores.numel():
        raise ValueError(f"`1 <= keep <= {scores.numel()}` must hold, but got {keep=}.")
    order = torch.argsort(scores, descending=True, stable=True)
    return order[:keep].sort().values


def mlp_unit_scores(fc2_weight: Tensor, hidden_abs_mean: Tensor) -> Tensor:
    """E|h_j| · ‖W_fc2[:, j]‖ per hidden unit j, fp64."""
    _check_len("hidden_abs_mean", hidden_abs_mean, fc2_weight.shape[1])
    # statistics read back from a cache live on the CPU: they follow the weights
    return hidden_abs_mean.to(fc2_weight.device).double() * fc2_weight.double().norm(dim=0)


def head_scores(
    proj_weight: Tensor, head_abs_mean: Tensor, num_heads: int, head_dim: int
) -> Tensor:
    """E|o_h| · ‖W_proj[:, columns of head h]‖ per head h, fp64."""
    _check_len("head_abs_mean", head_abs_mean, num_heads)
    _check_len("proj_weight columns", proj_weight[0], num_heads * head_dim)
    norms = proj_weight.double().reshape(-1, num_heads, head_dim).square().sum(dim=(0, 2)).sqrt()
    return head_abs_mean.to(proj_weight.device).double() * norms


def removed_fractions(scores: Tensor) -> list[float]:
    """f[k] = share of the squared importance removed when the top k units are kept.

    Squared, so that like a low-rank error it is a share of output energy."""
    mass = scores.double().square().sort(descending=True).values
    kept = torch.cat([mass.new_zeros(1), mass.cumsum(0)])
    total = float(kept[-1])
    if total <= 0:
        return [0.0] * len(kept)
    return (1.0 - kept / total).clamp_min(0.0).tolist()


def prune_mlp(
    fc1_weight: Tensor,
    fc1_bias: Tensor | None,
    fc2_weight: Tensor,
    fc2_bias: Tensor | None,
    hidden_abs_mean: Tensor,
    hidden_mean: Tensor | None,
    keep: int,
) -> PrunedMlp:
    """Keep the ``keep`` most important hidden units of fc1 → act → fc2.

    ``hidden_abs_mean`` and ``hidden_mean`` are E|h| and E[h] of fc2's input on
    calibration data (``CalibrationStats.hidden_abs_mean[i]`` and
    ``.mean("blocks.{i}.mlp.fc2")``); ``hidden_mean`` None removes without compensation.
    Only valid when nothing mixes hidden units between fc1 and fc2 (an element-wise
    activation, no norm layer in between).
    """
    hidden = fc1_weight.shape[0]
    _check_len("fc2_weight columns", fc2_weight[0], hidden)
    kept = top_indices(mlp_unit_scores(fc2_weight, hidden_abs_mean), keep)
    new_fc2_bias = _compensated_bias(fc2_weight, fc2_bias, hidden_mean, kept)
    return PrunedMlp(
        fc1_weight[kept].clone(),
        None if fc1_bias is None else fc1_bias[kept].clone(),
        fc2_weight[:, kept].clone(),
        new_fc2_bias,
        kept,
    )


def prune_heads(
    qkv_weight: Tensor,
    qkv_bias: Tensor | None,
    proj_weight: Tensor,
    proj_bias: Tensor | None,
    head_abs_mean: Tensor,
    head_mean_out: Tensor | None,
    num_heads: int,
    head_dim: int,
    keep: int,
) -> PrunedHeads:
    """Keep the ``keep`` most important heads of a timm Attention's qkv and proj.

    ``head_abs_mean`` (H,) is E|o_h| and ``head_mean_out`` (H · head_dim,) is E[o], the
    mean of proj's input (``CalibrationStats.head_abs_mean[i]`` and
    ``.mean("blocks.{i}.attn.proj")``); ``head_mean_out`` None removes without
    compensation. The softmax scale must stay the original head_dim^-1/2 (unchanged,
    since head_dim is unchanged).
    """
    inner = num_heads * head_dim
    _check_len("qkv_weight rows", qkv_weight[:, 0], 3 * inner)
    kept = top_indices(head_scores(proj_weight, head_abs_mean, num_heads, head_dim), keep)
    # Channel indices of the kept heads inside one of q, k, v (or proj's input).
    channels = (kept[:, None] * head_dim + torch.arange(head_dim, device=kept.device)).reshape(-1)
    rows = torch.cat([channels + part * inner for part in range(3)])
    return PrunedHeads(
        qkv_weight[rows].clone(),
        None if qkv_bias is None else qkv_bias[rows].clone(),
        proj_weight[:, channels].clone(),
        _compensated_bias(proj_weight, proj_bias, head_mean_out, channels),
        kept,
    )


def _compensated_bias(
    weight: Tensor, bias: Tensor | None, input_mean: Tensor | None, kept: Tensor
) -> Tensor | None:
    """bias + W[:, removed] · E[x_removed], in fp64, back in the bias's dtype."""
    if bias is None:
        return None
    if input_mean is None:
        return bias.clone()
    _check_len("input mean", input_mean, weight.shape[1])
    removed = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    removed[kept] = False
    shift = weight.double()[:, removed] @ input_mean.double().to(weight.device)[removed]
    return (bias.double() + shift).to(bias.dtype)


def _check_len(name: str, tensor: Tensor, expected: int) -> None:
    if tensor.numel() != expected:
        raise ValueError(f"`len({name}) == {expected}` must hold, but got {tensor.numel()}.")
