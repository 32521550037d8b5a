"""Budgets: what a search must stay within (parameters, FLOPs or predicted latency).

Forms accepted by `parse_budget`: ``0.5`` or ``"params=0.5"`` (fraction of the teacher's
parameters), ``"11M"`` / ``"11e6"`` / ``"params=11M"`` (absolute parameters),
``"flops=0.4"`` (fraction of the teacher's FLOPs), ``"20ms"`` / ``"latency=20ms@8/cuda"``
(predicted latency in milliseconds at a batch size on a device). A params or FLOPs value
is a fraction when ``0 < value <= 1`` and a count when above 1, so a count is whole:
``1.5`` is neither and is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from vitrank.core.config import CompressionConfig

from ._cost import count_flops, count_params

if TYPE_CHECKING:
    from ._space import SearchSpace

BUDGET_KINDS = ("params", "flops", "latency")
_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}
_HOW = "a fraction of the teacher is 0 < value <= 1 (0.5), a count is whole (11M, 11000)"


@dataclass(frozen=True)
class Budget:
    kind: str  # "params" | "flops" | "latency"
    value: float  # a fraction of the teacher (absolute=False), a count, or milliseconds
    absolute: bool = False  # params/flops: True when `value` is a count, not a fraction
    batch: int = 1  # latency: batch size the latency is for
    device: str = "cpu"  # latency: device the latency table was measured on

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise ValueError(f"Unknown budget kind {self.kind!r}; known: {list(BUDGET_KINDS)}.")
        if not self.value > 0:
            raise ValueError(f"`value > 0` must hold for a budget, but got value={self.value!r}.")
        if self.kind == "latency" and not self.absolute:
            object.__setattr__(self, "absolute", True)  # latency is always in ms
        if not self.absolute and self.value > 1:
            raise ValueError(
                f"A {self.kind} fraction must hold `0 < value <= 1`, but got value={self.value!r}"
                " (write an absolute count with a suffix, e.g. '11M')."
            )
        if self.absolute and self.kind != "latency" and not float(self.value).is_integer():
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

    def limit(self, space: SearchSpace) -> float:
        """The budget as an absolute count (params, FLOPs at batch 1) or milliseconds."""
        if self.absolute:
            return float(self.value)
        dense = space.dense_params if self.kind == "params" else space.dense_flops
        return self.value * dense

    def cost(self, config: CompressionConfig, latency_table: Any = None) -> float:
        """The config's value in this budget's unit."""
        if self.kind == "params":
            return float(count_params(config))
        if self.kind == "flops":
            return float(count_flops(config))
        if latency_table is None:
            raise ValueError(
                "A latency budget needs a latency table for the target device; measure one "
                "with `vitrank latency` (spaces.measure_latency_table) and pass it."
            )
        from ._latency import predict_latency

        table = latency_table
        if table.batch != self.batch or table.device != self.device:
            raise ValueError(
                f"The latency table was measured at batch {table.batch} on {table.device}, but "
                f"the budget is at batch {self.batch} on {self.device}; measure a matching table."
            )
        return predict_latency(config, table)

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
    if budget.kind == "params":
        config = space.smallest("params")
    elif budget.kind == "flops":
        config = space.smallest("flops")
    else:
        config = _fastest(space, budget, latency_table)
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
    if budget.kind in ("params", "flops"):
        dense = space.dense_params if budget.kind == "params" else space.dense_flops
        if limit >= dense:
            unit = "parameters" if budget.kind == "params" else "FLOPs (batch 1)"
            raise ValueError(
                f"Budget {budget} ({limit:,.0f}) is at or above the dense teacher's {dense:,} "
                f"{unit}: there is nothing to compress. Give a fraction below 1 (e.g. 0.5) or "
                f"a count below {dense:,}."
            )
    reachable, _ = smallest_reachable(space, budget, latency_table)
    if reachable <= limit:
        return
    if budget.kind == "latency":
        shown, need = f"{reachable:.3g} ms", f"{limit:.3g} ms"
    elif budget.kind == "params":
        shown = f"{reachable:,.0f} params ({reachable / space.dense_params:.1%} of the teacher)"
        need = f"{limit:,.0f}"
    else:
        shown = f"{reachable:,.0f} FLOPs ({reachable / space.dense_flops:.1%} of the teacher)"
        need = f"{limit:,.0f}"
    raise ValueError(
        f"Budget {budget} ({need}) is infeasible: the smallest the space reaches is {shown}. "
        "Raise the budget, or widen the space (more --ops, a smaller --granularity, larger "
        "merge ratios)."
    )
