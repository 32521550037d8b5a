"""Head-level factorization of attention (COMCAT, made exact): per head, rank-r_qk query-key
and rank-r_vo value-output products instead of the four matrices."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn
from vitrank.core.attention import HeadFactorizedAttention
from vitrank.core.structure import BlockShape

from ._base import AttentionCore, BuildContext, Linear, Operator, TermContext


def head_rank_step(head_dim: int, granularity: int) -> int:
    """Per-head ranks step by `granularity`, but small heads still get a few choices."""
    return max(1, min(granularity, head_dim // 4))


class HeadWidthsOp(Operator):
    """An attention operator that runs the per-head kernel (`HeadFactorizedAttention`) with
    query/key width `qk_knob` and value width `v_knob` in every head: its limits, grids,
    exact cost, latency kernels and skeleton. Needs plain q·k logits (no qk_norm)."""

    qk_knob: ClassVar[str]
    v_knob: ClassVar[str]

    def widths(self, spec: Any) -> tuple[int, int]:
        return spec.knob(self.qk_knob), spec.knob(self.v_knob)

    def limits(self, shape: BlockShape) -> dict[str, tuple[int, int]]:
        return {self.qk_knob: (1, shape.head_dim), self.v_knob: (1, shape.head_dim)}

    def grids(self, shape: BlockShape, granularity: int) -> dict[str, tuple[int, ...]] | None:
        if shape.qk_norm:
            return None
        step = head_rank_step(shape.head_dim, granularity)
        per_head = tuple(range(step, shape.head_dim, step))
        return {self.qk_knob: per_head, self.v_knob: per_head} if per_head else None

    def linears(self, shape: BlockShape, spec: Any, merges: bool = False) -> list[Linear]:
        d, h = shape.dim, shape.num_heads
        qk, v = self.widths(spec)
        # q' and k' are affine (biases only with a qkv bias); the value bias folds into the
        # output bias because attention rows sum to one. In a block that merges tokens,
        # key_map reads the teacher's keys back from k' for the matching.
        key_map = [Linear("key_map", h * qk, shape.head_dim, False)] if merges else []
        return [
            Linear("q", d, h * qk, shape.qkv_bias),
            Linear("k", d, h * qk, shape.qkv_bias),
            *key_map,
            Linear("v", d, h * v, False),
            Linear("out", h * v, d, True),
        ]

    def core(self, shape: BlockShape, spec: Any) -> AttentionCore:
        return AttentionCore(shape.num_heads, *self.widths(spec))

    def latency_specs(self, grids: dict[str, tuple[int, ...]], sample: Any) -> list[Any]:
        # Both widths alike: the attention kernel is timed at a single width.
        widths = sample(tuple(sorted(set(grids[self.qk_knob]) | set(grids[self.v_knob]))))
        return [self.spec(**{self.qk_knob: w, self.v_knob: w}) for w in widths]

    def replaced(self, teacher_part: Any, spec: Any) -> list[nn.Module]:
        return [teacher_part.qkv, teacher_part.proj]

    def skeleton(self, ctx: BuildContext, teacher: Any, spec: Any) -> nn.Module:
        """The built module's shapes, uninitialised (a saved state fills it)."""
        module = HeadFactorizedAttention.empty(
            teacher.qkv.in_features, teacher.num_heads, *self.widths(spec), teacher.scale,
            head_dim=teacher.head_dim if ctx.merges else None,
            qk_bias=teacher.qkv.bias is not None,
            dtype=teacher.qkv.weight.dtype, device=teacher.qkv.weight.device,
        )  # fmt: skip
        module.attn_drop, module.proj_drop.p = teacher.attn_drop.p, teacher.proj_drop.p
        return module


class HeadsOp(HeadWidthsOp):
    """Every head's W_qᵀW_k at rank `qk_rank` and W_vᵀW_oᵀ at rank `vo_rank` (all heads alike)."""

    name, part, family = "heads", "attn", "heads"
    knobs = ("qk_rank", "vo_rank")
    qk_knob, v_knob = knobs
    needs_factors = True

    def unsupported(self, shape: BlockShape) -> str | None:
        if shape.qk_norm:
            return (
                "head-level factorization needs plain q·k logits, but this block normalizes q "
                "and k (qk_norm=True); use attention op 'lowrank' or 'prune'."
            )
        return None

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

    def build(self, ctx: BuildContext, teacher: Any, copied: Any, spec: Any) -> nn.Module:
        if ctx.structure_only:
            return self.skeleton(ctx, teacher, spec)
        drops = (teacher.attn_drop.p, teacher.proj_drop.p)
        kw: dict[str, Any] = {
            "dtype": teacher.qkv.weight.dtype,
            "device": teacher.qkv.weight.device,
        }
        qk_bias = teacher.qkv.bias is not None
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
