"""Matrix-level low rank: each Linear of the part factorized on its own (whitened SVD)."""

from __future__ import annotations

from typing import Any

from torch import nn
from vitrank.core.attention import LowRankAttention
from vitrank.core.structure import BlockShape

from ._base import BuildContext, Linear, Operator, TermContext, factorized, saving_ranks


class _LowRankPair(Operator):
    """The part's two Linears at ranks `<name>_rank` (0 keeps that Linear dense)."""

    family = "lowrank"
    needs_factors = True
    names: tuple[str, str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.knobs = tuple(f"{name}_rank" for name in cls.names)

    def shapes(self, shape: BlockShape) -> list[tuple[str, int, int, bool]]:
        """(name, in, out, bias) of the part's two Linears."""
        raise NotImplementedError

    def limits(self, shape: BlockShape) -> dict[str, tuple[int, int]]:
        return {f"{n}_rank": (0, min(i, o)) for n, i, o, _ in self.shapes(shape)}

    def grids(self, shape: BlockShape, granularity: int) -> dict[str, tuple[int, ...]] | None:
        grids = {f"{n}_rank": saving_ranks(i, o, granularity) for n, i, o, _ in self.shapes(shape)}
        return grids if all(grids.values()) else None

    def linears(self, shape: BlockShape, spec: Any, merges: bool = False) -> list[Linear]:
        out: list[Linear] = []
        for name, fan_in, fan_out, bias in self.shapes(shape):
            out += factorized(name, fan_in, fan_out, getattr(spec, f"{name}_rank"), bias)
        return out

    def proxy_terms(self, spec: Any) -> tuple[tuple[str, int], ...]:
        return tuple((name, getattr(spec, f"{name}_rank")) for name in self.names)

    def proxy_tables(self, ctx: TermContext) -> dict[str, list[float] | str]:
        return {n: ctx.factors.fractions(ctx.key(self.part, n), True) for n in self.names}

    def reference_specs(self, ctx: TermContext, reference: float) -> list[tuple[str, Any]]:
        out = []
        for name in self.names:
            rank = max(1, round(reference * ctx.factors.max_rank(ctx.key(self.part, name))))
            out.append((name, self.spec(**{f"{name}_rank": rank})))
        return out

    def replaced(self, teacher_part: Any, spec: Any) -> list[nn.Module]:
        return [getattr(teacher_part, n) for n in self.names if getattr(spec, f"{n}_rank")]

    def factorized_linears(self, ctx: BuildContext, teacher: Any, copied: Any, spec: Any) -> list:
        """The part's two Linears: the copied ones, or low-rank ones from the factors."""
        out = []
        for name in self.names:
            rank = getattr(spec, f"{name}_rank")
            key = f"blocks.{ctx.index}.{self.part}.{name}"
            out.append(ctx.low_rank(key, getattr(teacher, name), rank) if rank else None)
        return [
            getattr(copied, n) if new is None else new
            for new, n in zip(out, self.names, strict=True)
        ]

    def describe(self, spec: Any, shape: BlockShape) -> str:
        ranks = ", ".join(f"{n} {getattr(spec, f'{n}_rank') or 'full'}" for n in self.names)
        return f"lowrank {ranks}"


class LowRankAttentionOp(_LowRankPair):
    name, part, names = "lowrank", "attn", ("qkv", "proj")

    def shapes(self, shape: BlockShape) -> list[tuple[str, int, int, bool]]:
        d, inner = shape.dim, shape.attn_inner
        return [("qkv", d, 3 * inner, shape.qkv_bias), ("proj", inner, d, shape.proj_bias)]

    def build(self, ctx: BuildContext, teacher: Any, copied: Any, spec: Any) -> nn.Module:
        qkv, proj = self.factorized_linears(ctx, teacher, copied, spec)
        return LowRankAttention(
            qkv, proj, teacher.num_heads, teacher.head_dim, teacher.scale,
            copied.q_norm, copied.k_norm, teacher.attn_drop.p, teacher.proj_drop.p,
        )  # fmt: skip


class LowRankMlpOp(_LowRankPair):
    name, part, names = "lowrank", "mlp", ("fc1", "fc2")

    def shapes(self, shape: BlockShape) -> list[tuple[str, int, int, bool]]:
        d, hidden = shape.dim, shape.mlp_hidden
        return [("fc1", d, hidden, shape.fc1_bias), ("fc2", hidden, d, shape.fc2_bias)]

    def build(self, ctx: BuildContext, teacher: Any, copied: Any, spec: Any) -> nn.Module:
        copied.fc1, copied.fc2 = self.factorized_linears(ctx, teacher, copied, spec)
        return copied
