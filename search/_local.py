"""Local refinement: after exploring, propose budget-feasible neighbours of the best trial.

A sampler explores the front broadly but, with a few hundred trials over tens of knobs,
rarely lands on the narrow ridge of good allocations at the budget, where a warm-start
baseline (ASVD's list, say) already sits. `LocalSearchSampler` wraps any Optuna sampler:
its first trials are the wrapped sampler's (and the enqueued ones); once `start_after`
trials are complete it proposes, for each new trial, a neighbour of an incumbent (the best
feasible trial by the first objective, baselines included, now and then one of the next
best; while no trial meets the budget, the ones that exceed it least):

1. one or two moves: a knob one step up or down its grid, an operator switched (the new
   operator's knobs chosen to cost about what the part cost before), or a merge ratio
   one step along its grid;
2. a repair: while the config is over the budget, a random other knob steps down; then
   random knobs step up while the budget holds, so the proposal spends the budget.

A proposal is a config never tried before (it retries a few times, then leaves the trial
to the wrapped sampler). It reaches the trial as the raw parametrization's parameters
(`spaces.raw_params`), so the trial is recorded like any other and both engines run it
unchanged. The sampler keeps no state that the study does not hold, so a resumed search
refines from where the killed one stopped.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import optuna
from vitrank.core.operators import operator
from vitrank.core.spec import AttentionSpec, BlockSpec, MlpSpec
from vitrank.search._engines import VIOLATION_ATTR
from vitrank.spaces import CONFIG_ATTR, CompressionConfig, ladder, raw_params

if TYPE_CHECKING:
    from collections.abc import Sequence

    from optuna.distributions import BaseDistribution
    from optuna.trial import FrozenTrial
    from vitrank.spaces import BlockChoices, SpaceFunction

_FIXED_PARAMS = "fixed_params"  # Optuna's system attr of enqueued trials


# ---- moves in config space --------------------------------------------------------------


def _spec(block: BlockSpec, part: str) -> AttentionSpec | MlpSpec:
    return block.attn if part == "attn" else block.mlp


def _with(block: BlockSpec, spec: AttentionSpec | MlpSpec) -> BlockSpec:
    if isinstance(spec, AttentionSpec):
        return replace(block, attn=spec)
    return replace(block, mlp=spec)


# (block, part, target): target is the operator's neighbour spec one knob step away, or ""
# for a move between dense and the top of a compressing op's ladder (and for merging).
Move = tuple[int, str, "AttentionSpec | MlpSpec | str"]


def _knob_steps(config: CompressionConfig, choices: Sequence[BlockChoices], up: bool) -> list[Move]:
    """Every one-step move up (more cost) or down (less cost), as the operators define them.

    A dense part steps down onto the top of a compressing op's ladder; a compressed part
    steps up to dense too. Merge ratios are the part "merge".
    """
    moves: list[Move] = []
    for i, (block, choice) in enumerate(zip(config.blocks, choices, strict=True)):
        for part in ("attn", "mlp"):
            spec = _spec(block, part)
            compressing = [op for op in choice.ops(part) if op != "dense"]
            if spec.op == "dense":
                if not up and compressing:
                    moves.append((i, part, ""))
                continue
            grids = choice.grids(part, spec.op)
            for new in operator(part, spec.op).neighbours(spec, grids, up):
                moves.append((i, part, new))
            if up and "dense" in choice.ops(part):
                moves.append((i, part, ""))
        ratios = choice.merge_ratios
        index = _ratio_index(ratios, block.merge_ratio)
        # A larger merge ratio costs less: "up" in cost is a smaller ratio.
        if (index > 0) if up else (index + 1 < len(ratios)):
            moves.append((i, "merge", ""))
    return moves


def _ratio_index(ratios: tuple[float, ...], value: float) -> int:
    return min(range(len(ratios)), key=lambda k: abs(ratios[k] - value))


def _step(
    config: CompressionConfig,
    choices: Sequence[BlockChoices],
    move: Move,
    up: bool,
    rng: random.Random,
) -> CompressionConfig:
    """`config` with one knob one step up (more cost) or down (less cost)."""
    i, part, target = move
    blocks = list(config.blocks)
    block, choice = blocks[i], choices[i]
    if part == "merge":
        ratios = choice.merge_ratios
        index = _ratio_index(ratios, block.merge_ratio) + (-1 if up else 1)
        blocks[i] = replace(block, merge_ratio=float(ratios[index]))
        return replace(config, blocks=tuple(blocks))
    if target == "":
        if up:  # to dense
            new: AttentionSpec | MlpSpec = AttentionSpec() if part == "attn" else MlpSpec()
        else:  # from dense onto the top of a compressing op's ladder
            op = rng.choice([op for op in choice.ops(part) if op != "dense"])
            new = ladder(choice, part, op)[-2]
    else:
        new = target  # type: ignore[assignment]
    blocks[i] = _with(block, new)
    return replace(config, blocks=tuple(blocks))


def _switch_op(
    config: CompressionConfig,
    choices: Sequence[BlockChoices],
    i: int,
    part: str,
    cost: Any,
    rng: random.Random,
) -> CompressionConfig | None:
    """Another operator for one part, at the step of its ladder closest in cost."""
    choice = choices[i]
    current = _spec(config.blocks[i], part)
    others = [op for op in choice.ops(part) if op != current.op]
    if not others:
        return None
    op = rng.choice(others)
    blocks = list(config.blocks)
    if op == "dense":
        blocks[i] = _with(blocks[i], AttentionSpec() if part == "attn" else MlpSpec())
        return replace(config, blocks=tuple(blocks))
    target = cost(config)
    best, best_gap = None, float("inf")
    for spec in ladder(choice, part, op)[:-1]:
        blocks[i] = _with(config.blocks[i], spec)
        candidate = replace(config, blocks=tuple(blocks))
        gap = abs(cost(candidate) - target)
        if gap < best_gap:
            best, best_gap = candidate, gap
    return best


def neighbour(
    config: CompressionConfig,
    choices: Sequence[BlockChoices],
    cost: Any,
    limit: float,
    rng: random.Random,
) -> CompressionConfig:
    """One or two random moves from `config`, then repaired to spend (not exceed) `limit`."""
    moved: set[tuple[int, str]] = set()
    for _ in range(1 + int(rng.random() < 0.5)):
        i = rng.randrange(len(choices))
        part = rng.choice(("attn", "mlp", "merge"))
        if part != "merge" and rng.random() < 0.3:
            switched = _switch_op(config, choices, i, part, cost, rng)
            if switched is not None:
                config = switched
                moved.add((i, part))
                continue
        up = rng.random() < 0.5
        options = [m for m in _knob_steps(config, choices, up) if m[:2] == (i, part)]
        if not options:
            options = _knob_steps(config, choices, up)
        if options:
            move = rng.choice(options)
            config = _step(config, choices, move, up, rng)
            moved.add(move[:2])
    # Repair: step other parts down until the budget holds.
    while cost(config) > limit:
        down = _knob_steps(config, choices, up=False)
        others = [m for m in down if m[:2] not in moved] or down
        if not others:
            break
        config = _step(config, choices, rng.choice(others), False, rng)
    # Fill: spend what is left, one random affordable step at a time.
    while True:
        ups = _knob_steps(config, choices, up=True)
        rng.shuffle(ups)
        for move in ups:
            candidate = _step(config, choices, move, True, rng)
            if cost(candidate) <= limit:
                config = candidate
                break
        else:
            return config


# ---- the sampler ------------------------------------------------------------------------


class LocalSearchSampler(optuna.samplers.BaseSampler):
    """`base`'s trials first; once `start_after` trials are complete, neighbours of incumbents.

    Needs the raw parametrization (`space_fn`) and a budget; enqueued trials (baselines, a
    resumed run's waiting trials) always keep their fixed parameters.
    """

    def __init__(
        self,
        base: optuna.samplers.BaseSampler,
        space_fn: SpaceFunction,
        start_after: int,
        seed: int = 0,
        tries: int = 20,
    ) -> None:
        if space_fn.parametrization != "raw" or space_fn.budget is None:
            raise ValueError(
                "Local refinement needs the raw parametrization and a budget, but got "
                f"parametrization={space_fn.parametrization!r}, budget={space_fn.budget}."
            )
        self.base = base
        self.space_fn = space_fn
        self.start_after = start_after
        self.seed = seed
        self.tries = tries
        self._planned: dict[int, dict[str, Any]] = {}

    # -- what Optuna calls ---------------------------------------------------------------

    def reseed_rng(self) -> None:
        self.base.reseed_rng()

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.base.before_trial(study, trial)
        if _FIXED_PARAMS in trial.system_attrs:
            return
        params = self.propose(study, trial.number)
        if params is not None:
            self._planned[trial._trial_id] = params

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        if trial._trial_id in self._planned:
            return {}
        return self.base.infer_relative_search_space(study, trial)

    def sample_relative(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        search_space: dict[str, BaseDistribution],
    ) -> dict[str, Any]:
        if trial._trial_id in self._planned:
            return {}
        return self.base.sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        planned = self._planned.get(trial._trial_id, {})
        if param_name in planned:
            value = planned[param_name]
            internal = param_distribution.to_internal_repr(value)
            if param_distribution._contains(internal):
                return value
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: optuna.trial.TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._planned.pop(trial._trial_id, None)
        self.base.after_trial(study, trial, state, values)

    # -- proposals -----------------------------------------------------------------------

    def propose(self, study: optuna.Study, number: int) -> dict[str, Any] | None:
        """Raw params of an untried neighbour of an incumbent, or None (still exploring)."""
        trials = study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        if len(done) < self.start_after:
            return None
        scored = [t for t in done if CONFIG_ATTR in t.user_attrs and t.values is not None]
        ranked = sorted((t for t in scored if _feasible(t)), key=lambda t: t.values[0])
        if not ranked:
            # Nothing meets the budget yet (a tight one that every baseline missed): start
            # from the trials closest to it; the neighbour's repair brings them within.
            ranked = sorted(
                (t for t in scored if t.user_attrs.get(VIOLATION_ATTR) is not None),
                key=lambda t: float(t.user_attrs[VIOLATION_ATTR]),
            )
        if not ranked:
            return None
        seen = {t.user_attrs[CONFIG_ATTR] for t in trials if CONFIG_ATTR in t.user_attrs}
        rng = random.Random(self.seed * 1_000_003 + number)
        space, budget = self.space_fn.space, self.space_fn.budget
        assert budget is not None
        limit = budget.limit(space)

        def cost(config: CompressionConfig) -> float:
            return budget.cost(config, self.space_fn.latency_table)

        for _ in range(self.tries):
            # Mostly the best trial; sometimes one of the next best, to leave a local optimum.
            pick = 0 if rng.random() < 0.75 else rng.randrange(min(5, len(ranked)))
            incumbent = _into_space(
                CompressionConfig.from_json(ranked[pick].user_attrs[CONFIG_ATTR]), space
            )
            if incumbent is None:
                continue
            candidate = neighbour(incumbent, space.blocks, cost, limit, rng)
            text = candidate.to_json(indent=None)
            if text not in seen and cost(candidate) <= limit:
                return raw_params(candidate, space)
        return None


def _feasible(trial: FrozenTrial) -> bool:
    violation = trial.user_attrs.get(VIOLATION_ATTR)
    return violation is not None and float(violation) <= 0 and trial.values is not None


def _into_space(config: CompressionConfig, space: Any) -> CompressionConfig | None:
    """`config` as the space's raw parametrization can express it (its svd, no provenance).

    None when a knob is off the space's grids (a baseline of another factorization keeps
    its ranks, only its SVD kind changes).
    """
    from vitrank.search.baselines import raw_expressible

    config = space.config(list(config.blocks))
    return config if raw_expressible(config, space) else None
