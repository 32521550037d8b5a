"""What an operator is: one way to build a block's attention or MLP, with its exact cost.

An operator declares its name and the part it acts on, the knobs it reads from the block's
spec with their limits and search grids for a block's shape, how it is built from factors
or statistics, the Linears it runs (from which parameter and FLOP counts follow exactly),
how a report describes it and its one-step neighbours for local search. `apply`, the cost
models, the proxies, the reports and the local search read operators from `OPERATORS`
and never branch on an operator's name.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from torch import nn
from vitrank.core.lowrank import LowRankLinear
from vitrank.core.spec import AttentionSpec, MlpSpec

if TYPE_CHECKING:
    from vitrank.core.factorize import FactorCache
    from vitrank.core.stats import CalibrationStats
    from vitrank.core.structure import BlockShape

PARTS = ("attn", "mlp")
Spec = AttentionSpec | MlpSpec


class Linear(NamedTuple):
    """One Linear layer a compressed block runs: y = x Wᵀ (+ b), W is (out × in)."""

    name: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


class AttentionCore(NamedTuple):
    """softmax(q kᵀ) v over `heads` heads with query/key width `qk_dim`, value width `v_dim`."""

    heads: int
    qk_dim: int
    v_dim: int


def factorized(name: str, in_f: int, out_f: int, rank: int, bias: bool) -> list[Linear]:
    """A Linear at `rank`: 0 keeps it dense, else B (rank × in, no bias) then A (out × rank)."""
    if rank == 0:
        return [Linear(name, in_f, out_f, bias)]
    return [Linear(f"{name}.B", in_f, rank, False), Linear(f"{name}.A", rank, out_f, bias)]


def saving_ranks(in_features: int, out_features: int, step: int) -> tuple[int, ...]:
    """Multiples of `step` with r·(in + out) < in·out (factorizing saves parameters)."""
    ranks = range(step, min(in_features, out_features) + 1, step)
    return tuple(r for r in ranks if r * (in_features + out_features) < in_features * out_features)


@dataclass(frozen=True)
class BuildContext:
    """What building one block's part may read; `factors`/`stats` are None under
    `structure_only`. `merges`: the block merges tokens after its attention."""

    factors: FactorCache | None
    stats: CalibrationStats | None
    structure_only: bool
    index: int = 0  # the block
    merges: bool = False

    def block(self, index: int, merges: bool) -> BuildContext:
        return replace(self, index=index, merges=merges)

    def low_rank(self, key: str, teacher: nn.Linear, rank: int) -> LowRankLinear:
        kw: dict[str, Any] = {"dtype": teacher.weight.dtype, "device": teacher.weight.device}
        if self.structure_only:
            return LowRankLinear(
                teacher.in_features, teacher.out_features, rank, teacher.bias is not None, **kw
            )
        assert self.factors is not None
        down, up, bias = self.factors.linear(key, rank)
        return LowRankLinear.from_factors(down, up, bias, **kw)

    def require_stats(self) -> CalibrationStats:
        if self.stats is None:
            raise ValueError(
                f"blocks.{self.index}: pruning scores units by their calibration activations, so "
                "`stats` (CalibrationStats) must be given, but got stats=None."
            )
        return self.stats


@dataclass(frozen=True)
class TermContext:
    """What an operator's proxy terms may read for block `index`: the factor cache, and the
    teacher's block, its shape and the calibration statistics where the proxy has them."""

    factors: FactorCache
    index: int
    block: Any = None  # the teacher's block (timm Block)
    shape: BlockShape | None = None
    stats: CalibrationStats | None = None

    def key(self, part: str, layer: str) -> str:
        """The factor cache's key of one of the block's layers: "blocks.3.attn.qkv"."""
        return f"blocks.{self.index}.{part}.{layer}"


# Why a pruning term has no table: its units are scored on the teacher's calibration activations.
NEEDS_STATS = (
    "the spectral proxy scores pruning by calibration importance, so `teacher` and `stats` "
    "must be given to SpectralProxy."
)


