"""Structured pruning: whole attention heads or MLP hidden units removed, scored on
calibration activations, with the pruned units' mean contribution folded into the bias."""

from __future__ import annotations

from typing import Any

from torch import nn
from vitrank.core.attention import DenseAttention
from vitrank.core.lowrank import empty_linear, linear_from
from vitrank.core.structure import BlockShape

from ._base import NEEDS_STATS, AttentionCore, BuildContext, Linear, Operator, TermContext


class PruneHeadsOp(Operator):
    """Keep the `heads_kept` heads that matter most; the rest go."""

    name, part, family = "prune", "attn", "prune"
    knobs = ("heads_kept",)

    def limits(self, shape: BlockShape) -> dict[str, tuple[int, int]]:
        return {"heads_kept": (1, shape.num_heads)}

    def grids(self, shape: BlockShape, granularity: int) -> dict[str, tuple[int, ...]] | None:
        return {"heads_kept": tuple(range(1, shape.num_heads))} if shape.num_heads > 1 else None

    def linears(self, shape: BlockShape, spec: Any, merges: bool = False) -> list[Linear]:
        d, kept = shape.dim, spec.heads_kept * shape.head_dim
        # Pruned heads' mean output is folded into proj's bias when it has one (none added).
        return [
            Linear("qkv", d, 3 * kept, shape.qkv_bias),
            Linear("proj", kept, d, shape.proj_bias),
        ]

    def core(self, shape: BlockShape, spec: Any) -> AttentionCore:
        return AttentionCore(spec.heads_kept, shape.head_dim, shape.head_dim)

    def proxy_terms(self, spec: Any) -> tuple[tuple[str, int], ...]:
        return (("heads", spec.heads_kept),)

    def proxy_tables(self, ctx: TermContext) -> dict[str, list[float] | str]:
        if ctx.block is None or ctx.shape is None or ctx.stats is None:
            return {"heads": NEEDS_STATS}
        from vitrank.core.prune import head_scores, removed_fractions

        scores = head_scores(
            ctx.block.attn.proj.weight, ctx.stats.head_abs_mean[ctx.index],
            ctx.shape.num_heads, ctx.shape.head_dim,
        )  # fmt: skip
        return {"heads": removed_fractions(scores)}

    def reference_specs(self, ctx: TermContext, reference: float) -> list[tuple[str, Any]]:
        assert ctx.shape is not None
        heads = ctx.shape.num_heads
        if ctx.stats is None or heads == 1:
            return []
        return [("heads", self.spec(heads_kept=_kept(reference, heads)))]

    def replaced(self, teacher_part: Any, spec: Any) -> list[nn.Module]:
        return [teacher_part.qkv, teacher_part.proj]

    def build(self, ctx: BuildContext, teacher: Any, copied: Any, spec: Any) -> nn.Module:
        drops = (teacher.attn_drop.p, teacher.proj_drop.p)
        kept, dh = spec.heads_kept, teacher.head_dim
        # The kept heads keep the teacher's scale and qk-norms.
        if ctx.structure_only:
            kw: dict[str, Any] = {
                "dtype": teacher.qkv.weight.dtype,
                "device": teacher.qkv.weight.device,
            }
            dim = teacher.qkv.in_features
            qkv = empty_linear(dim, 3 * kept * dh, teacher.qkv.bias is not None, **kw)
            proj = empty_linear(kept * dh, dim, teacher.proj.bias is not None, **kw)
            return DenseAttention(
                qkv, proj, kept, dh, teacher.scale, copied.q_norm, copied.k_norm, *drops
            )
        from vitrank.core.prune import prune_heads

        stats = ctx.require_stats()
        pruned = prune_heads(
            teacher.qkv.weight,
            teacher.qkv.bias,
            teacher.proj.weight,
            teacher.proj.bias,
            stats.head_abs_mean[ctx.index],
            stats.mean(f"blocks.{ctx.index}.attn.proj"),
            teacher.num_heads,
            dh,
            kept,
        )
        return DenseAttention.from_weights(
            pruned.qkv_weight,
            pruned.qkv_bias,
            pruned.proj_weight,
            pruned.proj_bias,
            kept, dh, teacher.scale, copied.q_norm, copied.k_norm, *drops,
        )  # fmt: skip

    def describe(self, spec: Any, shape: BlockShape) -> str:
        return f"prune {spec.heads_kept}/{shape.num_heads} heads"

    def keep_ratio(self, spec: Any, shape: BlockShape) -> float:
        return spec.heads_kept / shape.num_heads


