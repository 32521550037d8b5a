"""Baselines: the published ways to pick ranks (or merge ratios) at a budget.

Each baseline is a function `(inputs: BaselineInputs) -> CompressionConfig` that returns
one config at the budget; a search enqueues their configs as its first trials (warm
start) and the report shows them beside the searched front. `--sampler baseline:NAME`
runs one alone.

- `uniform-plain`: every Linear at the same rank, plain (weight-only) SVD.
- `uniform-whitened`: the same ranks, activation-aware (whitened) SVD.
- `greedy`: mixed ranks by greedy allocation on the spectral proxy (Azizi et al. 2024):
  from the smallest ranks, repeatedly raise the rank of the Linear that lowers the proxy
  most per added unit of cost, while the budget holds.
- `asvd`: ASVD's sensitivity list (hahnyuan/ASVD4LLM, re-implemented): each Linear alone
  at kept-parameter ratios 0.1 … 0.9 is scored with the run's proxy; the (Linear, ratio)
  pairs sorted by score; a binary search finds the longest prefix whose per-Linear
  smallest ratios meet the budget (Linears never in the prefix stay dense).
- `flar`: in the style of FLAR-SVD (Thoma, Villasante et al., CVPR workshops 2025): each
  Linear's rank is the smallest on its grid (binary search) whose normalised error of the
  final features (before the head), that Linear alone compressed, stays under a threshold;
  the threshold is bisected until the ranks meet the budget.
- `tome`: ToMe with a constant merge ratio in every block, the smallest that meets the
  budget (it cannot meet a parameter budget: merging tokens removes no parameters).

All baselines factorize Linears at matrix level (qkv, proj, fc1, fc2); ranks come from the
model's saving-rank grids (multiples of the run's granularity), rank 0 keeping a Linear dense.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vitrank.core.registry import Registry
from vitrank.core.spec import AttentionSpec, BlockSpec, MlpSpec

if TYPE_CHECKING:
    from vitrank.spaces import Budget, CompressionConfig, SearchSpace

LINEARS = ("qkv", "proj", "fc1", "fc2")
ASVD_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class BaselineUnavailable(ValueError):
    """The baseline cannot produce a config at this budget (the reason says why)."""


@dataclass
class BaselineInputs:
    space: SearchSpace  # the run's space (its fingerprint, granularity, merge ratios)
    budget: Budget
    score: Callable[[CompressionConfig], float]  # the run's proxy (whitened factors)
    spectral: Callable[[CompressionConfig], float]  # the spectral proxy (whitened factors)
    latency_table: Any = None
    # ‖f − f_teacher‖² / ‖f_teacher‖² of the final features (before the head), whitened
    feature_error: Callable[[CompressionConfig], float] | None = None

    def fits(self, config: CompressionConfig) -> bool:
        limit = self.budget.limit(self.space)
        return self.budget.cost(config, self.latency_table) <= limit * (1 + 1e-9)

    def cost(self, config: CompressionConfig) -> float:
        return self.budget.cost(config, self.latency_table)


def _grids(space: SearchSpace) -> list[dict[str, tuple[int, ...]]]:
    """Per block, each Linear's saving ranks at the space's granularity."""
    from vitrank.spaces import build_space

    lowrank = build_space(
        space.fingerprint,
        ops=("lowrank",),
        granularity=space.granularity,
        model_name=space.model,
        model_args=space.model_args,
    )
    return [
        {
            "qkv": c.grid("attn", "lowrank", "qkv_rank"),
            "proj": c.grid("attn", "lowrank", "proj_rank"),
            "fc1": c.grid("mlp", "lowrank", "fc1_rank"),
            "fc2": c.grid("mlp", "lowrank", "fc2_rank"),
        }
        for c in lowrank.blocks
    ]


def ranks_config(
    space: SearchSpace, ranks: list[dict[str, int]], svd: str = "whitened", merge: float = 0.0
) -> CompressionConfig:
    """A config of per-block Linear ranks (0 = dense), matrix-level factorization."""
    blocks = []
    for r in ranks:
        attn = (
            AttentionSpec("lowrank", qkv_rank=r["qkv"], proj_rank=r["proj"])
            if r["qkv"] or r["proj"]
            else AttentionSpec()
        )
        mlp = (
            MlpSpec("lowrank", fc1_rank=r["fc1"], fc2_rank=r["fc2"])
            if r["fc1"] or r["fc2"]
            else MlpSpec()
        )
        blocks.append(BlockSpec(attn, mlp, merge))
    return space.config(blocks, svd=svd, compensate=False)


def _uniform(inputs: BaselineInputs, svd: str) -> CompressionConfig:
    grids = _grids(inputs.space)
    common = set.intersection(*(set(g[name]) for g in grids for name in LINEARS))
    for rank in sorted(common, reverse=True):
        config = ranks_config(inputs.space, [dict.fromkeys(LINEARS, rank) for _ in grids], svd)
        if inputs.fits(config):
            return config
    raise BaselineUnavailable(
        f"no rank shared by every Linear ({sorted(common)}) meets the budget {inputs.budget}."
    )


def uniform_plain(inputs: BaselineInputs) -> CompressionConfig:
    """The same rank for every Linear, plain SVD (the largest that meets the budget)."""
    return _uniform(inputs, "plain")


def uniform_whitened(inputs: BaselineInputs) -> CompressionConfig:
    """The same rank for every Linear, whitened SVD (the largest that meets the budget)."""
    return _uniform(inputs, "whitened")


def greedy(inputs: BaselineInputs) -> CompressionConfig:
    """Greedy mixed ranks on the spectral proxy: best proxy drop per unit of cost first."""
    grids = _grids(inputs.space)
    # Each Linear climbs its grid, then to dense (rank 0) as the last step.
    ladders = [{name: [*g[name], 0] for name in LINEARS} for g in grids]
    level = [dict.fromkeys(LINEARS, 0) for _ in grids]

    def config_at(levels: list[dict[str, int]]) -> CompressionConfig:
        ranks = [{n: ladders[i][n][lv[n]] for n in LINEARS} for i, lv in enumerate(levels)]
        return ranks_config(inputs.space, ranks)

    current = config_at(level)
    if not inputs.fits(current):
        raise BaselineUnavailable(
            f"even the smallest ranks everywhere exceed the budget {inputs.budget}."
        )
    # The spectral proxy and the parameter and FLOP costs are sums over Linears, so each
    # step's change in score and cost is measured once, on one Linear moved alone; the
    # budget is still checked exactly on every step taken.
    score, cost = inputs.spectral(current), inputs.cost(current)
    effect: dict[tuple[int, str, int], tuple[float, float]] = {}
    for i in range(len(level)):
        for name in LINEARS:
            for k in range(1, len(ladders[i][name])):
                moved = [dict(x) for x in level]
                moved[i][name] = k
                alone = config_at(moved)
                effect[(i, name, k)] = (inputs.spectral(alone) - score, inputs.cost(alone) - cost)
    limit = inputs.budget.limit(inputs.space) * (1 + 1e-9)
    blocked: set[tuple[int, str, int]] = set()
    while True:
        best: tuple[float, int, str] | None = None
        for i, lv in enumerate(level):
            for name in LINEARS:
                k = lv[name] + 1
                if k >= len(ladders[i][name]) or (i, name, k) in blocked:
                    continue
                before = effect.get((i, name, lv[name]), (0.0, 0.0))
                d_score = effect[(i, name, k)][0] - before[0]
                d_cost = effect[(i, name, k)][1] - before[1]
                if cost + d_cost > limit:
                    continue
                gain = -d_score / max(d_cost, 1e-12)
                if best is None or gain > best[0]:
                    best = (gain, i, name)
        if best is None:
            return current
        _, i, name = best
        trial = [dict(x) for x in level]
        trial[i][name] += 1
        candidate = config_at(trial)
        if not inputs.fits(candidate):  # a cost that is not a plain sum (latency glue)
            blocked.add((i, name, trial[i][name]))
            continue
        level, current, cost = trial, candidate, inputs.cost(candidate)


def _ratio_rank(grid: tuple[int, ...], in_out: tuple[int, int], ratio: float) -> int:
    """The grid rank keeping about `ratio` of a Linear's parameters (never above it)."""
    fan_in, fan_out = in_out
    target = ratio * fan_in * fan_out / (fan_in + fan_out)
    below = [r for r in grid if r <= target]
    return below[-1] if below else grid[0]


