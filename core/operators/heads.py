"""Head-level factorization of attention (COMCAT, made exact): per head, rank-r_qk query-key
and rank-r_vo value-output products instead of the four matrices."""

from __future__ import annotations

from typing import Any

from torch import nn
from vitrank.core.attention import HeadFactorizedAttention
from vitrank.core.structure import BlockShape

from ._base import AttentionCore, BuildContext, Linear, Operator, TermContext


def head_rank_step(head_dim: int, granularity: int) -> int:
    """Per-head ranks step by `granularity`, but small heads still get a few choices."""
    return max(1, min(granularity, head_dim // 4))


class HeadsOp(Operator):
    """Every head's W_qᵀW_k at rank `qk_rank` and W_vᵀW_oᵀ at rank `vo_rank` (all heads alike)."""

    name, part, family = "heads", "attn", "heads"
    knobs = ("qk_rank", "vo_rank")
    needs_factors = True

    def limits(self, shape: BlockShape) -> dict[str, tuple[int, int]]:
        return {"qk_rank": (1, shape.head_dim), "vo_rank": (1, shape.head_dim)}

    def unsupported(self, shape: BlockShape) -> str | None:
        if shape.qk_norm:
            return (
                "head-level factorization needs plain q·k logits, but this block normalizes q "
                "and k (qk_norm=True); use attention op 'lowrank' or 'prune'."
            )
        return None

    def grids(self, shape: BlockShape, granularity: int) -> dict[str, tuple[int, ...]] | None:
        if shape.qk_norm:
            return None
        step = head_rank_step(shape.head_dim, granularity)
        per_head = tuple(range(step, shape.head_dim, step))
        return {"qk_rank": per_head, "vo_rank": per_head} if per_head else None

    def linears(self, shape: BlockShape, spec: Any, merges: bool = False) -> list[Linear]:
        d, h = shape.dim, shape.num_heads
        # x̄ = [x, 1] makes q' and k' affine (exact biases; none without a qkv bias, where
        # the bias rows are zero); the value bias folds into the output bias because
        # attention rows sum to one. In a block that merges tokens, key_map reads the
        # teacher's keys back from k' for the matching.
        key_map = [Linear("key_map", h * spec.qk_rank, shape.head_dim, False)] if merges else []
        return [
            Linear("q", d, h * spec.qk_rank, shape.qkv_bias),
            Linear("k", d, h * spec.qk_rank, shape.qkv_bias),
            *key_map,
            Linear("v", d, h * spec.vo_rank, False),
            Linear("out", h * spec.vo_rank, d, True),
        ]

    def core(self, shape: BlockShape, spec: Any) -> AttentionCore:
        return AttentionCore(shape.num_heads, spec.qk_rank, spec.vo_rank)

    def latency_specs(self, grids: dict[str, tuple[int, ...]], sample: Any) -> list[Any]:
        # Both products at one rank: the attention kernel is timed at a single width.
        ranks = sample(tuple(sorted(set(grids["qk_rank"]) | set(grids["vo_rank"]))))
        return [self.spec(qk_rank=r, vo_rank=r) for r in ranks]

    def proxy_terms(self, spec: Any) -> tuple[tuple[str, int], ...]:
        return (("qk", spec.qk_rank), ("vo", spec.vo_rank))

    def proxy_tables(self, ctx: TermContext) -> dict[str, list[float] | str]:
        vo = ctx.factors.fractions(ctx.key("attn", "vo"), False)
        if ctx.index in ctx.factors.qk_norm_blocks:
            return {"qk": "head-level factorization is off (qk_norm).", "vo": vo}
        return {"qk": ctx.factors.fractions(ctx.key("attn", "qk"), False), "vo": vo}

    def reference_specs(self, ctx: TermContext, reference: float) -> list[tuple[str, Any]]:
        assert ctx.shape is not None
        if ctx.shape.qk_norm:  # not offered in this block (`unsupported`): nothing to weigh
            return []
        full = ctx.shape.head_dim  # the other product at full rank: only one term discards

        def rank(layer: str) -> int:
            return max(1, round(reference * ctx.factors.max_rank(ctx.key("attn", layer))))

        out = [("vo", self.spec(qk_rank=full, vo_rank=rank("vo")))]
        if ctx.index not in ctx.factors.qk_norm_blocks:
            out.append(("qk", self.spec(qk_rank=rank("qk"), vo_rank=full)))
        return out

    def replaced(self, teacher_part: Any, spec: Any) -> list[nn.Module]:
        return [teacher_part.qkv, teacher_part.proj]

    def build(self, ctx: BuildContext, teacher: Any, copied: Any, spec: Any) -> nn.Module:
        drops = (teacher.attn_drop.p, teacher.proj_drop.p)
        kw: dict[str, Any] = {
            "dtype": teacher.qkv.weight.dtype,
            "device": teacher.qkv.weight.device,
        }
        qk_bias = teacher.qkv.bias is not None
        if ctx.structure_only:
            dim = teacher.qkv.in_features
            module = HeadFactorizedAttention.empty(
                dim, teacher.num_heads, spec.qk_rank, spec.vo_rank, teacher.scale,
                head_dim=teacher.head_dim if ctx.merges else None, qk_bias=qk_bias, **kw,
            )  # fmt: skip
            module.attn_drop, module.proj_drop.p = drops
            return module
        assert ctx.factors is not None
        P, Q = ctx.factors.qk(ctx.index, spec.qk_rank)
        G = ctx.factors.key_maps(ctx.index, spec.qk_rank) if ctx.merges else None
        V, out_factor, out_bias = ctx.factors.vo(ctx.index, spec.vo_rank)
        return HeadFactorizedAttention.from_factors(
            P.to(**kw),
            Q.to(**kw),
            None if G is None else G.to(**kw),
            V.to(**kw),
            out_factor.to(**kw),
            None if out_bias is None else out_bias.to(**kw),
            teacher.scale,
            *drops,
            qk_bias=qk_bias,
        )

    def describe(self, spec: Any, shape: BlockShape) -> str:
        return f"heads qk {spec.qk_rank}, vo {spec.vo_rank}"
