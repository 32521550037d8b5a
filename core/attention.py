"""Attention modules for compressed blocks: dense, matrix-level low rank, head-level (COMCAT).

All three share one forward signature, ``forward(x, log_size=None) -> (output, keys)``:
``log_size`` (B, N) is ToMe's proportional attention (log of each token's size added to
the logits of the keys), and ``keys`` (B, N, e) are the keys averaged over heads, the
similarity metric that token merging uses. With no ``log_size`` the fused
``scaled_dot_product_attention`` path is the same as timm's.

Adapted in spirit from ToMe's patched timm Attention (facebookresearch/ToMe,
``tome/patch/timm.py``): ours passes the size bias as SDPA's additive mask instead of
running explicit attention, and returns the keys alongside the output.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from vitrank.core.lowrank import empty_linear, linear_from


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    log_size: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """softmax(q kᵀ·scale + log_size) v for q, k (B, H, N, e) and v (B, H, N, ev).

    ``log_size`` (B, N) is added to every query's logits for each key (proportional
    attention); the value width ``ev`` may differ from the query-key width ``e``.
    """
    mask = None
    if log_size is not None:
        mask = log_size[:, None, None, :].to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


class _QkvAttention(nn.Module):
    """Multi-head attention with a fused qkv map and an output map, as timm's Attention.

    ``qkv`` and ``proj`` are any modules with Linear semantics (an ``nn.Linear`` or a
    low-rank pair), so the dense, head-pruned and low-rank variants share this forward.
    """

    def __init__(
        self,
        qkv: nn.Module,
        proj: nn.Module,
        num_heads: int,
        head_dim: int,
        scale: float,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.attn_drop = attn_drop
        self.qkv = qkv
        self.q_norm = q_norm if q_norm is not None else nn.Identity()
        self.k_norm = k_norm if k_norm is not None else nn.Identity()
        self.proj = proj
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, log_size: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout_p = self.attn_drop if self.training else 0.0
        out = attend(q, k, v, self.scale, log_size, dropout_p)
        out = out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(out)), k.mean(1)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, scale={self.scale:.4g}"


class DenseAttention(_QkvAttention):
    """timm's Attention with the shared forward signature; also hosts head-pruned weights."""

    @classmethod
    def from_timm(cls, attn: Any) -> DenseAttention:
        """Wrap a timm ``Attention``'s own modules (no copy: callers pass a copied model)."""
        return cls(
            attn.qkv,
            attn.proj,
            attn.num_heads,
            attn.head_dim,
            attn.scale,
            attn.q_norm,
            attn.k_norm,
            attn.attn_drop.p,
            attn.proj_drop.p,
        )

    @classmethod
    def from_weights(
        cls,
        qkv_weight: Tensor,
        qkv_bias: Tensor | None,
        proj_weight: Tensor,
        proj_bias: Tensor | None,
        num_heads: int,
        head_dim: int,
        scale: float,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> DenseAttention:
        """Attention from raw weights, e.g. with fewer heads after head pruning.

        ``qkv_weight`` is (3·H·head_dim × d) laid out as timm's (q heads, k heads, v heads);
        ``scale`` is passed explicitly so that pruning keeps the original softmax scale.
        """
        inner = num_heads * head_dim
        if qkv_weight.shape[0] != 3 * inner or proj_weight.shape[1] != inner:
            raise ValueError(
                "`qkv_weight.shape[0] == 3 * num_heads * head_dim` and "
                "`proj_weight.shape[1] == num_heads * head_dim` must hold"
                f", but got {tuple(qkv_weight.shape)=}, {tuple(proj_weight.shape)=}, "
                f"{num_heads=}, {head_dim=}."
            )
        return cls(
            linear_from(qkv_weight, qkv_bias),
            linear_from(proj_weight, proj_bias),
            num_heads,
            head_dim,
            scale,
            q_norm,
            k_norm,
            attn_drop,
            proj_drop,
        )


class LowRankAttention(_QkvAttention):
    """Matrix-level factorization: qkv and proj each a low-rank pair (or kept dense).

    ``qkv`` and ``proj`` are ``LowRankLinear`` (or ``nn.Linear`` where a layer keeps full
    rank); heads, scale and qk-norms are the teacher's.
    """


# A q/k bias this small next to its weights is the rounding left by factorizing a
# teacher without qkv bias (whose factors' bias rows are zero), not a trained bias.
_NEGLIGIBLE_BIAS = 1e-5


def _upgrade_saved_heads_state(
    module: nn.Module,
    state_dict: dict[str, Tensor],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load states saved before q/k lost their zero biases and before ``key_map`` existed.

    A saved q/k bias where the module has none is dropped when negligible (the rounding
    of a zero bias row) and refused otherwise. A missing ``key_map`` gets the map those
    models merged with, the head average of the factorized keys (padded with zeros to
    head_dim, which leaves cosines unchanged), so they load and run as they were saved.
    """
    assert isinstance(module, HeadFactorizedAttention)
    for name in ("q", "k"):
        layer, key = getattr(module, name), f"{prefix}{name}.bias"
        if layer.bias is not None or key not in state_dict:
            continue
        bias, weight = state_dict[key], state_dict.get(f"{prefix}{name}.weight")
        largest = float(weight.abs().max()) if weight is not None and weight.numel() else 0.0
        if float(bias.abs().max()) <= _NEGLIGIBLE_BIAS * largest:
            del state_dict[key]
        else:
            error_msgs.append(
                f"{key}: this `heads` attention has no q/k bias (its teacher's qkv has none), "
                f"but the saved state holds a non-zero one (max |b| = {float(bias.abs().max()):.3g}"
                f", max |W| = {largest:.3g}); it cannot be dropped without changing the model."
            )
    key = f"{prefix}key_map.weight"
    if module.key_map is not None and key not in state_dict and f"{prefix}k.weight" in state_dict:
        weight = module.key_map.weight
        rank, heads = module.qk_rank, module.num_heads
        legacy = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
        columns = torch.arange(heads * rank, device=weight.device)
        legacy[columns % rank, columns] = 1.0 / heads
        state_dict[key] = legacy
        warnings.warn(
            f"{prefix}key_map: the saved model predates key maps; its token merging keeps "
            "comparing the factorized keys (not the teacher's), as when it was saved.",
            stacklevel=2,
        )


class HeadFactorizedAttention(nn.Module):
    """COMCAT head-level factorization with exact biases.

    Per head h: q'_h = x̄ P_h and k'_h = x̄ Q_h (x̄ = [x, 1], so the last rows are biases;
    ``q``/``k`` have no bias when the teacher's qkv has none, as those rows are zero) of
    width ``qk_rank``; values x V_h of width ``vo_rank``; the output Σ_h A_h x V_h O_h plus
    ``out_bias`` (the proj bias with the value bias folded in, exact because each row of
    A_h sums to one). The softmax scale stays the teacher's head_dim^-1/2.

    The keys returned for token merging are the teacher's, read back from the factorized
    ones: ``key_map`` computes mean_h k'_h G_h (G_h: r × d_h, see
    ``vitrank.core.heads._key_maps``), which equals the teacher's head-averaged keys at full
    rank and their least-squares fit below it. Its weight is fixed (no gradient reaches
    it through the matching), so it does not train.
    """

    def __init__(
        self,
        q: nn.Linear,
        k: nn.Linear,
        v: nn.Linear,
        out: nn.Linear,
        key_map: nn.Linear | None,
        num_heads: int,
        scale: float,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if q.out_features != k.out_features or q.out_features % num_heads:
            raise ValueError(
                "`q.out_features == k.out_features == num_heads * qk_rank` must hold, but got "
                f"{q.out_features=}, {k.out_features=}, {num_heads=}."
            )
        if v.out_features != out.in_features or v.out_features % num_heads:
            raise ValueError(
                "`v.out_features == out.in_features == num_heads * vo_rank` must hold, but got "
                f"{v.out_features=}, {out.in_features=}, {num_heads=}."
            )
        if key_map is not None and key_map.in_features != k.out_features:
            raise ValueError(
                "`key_map.in_features == k.out_features` must hold, but got "
                f"{key_map.in_features=}, {k.out_features=}."
            )
        self.num_heads = num_heads
        self.qk_rank = q.out_features // num_heads
        self.vo_rank = v.out_features // num_heads
        self.scale = scale
        self.attn_drop = attn_drop
        self.q, self.k, self.v, self.out = q, k, v, out
        self.key_map = key_map  # only in blocks that merge tokens
        if key_map is not None:
            key_map.weight.requires_grad_(False)
        self.proj_drop = nn.Dropout(proj_drop)
        self.register_load_state_dict_pre_hook(_upgrade_saved_heads_state)

    @classmethod
    def from_factors(
        cls,
        P: Tensor,
        Q: Tensor,
        G: Tensor | None,
        V: Tensor,
        out_factor: Tensor,
        out_bias: Tensor | None,
        scale: float,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        *,
        qk_bias: bool = True,
    ) -> HeadFactorizedAttention:
        """From ``FactorCache.qk`` (P, Q: (H, d+1, r_qk)), ``.key_maps`` (G: (H, r_qk, d_h))
        and ``.vo`` (V: (H, d, r_vo), out_factor: (H, r_vo, d), out_bias: (d,)) factors.

        ``qk_bias`` False (a teacher without qkv bias, whose P and Q have zero last rows)
        builds q and k without bias. ``out_bias`` None (a teacher with neither value nor
        output bias) gives a zero bias, so the structure never depends on it."""
        heads, rows, qk_rank = P.shape
        dim = rows - 1
        if Q.shape != P.shape or V.shape[:2] != (heads, dim) or out_factor.shape[0] != heads:
            raise ValueError(
                "`P.shape == Q.shape == (H, d+1, r_qk)`, `V.shape == (H, d, r_vo)` and "
                f"`out_factor.shape == (H, r_vo, d)` must hold, but got {tuple(P.shape)=}, "
                f"{tuple(Q.shape)=}, {tuple(V.shape)=}, {tuple(out_factor.shape)=}."
            )
        if G is not None and (G.ndim != 3 or G.shape[:2] != (heads, qk_rank)):
            raise ValueError(
                f"`G.shape == (H, r_qk, d_h) == ({heads}, {qk_rank}, d_h)` must hold, but got "
                f"{tuple(G.shape)=}."
            )
        vo_rank = V.shape[2]
        if out_bias is None:
            out_bias = out_factor.new_zeros(out_factor.shape[2])

        # Head h's columns j become output rows h * rank + j of the Linear.
        def stack(factor: Tensor, rank: int) -> Tensor:
            return factor.transpose(1, 2).reshape(heads * rank, factor.shape[1])

        def bias(factor: Tensor) -> Tensor | None:
            return factor[:, dim].reshape(-1) if qk_bias else None

        # mean_h k'_h G_h: head h's rows of G sit at inputs h * r_qk + j of the map.
        key_map = None if G is None else G.reshape(heads * qk_rank, G.shape[2]).T / heads
        return cls(
            linear_from(stack(P[:, :dim], qk_rank), bias(P)),
            linear_from(stack(Q[:, :dim], qk_rank), bias(Q)),
            linear_from(stack(V, vo_rank), None),
            linear_from(out_factor.reshape(heads * vo_rank, out_factor.shape[2]).T, out_bias),
            None if key_map is None else linear_from(key_map, None),
            heads,
            scale,
            attn_drop,
            proj_drop,
        )

    @classmethod
    def empty(
        cls,
        dim: int,
        num_heads: int,
        qk_rank: int,
        vo_rank: int,
        scale: float,
        *,
        head_dim: int | None = None,
        qk_bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> HeadFactorizedAttention:
        """Right shapes, uninitialised weights: the skeleton that a saved state fills."""
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        return cls(
            empty_linear(dim, num_heads * qk_rank, qk_bias, **kw),
            empty_linear(dim, num_heads * qk_rank, qk_bias, **kw),
            empty_linear(dim, num_heads * vo_rank, False, **kw),
            empty_linear(num_heads * vo_rank, dim, True, **kw),
            None if head_dim is None else empty_linear(num_heads * qk_rank, head_dim, False, **kw),
            num_heads,
            scale,
        )

    def forward(self, x: Tensor, log_size: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, n, _ = x.shape

        def heads(t: Tensor, rank: int) -> Tensor:
            return t.reshape(b, n, self.num_heads, rank).transpose(1, 2)

        keys = self.k(x)
        q = heads(self.q(x), self.qk_rank)
        k = heads(keys, self.qk_rank)
        v = heads(self.v(x), self.vo_rank)
        dropout_p = self.attn_drop if self.training else 0.0
        out = attend(q, k, v, self.scale, log_size, dropout_p)
        out = out.transpose(1, 2).reshape(b, n, self.num_heads * self.vo_rank)
        # What token merging compares: the teacher's keys where the block merges; elsewhere
        # the keys go unused.
        merge_keys = keys if self.key_map is None else self.key_map(keys)
        return self.proj_drop(self.out(out)), merge_keys

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, qk_rank={self.qk_rank}, vo_rank={self.vo_rank}, "
            f"scale={self.scale:.4g}"
        )