def _shapes(space: SearchSpace) -> list[dict[str, tuple[int, int]]]:
    shapes = []
    for b in space.fingerprint.blocks:
        inner = b.attn_inner
        shapes.append(
            {
                "qkv": (b.dim, 3 * inner),
                "proj": (inner, b.dim),
                "fc1": (b.dim, b.mlp_hidden),
                "fc2": (b.mlp_hidden, b.dim),
            }
        )
    return shapes


def asvd(inputs: BaselineInputs) -> CompressionConfig:
    """ASVD: a sensitivity list of (Linear, ratio) by proxy, binary search on the budget."""
    grids, shapes = _grids(inputs.space), _shapes(inputs.space)
    dense = [dict.fromkeys(LINEARS, 0) for _ in grids]
    entries: list[tuple[float, int, str, int]] = []  # (score, block, linear, rank)
    for i, g in enumerate(grids):
        for name in LINEARS:
            if not g[name]:
                continue
            for rank in sorted({_ratio_rank(g[name], shapes[i][name], r) for r in ASVD_RATIOS}):
                ranks = [dict(x) for x in dense]
                ranks[i][name] = rank
                entries.append((inputs.score(ranks_config(inputs.space, ranks)), i, name, rank))
    entries.sort(key=lambda e: (e[0], e[1], LINEARS.index(e[2]), -e[3]))

    def prefix_config(k: int) -> CompressionConfig:
        ranks = [dict(x) for x in dense]
        for _, i, name, rank in entries[:k]:
            # A Linear takes the smallest rank among its entries in the prefix.
            if ranks[i][name] == 0 or rank < ranks[i][name]:
                ranks[i][name] = rank
        return ranks_config(inputs.space, ranks)

    if not inputs.fits(prefix_config(len(entries))):
        raise BaselineUnavailable(
            f"even every Linear at its smallest listed rank exceeds the budget {inputs.budget}."
        )
    low, high = 0, len(entries)  # cost falls as the prefix grows: find the shortest that fits
    while low < high:
        mid = (low + high) // 2
        if inputs.fits(prefix_config(mid)):
            high = mid
        else:
            low = mid + 1
    return prefix_config(low)


