"""Define-by-run parametrizations of a search space for Optuna (and Ray Tune's OptunaSearch).

Two ways to turn a trial into a `CompressionConfig`:

- **raw**: every per-block knob (operator, ranks, keeps, merge ratio) is a trial parameter;
  a budget becomes the constraint ``trial.set_constraint("budget", excess)`` (<= 0 is
  feasible), so a multi-objective search maps the whole front.
- **budgeted**: the sampler proposes per-block operators and *shares* in [0, 1]; the
  deterministic `allocate` turns the shares into ranks/keeps that meet the budget to within
  one step of one part's grid, so every trial is feasible.

Everything here is module level and `SpaceFunction` holds only plain data, so Ray Tune can
pickle it with its searcher.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vitrank.core.config import CompressionConfig
from vitrank.core.registry import Registry
from vitrank.core.spec import AttentionSpec, BlockSpec, MlpSpec

from ._budget import Budget
from ._space import BlockChoices, SearchSpace

CONFIG_ATTR = "config"  # user attr holding the trial's config JSON (both engines)


def _pick(trial: Any, name: str, values: tuple) -> Any:
    """One grid value: an int range with a step when the grid is arithmetic, else categorical."""
    if len(values) == 1:
        return values[0]
    if all(isinstance(v, int) for v in values):
        step = values[1] - values[0]
        if all(b - a == step for a, b in zip(values, values[1:], strict=False)):
            return trial.suggest_int(name, values[0], values[-1], step=step)
    return trial.suggest_categorical(name, list(values))


def _knobs(trial: Any, prefix: str, grids: dict[str, tuple[int, ...]]) -> dict[str, int]:
    return {key: _pick(trial, f"{prefix}.{key}", grid) for key, grid in grids.items()}


def suggest_raw(trial: Any, space: SearchSpace) -> CompressionConfig:
    """Every knob of every block a trial parameter, named ``blocks.{i}.attn.op`` etc."""
    specs = []
    for i, choice in enumerate(space.blocks):
        prefix = f"blocks.{i}"
        attn_op = _pick(trial, f"{prefix}.attn.op", choice.attention_ops)
        attn = AttentionSpec(
            attn_op, **_knobs(trial, f"{prefix}.attn", choice.attention_grids(attn_op))
        )
        mlp_op = _pick(trial, f"{prefix}.mlp.op", choice.mlp_ops)
        mlp = MlpSpec(mlp_op, **_knobs(trial, f"{prefix}.mlp", choice.mlp_grids(mlp_op)))
        ratio = float(_pick(trial, f"{prefix}.merge_ratio", choice.merge_ratios))
        specs.append(BlockSpec(attn, mlp, ratio))
    return space.config(specs)


# ---- budgeted -------------------------------------------------------------------------


def ladder(choice: BlockChoices, part: str, op: str) -> list[AttentionSpec] | list[MlpSpec]:
    """The specs an op steps through, cheapest first, ending with the dense part.

    With several knobs (e.g. qkv and proj ranks) all move together along their own grids,
    so every step up raises cost; the number of steps is that of the longest grid.
    """
    grids = choice.grids(part, op)
    make = AttentionSpec if part == "attn" else MlpSpec
    steps = max((len(g) for g in grids.values()), default=0)
    specs = []
    for level in range(steps):
        fraction = level / (steps - 1) if steps > 1 else 0.0
        knobs = {k: g[round(fraction * (len(g) - 1))] for k, g in grids.items()}
        specs.append(make(op, **knobs))
    specs.append(make("dense"))
    return specs  # type: ignore[return-value]


@dataclass
class _Part:
    block: int
    kind: str  # "attn" | "mlp"
    share: float
    steps: list  # ladder of specs
    level: int = 0

    @property
    def top(self) -> int:
        return len(self.steps) - 1


def _assemble(
    space: SearchSpace, parts: list[_Part], ratios: list[float], **kwargs: Any
) -> CompressionConfig:
    attn: list[AttentionSpec] = [AttentionSpec() for _ in space.blocks]
    mlp: list[MlpSpec] = [MlpSpec() for _ in space.blocks]
    for part in parts:
        spec = part.steps[part.level]
        if part.kind == "attn":
            attn[part.block] = spec
        else:
            mlp[part.block] = spec
    blocks = [BlockSpec(a, m, r) for a, m, r in zip(attn, mlp, ratios, strict=True)]
    return space.config(blocks, **kwargs)


def _cheapest_op(
    space: SearchSpace,
    budget: Budget,
    part: _Part,
    table: Any,
    parts: list[_Part],
    ratios: list[float],
) -> list:
    """The ladder (of the block's ops) whose cheapest step costs least, other parts fixed."""
    choice = space.blocks[part.block]
    ops = choice.ops(part.kind)
    best, best_cost = part.steps, math.inf
    saved_steps, saved_level = part.steps, part.level
    for op in ops:
        if op == "dense":
            continue
        part.steps, part.level = ladder(choice, part.kind, op), 0
        cost = budget.cost(_assemble(space, parts, ratios), table)
        if cost < best_cost:
            best, best_cost = part.steps, cost
    part.steps, part.level = saved_steps, saved_level
    return best


def allocate(
    space: SearchSpace,
    budget: Budget,
    ops: dict[tuple[int, str], str],
    shares: dict[tuple[int, str], float],
    merge_ratios: list[float] | tuple[float, ...],
    latency_table: Any = None,
) -> CompressionConfig:
    """Turn per-part operators and shares into the config that meets `budget` most closely.

    ``ops[(block, "attn"|"mlp")]`` names a compressing operator, ``shares[...]`` in [0, 1]
    how much of its ladder (cheapest spec … dense) a part may climb relative to the others.
    Deterministic: a common scale t is bisected so the levels floor(t·share·top) fit the
    budget, then parts, largest share first, climb while the budget holds. On return every
    part that is not dense would exceed the budget with one more step.

    If even every part's cheapest step is over the budget, parts (smallest share first) switch
    to their block's cheapest operator, then blocks merge the most tokens they may.
    """
    limit = budget.limit(space)
    ratios = [float(r) for r in merge_ratios]
    parts = []
    for (block, kind), op in sorted(ops.items()):
        share = min(1.0, max(0.0, float(shares.get((block, kind), 0.0))))
        parts.append(_Part(block, kind, share, ladder(space.blocks[block], kind, op)))

    def cost() -> float:
        return budget.cost(_assemble(space, parts, ratios), latency_table)

    def fits() -> bool:
        return cost() <= limit

    if not fits():
        for part in sorted(parts, key=lambda p: (p.share, p.block, p.kind)):
            part.steps = _cheapest_op(space, budget, part, latency_table, parts, ratios)
            if fits():
                break
    if not fits():
        for i, choice in enumerate(space.blocks):
            ratios[i] = max(choice.merge_ratios)
            if fits():
                break
    if not fits():
        raise ValueError(
            f"Budget {budget} is infeasible for this space even at its cheapest config "
            f"(cost {cost():.4g} > limit {limit:.4g}); call spaces.check_feasible first."
        )

    def set_levels(t: float) -> None:
        for part in parts:
            part.level = min(part.top, math.floor(t * part.share * part.top + 1e-9))

    positive = [p.share for p in parts if p.share > 0]
    low, high = 0.0, 1.0 / min(positive) if positive else 0.0
    set_levels(high)
    if not fits():
        for _ in range(40):
            mid = (low + high) / 2
            set_levels(mid)
            if fits():
                low = mid
            else:
                high = mid
        set_levels(low)
    for part in sorted(parts, key=lambda p: (-p.share, p.block, p.kind)):
        while part.level < part.top:
            part.level += 1
            if not fits():
                part.level -= 1
                break
    return _assemble(space, parts, ratios)


def suggest_budgeted(
    trial: Any, space: SearchSpace, budget: Budget, latency_table: Any = None
) -> CompressionConfig:
    """Operators, shares and merge ratios from the trial; ranks from `allocate`."""
    ops: dict[tuple[int, str], str] = {}
    shares: dict[tuple[int, str], float] = {}
    ratios = []
    for i, choice in enumerate(space.blocks):
        prefix = f"blocks.{i}"
        for kind, available in (("attn", choice.attention_ops), ("mlp", choice.mlp_ops)):
            compressing = tuple(op for op in available if op != "dense")
            if not compressing:
                continue
            ops[(i, kind)] = _pick(trial, f"{prefix}.{kind}.op", compressing)
            shares[(i, kind)] = trial.suggest_float(f"{prefix}.{kind}.share", 0.0, 1.0)
        ratios.append(float(_pick(trial, f"{prefix}.merge_ratio", choice.merge_ratios)))
    return allocate(space, budget, ops, shares, ratios, latency_table)


def _suggest_raw(
    trial: Any, space: SearchSpace, budget: Budget | None, latency_table: Any
) -> CompressionConfig:
    return suggest_raw(trial, space)


def _suggest_budgeted(
    trial: Any, space: SearchSpace, budget: Budget | None, latency_table: Any
) -> CompressionConfig:
    if budget is None:
        raise ValueError("The budgeted parametrization needs a budget, but got budget=None.")
    return suggest_budgeted(trial, space, budget, latency_table)


# How a trial's params become a config: raw knobs (a budget is a constraint) or budget shares.
PARAMETRIZATIONS: Registry[Callable[..., CompressionConfig]] = Registry("parametrization")
PARAMETRIZATIONS.add("raw", _suggest_raw)
PARAMETRIZATIONS.add("budgeted", _suggest_budgeted)


class SpaceFunction:
    """The define-by-run ``space`` for Optuna and Ray Tune's OptunaSearch: ``fn(trial)``.

    Suggests a config, records the budget constraint (``set_constraint``; always <= 0 under
    ``budgeted``), stores the config JSON as the trial's ``"config"`` user attr and returns
    ``{"config": json}`` (Tune merges it into the trial's config). `config_of` rebuilds the
    config from a finished trial's params or user attrs.
    """

    def __init__(
        self,
        space: SearchSpace,
        budget: Budget | None = None,
        parametrization: str = "raw",
        latency_table: Any = None,
    ) -> None:
        PARAMETRIZATIONS.check(parametrization)
        if parametrization == "budgeted" and budget is None:
            raise ValueError("The budgeted parametrization needs a budget, but got budget=None.")
        if budget is not None and budget.kind == "latency" and latency_table is None:
            raise ValueError("A latency budget needs a latency table (spaces.LatencyTable).")
        self.space = space
        self.budget = budget
        self.parametrization = parametrization
        self.latency_table = latency_table

    def suggest(self, trial: Any) -> CompressionConfig:
        suggest = PARAMETRIZATIONS.get(self.parametrization)
        return suggest(trial, self.space, self.budget, self.latency_table)

    def __call__(self, trial: Any) -> dict[str, str]:
        config = self.suggest(trial)
        if self.budget is not None:
            excess = self.budget.violation(config, self.space, self.latency_table)
            trial.set_constraint("budget", excess)
        text = config.to_json(indent=None)
        trial.set_user_attr(CONFIG_ATTR, text)
        return {CONFIG_ATTR: text}

    def config_of(self, params: dict[str, Any]) -> CompressionConfig:
        """The config a trial with these params got (replays the define-by-run function)."""
        import optuna

        return self.suggest(optuna.trial.FixedTrial(params))


def raw_params(config: CompressionConfig, space: SearchSpace) -> dict[str, Any]:
    """Trial params that make `suggest_raw` return `config` (to enqueue warm starts)."""
    params: dict[str, Any] = {}
    for i, (block, choice) in enumerate(zip(config.blocks, space.blocks, strict=True)):
        prefix = f"blocks.{i}"
        params[f"{prefix}.attn.op"] = block.attn.op
        for key in choice.attention_grids(block.attn.op):
            params[f"{prefix}.attn.{key}"] = getattr(block.attn, key)
        params[f"{prefix}.mlp.op"] = block.mlp.op
        for key in choice.mlp_grids(block.mlp.op):
            params[f"{prefix}.mlp.{key}"] = getattr(block.mlp, key)
        params[f"{prefix}.merge_ratio"] = block.merge_ratio
    return params
