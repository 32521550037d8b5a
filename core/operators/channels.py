"""Head-consistent channel pruning of attention (CDCP-like): the same query/key channels and
the same value channels kept in every head, chosen on calibration statistics
(`vitrank.core.channels`)."""

from __future__ import annotations

from typing import Any

from torch import nn
from vitrank.core.attention import HeadFactorizedAttention
from vitrank.core.lowrank import linear_from
from vitrank.core.structure import BlockShape

from ._base import NEEDS_STATS, BuildContext, TermContext
from .heads import HeadWidthsOp


class ChannelsOp(HeadWidthsOp):
    """Every head keeps `qk_kept` query/key channels and `v_kept` value channels, the same
    ones in every head."""

    name, part, family = "cdcp", "attn", "channels"
    knobs = ("qk_kept", "v_kept")
    qk_knob, v_knob = knobs
    searched_by_default = False  # offered with `--ops ... channels`

    def unsupported(self, shape: BlockShape) -> str | None:
        if shape.qk_norm:
            return (
                "channel pruning of q and k needs plain q·k logits, but this block normalizes "
                "q and k over all their channels (qk_norm=True); use attention op 'prune'."
            )
        return None

    def proxy_terms(self, spec: Any) -> tuple[tuple[str, int], ...]:
        return (("qk_channels", spec.qk_kept), ("v_channels", spec.v_kept))

    def proxy_tables(self, ctx: TermContext) -> dict[str, list[float] | str]:
        if ctx.block is None or ctx.shape is None or ctx.stats is None:
            return {"qk_channels": NEEDS_STATS, "v_channels": NEEDS_STATS}
        from vitrank.core.channels import qk_channel_scores, v_channel_scores
        from vitrank.core.prune import removed_fractions

        attn, shape, i = ctx.block.attn, ctx.shape, ctx.index
        if shape.qk_norm:  # not offered in this block (`unsupported`)
            off = "channel pruning is off (qk_norm)."
            return {"qk_channels": off, "v_channels": off}
        v = v_channel_scores(
            attn.proj.weight, ctx.stats.augmented_covariance(f"blocks.{i}.attn.proj"),
            shape.num_heads, shape.head_dim,
        )  # fmt: skip
        qk = qk_channel_scores(
            attn.qkv.weight, attn.qkv.bias, ctx.stats.augmented_covariance(f"blocks.{i}.attn.qkv"),
            shape.num_heads, shape.head_dim,
        )  # fmt: skip
        return {"qk_channels": removed_fractions(qk), "v_channels": removed_fractions(v)}

    def reference_specs(self, ctx: TermContext, reference: float) -> list[tuple[str, Any]]:
        assert ctx.shape is not None
        if ctx.stats is None or ctx.shape.qk_norm or ctx.shape.head_dim == 1:
            return []
        full = ctx.shape.head_dim  # the other width kept whole: only one term discards
        kept = min(full - 1, max(1, round(reference * full)))
        return [
            ("qk_channels", self.spec(qk_kept=kept, v_kept=full)),
            ("v_channels", self.spec(qk_kept=full, v_kept=kept)),
        ]

    def build(self, ctx: BuildContext, teacher: Any, copied: Any, spec: Any) -> nn.Module:
        if ctx.structure_only:
            return self.skeleton(ctx, teacher, spec)
        from vitrank.core.channels import prune_channels

        stats, i = ctx.require_stats(), ctx.index
        pruned = prune_channels(
            teacher.qkv.weight, teacher.qkv.bias, teacher.proj.weight, teacher.proj.bias,
            stats.augmented_covariance(f"blocks.{i}.attn.qkv"),
            stats.augmented_covariance(f"blocks.{i}.attn.proj"),
            teacher.num_heads, teacher.head_dim, spec.qk_kept, spec.v_kept, key_map=ctx.merges,
        )  # fmt: skip
        key_map = None if pruned.key_map is None else linear_from(pruned.key_map, None)
        return HeadFactorizedAttention(
            linear_from(pruned.q_weight, pruned.q_bias),
            linear_from(pruned.k_weight, pruned.k_bias),
            linear_from(pruned.v_weight, None),
            linear_from(pruned.out_weight, pruned.out_bias),
            key_map,
            teacher.num_heads,
            teacher.scale,
            teacher.attn_drop.p,
            teacher.proj_drop.p,
        )

    def describe(self, spec: Any, shape: BlockShape) -> str:
        return f"channels qk {spec.qk_kept}/{shape.head_dim}, v {spec.v_kept}/{shape.head_dim}"

    def keep_ratio(self, spec: Any, shape: BlockShape) -> float:
        return (2 * spec.qk_kept + 2 * spec.v_kept) / (4 * shape.head_dim)