FLAR_BISECTIONS = 14  # threshold bisection steps (log scale); each reuses measured errors


def flar(inputs: BaselineInputs) -> CompressionConfig:
    """FLAR-SVD style: per-Linear rank by binary search under a feature-error threshold,
    the threshold bisected to the budget."""
    if inputs.feature_error is None:
        raise BaselineUnavailable("it needs the final features' error (no held-out images).")
    grids = _grids(inputs.space)
    dense = [dict.fromkeys(LINEARS, 0) for _ in grids]
    # Each Linear's ladder: its saving ranks, then dense (0) as the top.
    ladders = {(i, n): [*g[n], 0] for i, g in enumerate(grids) for n in LINEARS if g[n]}
    errors: dict[tuple[int, str, int], float] = {}

    def error(i: int, name: str, rank: int) -> float:
        if rank == 0:
            return 0.0
        if (i, name, rank) not in errors:
            ranks = [dict(x) for x in dense]
            ranks[i][name] = rank
            errors[(i, name, rank)] = inputs.feature_error(ranks_config(inputs.space, ranks))  # type: ignore[misc]
        return errors[(i, name, rank)]

    def at(threshold: float) -> CompressionConfig:
        ranks = [dict(x) for x in dense]
        for (i, name), ladder in ladders.items():
            low, high = 0, len(ladder) - 1  # ladder[high] (dense) always passes
            while low < high:  # the cheapest rung whose error is under the threshold
                mid = (low + high) // 2
                if error(i, name, ladder[mid]) <= threshold:
                    high = mid
                else:
                    low = mid + 1
            ranks[i][name] = ladder[low]
        return ranks_config(inputs.space, ranks)

    loose = max(error(i, n, ladder[0]) for (i, n), ladder in ladders.items()) if ladders else 0.0
    if not ladders or not inputs.fits(at(loose)):
        raise BaselineUnavailable(
            f"even every Linear at its smallest rank exceeds the budget {inputs.budget}."
        )
    tight = min((e for e in errors.values() if e > 0), default=loose) / 2
    if inputs.fits(at(tight)):
        return at(tight)
    # fits(at(t)) is monotone in t: bisect (in log scale) the smallest threshold that fits.
    for _ in range(FLAR_BISECTIONS):
        middle = math.sqrt(tight * loose) if tight > 0 else loose / 2
        if inputs.fits(at(middle)):
            loose = middle
        else:
            tight = middle
    return at(loose)