class Operator(abc.ABC):
    """One way to build a block part. Subclasses set the class attributes and three methods."""

    name: ClassVar[str]
    part: ClassVar[str]  # "attn" or "mlp"
    # The spec fields the operator reads; each knob's cost grows with its value.
    knobs: ClassVar[tuple[str, ...]] = ()
    # The family `--ops` switches on ("lowrank", "heads", "prune"); "" for dense.
    family: ClassVar[str] = ""
    # Whether a search without `--ops` offers it (a family is searched by default when any
    # of its operators is).
    searched_by_default: ClassVar[bool] = True
    needs_factors: ClassVar[bool] = False

    # --- what can be set --------------------------------------------------------------

    def limits(self, shape: BlockShape) -> dict[str, tuple[int, int]]:
        """Per knob, the (low, high) values that can be built (high reproduces the teacher)."""
        return {}

    def unsupported(self, shape: BlockShape) -> str | None:
        """Why the operator cannot act on this block, or None."""
        return None

    def grids(self, shape: BlockShape, granularity: int) -> dict[str, tuple[int, ...]] | None:
        """Per knob, the ascending values a search offers (only saving ones); None: not offered."""
        return {}

    def spec(self, **knobs: int) -> Spec:
        """The part's spec for this operator with the given knob values."""
        unknown = set(knobs) - set(self.knobs)
        if unknown:
            raise ValueError(
                f"operator {self.part}.{self.name} has knobs {self.knobs}, but got {sorted(unknown)}."
            )
        kind = AttentionSpec if self.part == "attn" else MlpSpec
        return kind(self.name, **knobs)

    def values(self, spec: Spec) -> dict[str, int]:
        return {knob: spec.knob(knob) for knob in self.knobs}

    def neighbours(self, spec: Spec, grids: dict[str, tuple[int, ...]], up: bool) -> list[Spec]:
        """Specs one grid step away on one knob, more costly (`up`) or less."""
        out: list[Spec] = []
        for knob, grid in grids.items():
            index = grid.index(getattr(spec, knob)) + (1 if up else -1)
            if 0 <= index < len(grid):
                out.append(spec.replace(**{knob: grid[index]}))
        return out

    # --- what it costs ----------------------------------------------------------------

    @abc.abstractmethod
    def linears(self, shape: BlockShape, spec: Spec, merges: bool = False) -> list[Linear]:
        """The Linears the built part runs, in order: its exact parameter and FLOP cost.

        ``merges``: the block merges tokens after this part (an attention operator may
        then need what token merging compares, e.g. the teacher's keys)."""

    def core(self, shape: BlockShape, spec: Spec) -> AttentionCore:
        """The attention product it runs (attention operators only)."""
        return AttentionCore(shape.num_heads, shape.head_dim, shape.head_dim)

    def proxy_terms(self, spec: Spec) -> tuple[tuple[str, int], ...]:
        """(term, value) pairs: the spectral proxy adds each term's table at that value."""
        return ()

    def proxy_tables(self, ctx: TermContext) -> dict[str, list[float] | str]:
        """Per term of `proxy_terms`, the share of the layer's output energy discarded at
        each knob value (indexed by value), or why the term cannot be scored here. The proxy
        weighs term t of block i by the sensitivity of "blocks.{i}.{part}.{t}"."""
        return {}

    def reference_specs(self, ctx: TermContext, reference: float) -> list[tuple[str, Spec]]:
        """Per term, a spec discarding only that term at about `reference` of its full
        size: what `measure_sensitivity` measures the term's weight with."""
        return []

    def latency_specs(
        self, grids: dict[str, tuple[int, ...]], sample: Callable[[tuple[int, ...]], list[int]]
    ) -> list[Spec]:
        """The specs whose kernels (`linears`, `core`, `activation_width`) a latency table
        measures: each knob at the values `sample` picks from its grid, the others at 0."""
        return [self.spec(**{knob: v}) for knob, grid in grids.items() for v in sample(grid)]

    def activation_width(self, shape: BlockShape, spec: Spec) -> int:
        """The width of the MLP's hidden activation it runs (MLP operators only)."""
        return shape.mlp_hidden

    # --- how it is built --------------------------------------------------------------

    def replaced(self, teacher_part: Any, spec: Spec) -> list[nn.Module]:
        """The teacher's Linears that `build` replaces (so they need not be copied)."""
        return []

    @abc.abstractmethod
    def build(self, ctx: BuildContext, teacher: Any, copied: Any, spec: Spec) -> nn.Module:
        """The part's module for block `ctx.index` (`copied`: the copy of the teacher's part)."""

    # --- how it reads -----------------------------------------------------------------

    @abc.abstractmethod
    def describe(self, spec: Spec, shape: BlockShape) -> str:
        """A few words for reports: "heads qk 6, vo 9"."""

    def brief(self, spec: Spec) -> str:
        """The operator and its knob values in a few characters: "lowrank 8/16"."""
        values = "/".join(str(spec.knob(knob)) for knob in self.knobs)
        return f"{self.name} {values}" if values else self.name

    def keep_ratio(self, spec: Spec, shape: BlockShape) -> float:
        """Fraction of the part's units kept (pruning); 1 for operators that keep them all."""
        return 1.0

    def __repr__(self) -> str:
        return f"<operator {self.part}.{self.name}>"
