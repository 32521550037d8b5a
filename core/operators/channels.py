"""Head-consistent channel pruning of attention (CDCP-like): the same query/key channels and
the same value channels kept in every head, chosen on calibration statistics
(`vitrank.core.channels`)."""

from __future__ import annotations

from typing import Any

from torch import nn
from vitrank.core.attention import HeadFactorizedAttention
from vitrank.core.lowrank import linear_from
from vitrank.core.structure import BlockShape

from ._base import NEEDS_STATS, AttentionCore, BuildContext, Linear, Operator, TermContext
from .heads import head_rank_step


class ChannelsOp(Operator):
    """Every head keeps `qk_kept` query/key channels and `v_kept` value channels, the same
    ones in every head."""

    name, part, family = "cdcp", "attn", "channels"
    knobs = ("qk_kept", "v_kept")
    searched_by_default = False  # offered with `--ops ... channels`

    def limits(self, shape: BlockShape) -> dict[str, tuple[int, int]]:
        return {"qk_kept": (1, shape.head_dim), "v_kept": (1, shape.head_dim)}

    def unsupported(self, shape: BlockShape) -> str | None:
        if shape.qk_norm:
            return (
                "channel pruning of q and k needs plain q·k logits, but this block normalizes "
                "q and k over all their channels (qk_norm=True); use attention op 'prune'."
            )
        return None

    def grids(self, shape: BlockShape, granularity: int) -> dict[str, tuple[int, ...]] | None:
        if shape.qk_norm:
            return None
        step = head_rank_step(shape.head_dim, granularity)
        widths = tuple(range(step, shape.head_dim, step))
        return {"qk_kept": widths, "v_kept": widths} if widths else None

    def linears(self, shape: BlockShape, spec: Any, merges: bool = False) -> list[Linear]:
        d, h = shape.dim, shape.num_heads
        # The value bias and the removed value channels' mean fold into the output bias;
        # in a block that merges tokens, key_map reads the teacher's keys back for matching.
        key_map = [Linear("key_map", h * spec.qk_kept, shape.head_dim, False)] if merges else []
        return [
            Linear("q", d, h * spec.qk_kept, shape.qkv_bias),
            Linear("k", d, h * spec.qk_kept, shape.qkv_bias),
            *key_map,
            Linear("v", d, h * spec.v_kept, False),
            Linear("out", h * spec.v_kept, d, True),
        ]

    def core(self, shape: BlockShape, spec: Any) -> AttentionCore:
        return AttentionCore(shape.num_heads, spec.qk_kept, spec.v_kept)

    def latency_specs(self, grids: dict[str, tuple[int, ...]], sample: Any) -> list[Any]:
        widths = sample(tuple(sorted(set(grids["qk_kept"]) | set(grids["v_kept"]))))
        return [self.spec(qk_kept=w, v_kept=w) for w in widths]

    def proxy_terms(self, spec: Any) -> tuple[tuple[str, int], ...]:
        return (("qk_channels", spec.qk_kept), ("v_channels", spec.v_kept))

    def proxy_tables(self, ctx: TermContext) -> dict[str, list[float] | str]:
        if ctx.block is None or ctx.shape is None or ctx.stats is None:
            return {"qk_channels": NEEDS_STATS, "v_channels": NEEDS_STATS}
        from vitrank.core.channels import qk_channel_scores, v_channel_scores
        from vitrank.core.prune import removed_fractions

        attn, shape, i = ctx.block.attn, ctx.shape, ctx.index
        v = v_channel_scores(
            attn.proj.weight, ctx.stats.augmented_covariance(f"blocks.{i}.attn.proj"),
            shape.num_heads, shape.head_dim,
        )  # fmt: skip
        if shape.qk_norm:
            return {"qk_channels": "channel pruning is off (qk_norm).", "v_channels": []}
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

    def replaced(self, teacher_part: Any, spec: Any) -> list[nn.Module]:
        return [teacher_part.qkv, teacher_part.proj]

    def build(self, ctx: BuildContext, teacher: Any, copied: Any, spec: Any) -> nn.Module:
        drops = (teacher.attn_drop.p, teacher.proj_drop.p)
        kw: dict[str, Any] = {
            "dtype": teacher.qkv.weight.dtype,
            "device": teacher.qkv.weight.device,
        }
        if ctx.structure_only:
            module = HeadFactorizedAttention.empty(
                teacher.qkv.in_features, teacher.num_heads, spec.qk_kept, spec.v_kept,
                teacher.scale, head_dim=teacher.head_dim if ctx.merges else None,
                qk_bias=teacher.qkv.bias is not None, **kw,
            )  # fmt: skip
            module.attn_drop, module.proj_drop.p = drops
            return module
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
            *drops,
        )

    def describe(self, spec: Any, shape: BlockShape) -> str:
        return f"channels qk {spec.qk_kept}/{shape.head_dim}, v {spec.v_kept}/{shape.head_dim}"

    def keep_ratio(self, spec: Any, shape: BlockShape) -> float:
        return (2 * spec.qk_kept + 2 * spec.v_kept) / (4 * shape.head_dim)