# ToMe merges at most half of a block's tokens (bipartite matching pairs them).
TOME_MAX_RATIO = 0.5


def tome(inputs: BaselineInputs) -> CompressionConfig:
    """ToMe: one merge ratio in every block, the smallest that meets the budget: on the
    search's grid, else (as ToMe picks its r for a speed target) between the grid's top and
    half the tokens, to 1e-3."""
    if inputs.budget.kind == "params":
        raise BaselineUnavailable("token merging removes no parameters; it has no params budget.")
    from vitrank.spaces import DEFAULT_MERGE_RATIOS

    def at(ratio: float) -> CompressionConfig:
        return inputs.space.config(
            [BlockSpec(merge_ratio=ratio) for _ in inputs.space.blocks], compensate=False
        )

    ratios = sorted(
        {r for c in inputs.space.blocks for r in c.merge_ratios} | set(DEFAULT_MERGE_RATIOS)
    )
    for ratio in ratios:
        if inputs.fits(at(ratio)):
            return at(ratio)
    loose, tight = max(ratios), TOME_MAX_RATIO - 1e-6
    if not inputs.fits(at(tight)):
        raise BaselineUnavailable(
            f"merging half of the tokens in every block still exceeds {inputs.budget}."
        )
    while tight - loose > 1e-3:  # the cost falls as the ratio grows
        middle = (loose + tight) / 2
        if inputs.fits(at(middle)):
            tight = middle
        else:
            loose = middle
    rounded = at(round(tight, 4))  # a ratio a config file reads well, where it still fits
    return rounded if inputs.fits(rounded) else at(tight)


BASELINES: Registry[Callable[[BaselineInputs], CompressionConfig]] = Registry("baseline")
for _name, _baseline in (
    ("uniform-plain", uniform_plain),
    ("uniform-whitened", uniform_whitened),
    ("greedy", greedy),
    ("asvd", asvd),
    ("flar", flar),
    ("tome", tome),
):
    BASELINES.add(_name, _baseline)


def get_baseline(name: str) -> Callable[[BaselineInputs], CompressionConfig]:
    return BASELINES.get(name)


def forward_evaluations(name: str, space: SearchSpace) -> int:
    """About how many forward-pass scores (the run's proxy or the features' error) a
    baseline computes on this space; the rest of their work is closed form."""
    BASELINES.check(name)
    grids = _grids(space)
    linears = [g[n] for g in grids for n in LINEARS if g[n]]
    if name == "asvd":  # every Linear alone at each ratio
        return sum(min(len(g), len(ASVD_RATIOS)) for g in linears)
    if name == "flar":  # a binary search per Linear, errors reused across thresholds
        return sum(min(len(g) + 1, 2 * math.ceil(math.log2(len(g) + 1)) + 1) for g in linears)
    return 0


def run_baselines(
    inputs: BaselineInputs, names: list[str] | tuple[str, ...] | None = None
) -> tuple[dict[str, CompressionConfig], dict[str, str]]:
    """Configs of the baselines that can meet the budget, and why the others cannot."""
    configs: dict[str, CompressionConfig] = {}
    skipped: dict[str, str] = {}
    for name in names or tuple(BASELINES):
        try:
            configs[name] = get_baseline(name)(inputs)
        except BaselineUnavailable as reason:
            skipped[name] = str(reason)
    return configs, skipped


def raw_expressible(config: CompressionConfig, space: SearchSpace) -> bool:
    """True when the raw parametrization can sample `config` exactly (to enqueue its params)."""
    if config.svd != space.svd or config.compensate != space.compensate:
        return False
    for block, choice in zip(config.blocks, space.blocks, strict=True):
        if block.attn.op not in choice.attention_ops or block.mlp.op not in choice.mlp_ops:
            return False
        for key, grid in choice.attention_grids(block.attn.op).items():
            if getattr(block.attn, key) not in grid:
                return False
        for key, grid in choice.mlp_grids(block.mlp.op).items():
            if getattr(block.mlp, key) not in grid:
                return False
        if not any(math.isclose(block.merge_ratio, r) for r in choice.merge_ratios):
            return False
    return True
