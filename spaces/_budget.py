"""Budgets: what a search must stay within (parameters, FLOPs or predicted latency).

Forms accepted by `parse_budget`: ``0.5`` or ``"params=0.5"`` (fraction of the teacher's
parameters), ``"11M"`` / ``"11e6"`` / ``"params=11M"`` (absolute parameters),
``"flops=0.4"`` (fraction of the teacher's FLOPs), ``"20ms"`` / ``"latency=20ms@8/cuda"``
(predicted latency in milliseconds at a batch size on a device). A params or FLOPs value
is a fraction when ``0 < value <= 1`` and a count when above 1, so a count is whole:
``1.5`` is neither and is refused.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from vitrank.core.config import CompressionConfig
from vitrank.core.registry import Registry

from ._cost import count_flops, count_params

if TYPE_CHECKING:
    from ._space import SearchSpace

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}
_HOW = "a fraction of the teacher is 0 < value <= 1 (0.5), a count is whole (11M, 11000)"


class BudgetKind(abc.ABC):
    """What one kind of budget measures: its cost of a config, the dense teacher's (for
    fractions), the least the space reaches, and how a value of it reads in a message."""

    name: str
    relative: bool  # a value may be a fraction of the dense teacher's

    @abc.abstractmethod
    def cost(self, config: CompressionConfig, budget: Budget, latency_table: Any) -> float: ...

    @abc.abstractmethod
    def smallest(self, space: SearchSpace, budget: Budget, latency_table: Any) -> CompressionConfig:
        """A config of the space reaching (about) the least cost of this kind."""

    def dense(self, space: SearchSpace) -> float | None:
        """The dense teacher's cost (what a fraction is of); None where there is none."""
        return None

    def show(self, value: float, space: SearchSpace) -> str:
        return f"{value:.3g} ms"


class _CountKind(BudgetKind):
    """Parameters or FLOPs (at batch 1): exact counts, a fraction of the teacher's or whole."""

    relative = True

    def __init__(self, name: str, label: str, unit: str, count: Any, dense: str) -> None:
        self.name, self.label, self.unit = name, label, unit
        self._count, self._dense = count, dense

    def cost(self, config: CompressionConfig, budget: Budget, latency_table: Any) -> float:
        return float(self._count(config))

    def smallest(self, space: SearchSpace, budget: Budget, latency_table: Any) -> CompressionConfig:
        return space.smallest(self.name)

    def dense(self, space: SearchSpace) -> float:
        return float(getattr(space, self._dense))

    def show(self, value: float, space: SearchSpace) -> str:
        return f"{value:,.0f} {self.label} ({value / self.dense(space):.1%} of the teacher)"


class _LatencyKind(BudgetKind):
    """Predicted milliseconds at a batch size on a device, from a measured latency table."""

    name, relative = "latency", False

    def cost(self, config: CompressionConfig, budget: Budget, latency_table: Any) -> float:
        if latency_table is None:
            raise ValueError(
                "A latency budget needs a latency table for the target device; measure one "
                "with `vitrank latency` (spaces.measure_latency_table) and pass it."
            )
        from ._latency import predict_latency

        table = latency_table
        if table.batch != budget.batch or table.device != budget.device:
            raise ValueError(
                f"The latency table was measured at batch {table.batch} on {table.device}, but "
                f"the budget is at batch {budget.batch} on {budget.device}; measure a matching "
                "table."
            )
        return predict_latency(config, table)

    def smallest(self, space: SearchSpace, budget: Budget, latency_table: Any) -> CompressionConfig:
        return _fastest(space, budget, latency_table)


BUDGETS: Registry[BudgetKind] = Registry("budget kind")
for _kind in (
    _CountKind("params", "params", "parameters", count_params, "dense_params"),
    _CountKind("flops", "FLOPs", "FLOPs (batch 1)", count_flops, "dense_flops"),
    _LatencyKind(),
):
    BUDGETS.add(_kind.name, _kind)
BUDGET_KINDS = BUDGETS.names()


@dataclass(frozen=True)
class Budget:
    kind: str  # "params" | "flops" | "latency"
    value: float  # a fraction of the teacher (absolute=False), a count, or milliseconds
    absolute: bool = False  # params/flops: True when `value` is a count, not a fraction
    batch: int = 1  # latency: batch size the latency is for
    device: str = "cpu"  # latency: device the latency table was measured on

    def __post_init__(self) -> None:
        if self.kind not in BUDGETS:
            raise ValueError(f"Unknown budget kind {self.kind!r}; known: {list(BUDGET_KINDS)}.")
        if not self.value > 0:
            raise ValueError(f"`value > 0` must hold for a budget, but got value={self.value!r}.")
        if not BUDGETS.get(self.kind).relative and not self.absolute:
            object.__setattr__(self, "absolute", True)  # latency is always in ms
        if not self.absolute and self.value > 1:
            raise ValueError(
                f"A {self.kind} fraction must hold `0 < value <= 1`, but got value={self.value!r}"
                " (write an absolute count with a suffix, e.g. '11M')."
            )
        if self.absolute and self.relative and not float(self.value).is_integer():
            raise ValueError(
                f"A {self.kind} budget above 1 is a count and must be whole, but got "
                f"value={self.value!r}: {_HOW}."
            )
        if self.batch < 1:
            raise ValueError(f"`batch >= 1` must hold, but got batch={self.batch!r}.")

    def __str__(self) -> str:
        if self.kind == "latency":
            return f"latency={self.value:g}ms@{self.batch}/{self.device}"
        if self.absolute:
            return f"{self.kind}={self.value:.4g}"
        return f"{self.kind}={self.value:g}"

    @property
    def measure(self) -> BudgetKind:
        return BUDGETS.get(self.kind)

    @property
    def relative(self) -> bool:
        """A count that may be a fraction of the teacher's (params, FLOPs), not a time."""
        return self.measure.relative

    def limit(self, space: SearchSpace) -> float:
        """The budget as an absolute count (params, FLOPs at batch 1) or milliseconds."""
        if self.absolute:
            return float(self.value)
        dense = self.measure.dense(space)
        assert dense is not None, f"a {self.kind} budget is never a fraction"
        return self.value * dense

    def cost(self, config: CompressionConfig, latency_table: Any = None) -> float:
        """The config's value in this budget's unit."""
        return self.measure.cost(config, self, latency_table)

    def violation(
        self, config: CompressionConfig, space: SearchSpace, latency_table: Any = None
    ) -> float:
        """Relative excess over the budget: <= 0 feasible (Optuna's constraint convention)."""
        limit = self.limit(space)
        return (self.cost(config, latency_table) - limit) / limit