class PruneMlpOp(Operator):
    """Keep the `hidden_kept` hidden units with the largest E|h_j|·‖W_fc2[:, j]‖."""

    name, part, family = "prune", "mlp", "prune"
    knobs = ("hidden_kept",)

    def limits(self, shape: BlockShape) -> dict[str, tuple[int, int]]:
        return {"hidden_kept": (1, shape.mlp_hidden)}

    def grids(self, shape: BlockShape, granularity: int) -> dict[str, tuple[int, ...]] | None:
        kept = tuple(range(granularity, shape.mlp_hidden, granularity))
        return {"hidden_kept": kept} if kept else None

    def linears(self, shape: BlockShape, spec: Any, merges: bool = False) -> list[Linear]:
        d, kept = shape.dim, spec.hidden_kept
        # Pruned units' mean contribution is folded into fc2's bias when it has one.
        return [Linear("fc1", d, kept, shape.fc1_bias), Linear("fc2", kept, d, shape.fc2_bias)]

    def activation_width(self, shape: BlockShape, spec: Any) -> int:
        return int(spec.hidden_kept)

    def proxy_terms(self, spec: Any) -> tuple[tuple[str, int], ...]:
        return (("hidden", spec.hidden_kept),)

    def proxy_tables(self, ctx: TermContext) -> dict[str, list[float] | str]:
        if ctx.block is None or ctx.stats is None:
            return {"hidden": NEEDS_STATS}
        from vitrank.core.prune import mlp_unit_scores, removed_fractions

        scores = mlp_unit_scores(ctx.block.mlp.fc2.weight, ctx.stats.hidden_abs_mean[ctx.index])
        return {"hidden": removed_fractions(scores)}

    def reference_specs(self, ctx: TermContext, reference: float) -> list[tuple[str, Any]]:
        assert ctx.shape is not None
        if ctx.stats is None:
            return []
        return [("hidden", self.spec(hidden_kept=_kept(reference, ctx.shape.mlp_hidden)))]

    def replaced(self, teacher_part: Any, spec: Any) -> list[nn.Module]:
        return [teacher_part.fc1, teacher_part.fc2]

    def build(self, ctx: BuildContext, teacher: Any, copied: Any, spec: Any) -> nn.Module:
        fc1, fc2, kept = teacher.fc1, teacher.fc2, spec.hidden_kept
        if ctx.structure_only:
            kw: dict[str, Any] = {"dtype": fc1.weight.dtype, "device": fc1.weight.device}
            copied.fc1 = empty_linear(fc1.in_features, kept, fc1.bias is not None, **kw)
            copied.fc2 = empty_linear(kept, fc2.out_features, fc2.bias is not None, **kw)
            return copied
        from vitrank.core.prune import prune_mlp

        stats = ctx.require_stats()
        pruned = prune_mlp(
            fc1.weight,
            fc1.bias,
            fc2.weight,
            fc2.bias,
            stats.hidden_abs_mean[ctx.index],
            stats.mean(f"blocks.{ctx.index}.mlp.fc2"),
            kept,
        )
        copied.fc1 = linear_from(pruned.fc1_weight, pruned.fc1_bias)
        copied.fc2 = linear_from(pruned.fc2_weight, pruned.fc2_bias)
        return copied

    def describe(self, spec: Any, shape: BlockShape) -> str:
        return f"prune {spec.hidden_kept}/{shape.mlp_hidden} units"

    def keep_ratio(self, spec: Any, shape: BlockShape) -> float:
        return spec.hidden_kept / shape.mlp_hidden


def _kept(reference: float, units: int) -> int:
    """Units kept at the reference level: at least one, at least one removed."""
    return min(units - 1, max(1, round(reference * units)))