def _number(text: str) -> tuple[float, bool]:
    """'0.5' -> (0.5, False); '11M' -> (11e6, True); '11e6' -> (11e6, True).

    The sign is read so that '-1' is refused by the rule `value > 0`, not as unreadable.
    """
    match = re.fullmatch(
        r"([+-]?[0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgb]?)", text.strip().lower()
    )
    if not match:
        raise ValueError(f"Cannot read a budget value from {text!r}; examples: 0.5, 11M, 11e6.")
    # Exact decimals: '2.01M' is the whole count 2010000, not 2010000.0000000002.
    value = float(Decimal(match.group(1)) * _SUFFIXES[match.group(2)])
    return value, bool(match.group(2)) or value > 1


def parse_budget(
    budget: str | float | Budget,
    kind: str | None = None,
    batch: int | None = 1,
    device: str | None = "cpu",
) -> Budget:
    """Read a budget from the CLI / API forms listed in the module docstring."""
    batch, device = batch or 1, device or "cpu"
    if isinstance(budget, Budget):
        return budget
    if isinstance(budget, (int, float)):
        kind = kind or "params"
        if kind == "latency":
            return Budget("latency", float(budget), True, batch, device)
        return Budget(kind, float(budget), budget > 1, batch, device)
    text = str(budget).strip()
    if "=" in text:
        kind, text = (part.strip() for part in text.split("=", 1))
    lowered = text.lower()
    if kind == "latency" or lowered.endswith("ms") or "ms@" in lowered:
        match = re.fullmatch(
            r"([+-]?[0-9]*\.?[0-9]+)\s*(?:ms)?(?:@(\d+))?(?:/(\w+(?::\d+)?))?", lowered
        )
        if not match:
            raise ValueError(
                f"Cannot read a latency budget from {text!r}; write e.g. '20ms', "
                "'latency=20ms@8/cuda'."
            )
        batch = int(match.group(2) or batch)
        device = match.group(3) or device
        return Budget("latency", float(match.group(1)), True, batch, device)
    value, absolute = _number(text)
    return Budget(kind or "params", value, absolute, batch, device)


def smallest_reachable(
    space: SearchSpace, budget: Budget, latency_table: Any = None
) -> tuple[float, CompressionConfig]:
    """The least value of the budget's cost the space reaches, and a config reaching it."""
    config = budget.measure.smallest(space, budget, latency_table)
    return budget.cost(config, latency_table), config


def _fastest(space: SearchSpace, budget: Budget, latency_table: Any) -> CompressionConfig:
    """The fastest config among the extremes, then improved block by block.

    Latency is not monotone in size: on a small model a factorized layer or a merge step
    can be slower than the dense one. So every block may take its dense, fewest-FLOPs or
    fewest-params choice, whichever the table predicts fastest with the others fixed.
    """
    extremes = [space.dense(), space.smallest("flops"), space.smallest("params")]

    def cost(config: CompressionConfig) -> float:
        return float(budget.cost(config, latency_table))

    best = min(extremes, key=cost)
    best_cost = cost(best)
    for index in range(len(best.blocks)):
        for extreme in extremes:
            blocks = list(best.blocks)
            blocks[index] = extreme.blocks[index]
            candidate = replace(best, blocks=tuple(blocks))
            candidate_cost = cost(candidate)
            if candidate_cost < best_cost:
                best, best_cost = candidate, candidate_cost
    return best


def check_feasible(space: SearchSpace, budget: Budget, latency_table: Any = None) -> None:
    """Refuse, before any search, a budget that no config of the space meets, or that the
    dense teacher already meets (its search would return the teacher)."""
    limit = budget.limit(space)
    measure = budget.measure
    dense = measure.dense(space)
    if dense is not None and limit >= dense:
        raise ValueError(
            f"Budget {budget} ({limit:,.0f}) is at or above the dense teacher's {dense:,.0f} "
            f"{getattr(measure, 'unit', measure.name)}: there is nothing to compress. Give a "
            f"fraction below 1 (e.g. 0.5) or a count below {dense:,.0f}."
        )
    reachable, _ = smallest_reachable(space, budget, latency_table)
    if reachable <= limit:
        return
    need = f"{limit:,.0f}" if measure.relative else measure.show(limit, space)
    raise ValueError(
        f"Budget {budget} ({need}) is infeasible: the smallest the space reaches is "
        f"{measure.show(reachable, space)}. Raise the budget, or widen the space (more --ops, "
        "a smaller --granularity, larger merge ratios)."
    )
