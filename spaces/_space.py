"""The search space: per block, which operators may run and at which ranks/keeps/ratios.

Rank grids hold only ranks that save parameters (a factorized Linear with rank r has
r·(in + out) weights, so r < in·out / (in + out)), as multiples of a granularity so factors
stay hardware-friendly. Per-head ranks (heads op) save whenever r < head_dim; their step is
`min(granularity, max(1, head_dim // 4))`, so small heads still get a few choices.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from vitrank.core.config import DEFAULT_SHRINKAGE, CompressionConfig
from vitrank.core.operators import PARTS, families, operator, operator_names
from vitrank.core.operators import saving_ranks as saving_ranks
from vitrank.core.spec import MERGE_FAMILY, AttentionSpec, BlockSpec, MlpSpec
from vitrank.core.structure import BlockShape, Fingerprint, inspect_vit

from ._cost import count_flops, count_params, dense_flops, dense_params


def search_families(default: bool = False) -> tuple[str, ...]:
    """The families a search can switch on: every registered operator family, then merging;
    with `default`, those it offers without `--ops`."""
    return (*families(default), MERGE_FAMILY)


DEFAULT_MERGE_RATIOS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)


@dataclass(frozen=True)
class BlockChoices:
    """What one block may become; every grid is ascending and holds only saving values."""

    name: str
    # part ("attn", "mlp") -> operator name -> knob -> grid; dense (no knobs) always first
    options: dict[str, dict[str, dict[str, tuple[int, ...]]]] = field(compare=False)
    merge_ratios: tuple[float, ...] = (0.0,)

    @property
    def attention_ops(self) -> tuple[str, ...]:
        return tuple(self.options["attn"])

    @property
    def mlp_ops(self) -> tuple[str, ...]:
        return tuple(self.options["mlp"])

    def attention_grids(self, op: str) -> dict[str, tuple[int, ...]]:
        """The AttentionSpec fields an op sets, with their grids."""
        return self.grids("attn", op)

    def mlp_grids(self, op: str) -> dict[str, tuple[int, ...]]:
        return self.grids("mlp", op)

    def grids(self, part: str, op: str) -> dict[str, tuple[int, ...]]:
        """The grids of `op` for one part of the block: "attn" or "mlp"."""
        if op not in self.options[part]:
            raise ValueError(
                f"{self.name}: operator {part}.{op} is not offered here; offered: "
                f"{', '.join(self.options[part])}."
            )
        return self.options[part][op]

    def grid(self, part: str, op: str, knob: str) -> tuple[int, ...]:
        """One knob's grid, empty when the operator is not offered in this block."""
        return self.options[part].get(op, {}).get(knob, ())

    def ops(self, part: str) -> tuple[str, ...]:
        """The operators one part of the block ("attn" or "mlp") may run."""
        return tuple(self.options[part])

    def spec(self, part: str, op: str, **knobs: int) -> AttentionSpec | MlpSpec:
        return operator(part, op).spec(**knobs)

    def cheapest_parts(self) -> tuple[list[AttentionSpec], list[MlpSpec]]:
        """Per operator, its spec with every knob at the grid's minimum."""
        attns = [
            AttentionSpec(op, **{k: g[0] for k, g in grids.items()})
            for op, grids in self.options["attn"].items()
        ]
        mlps = [
            MlpSpec(op, **{k: g[0] for k, g in grids.items()})
            for op, grids in self.options["mlp"].items()
        ]
        return attns, mlps


@dataclass(frozen=True)
class SearchSpace:
    """Per-block choices of one model; `config` turns per-block specs into a config of it."""

    model: str  # timm name the configs rebuild
    model_args: dict[str, Any] = field(compare=False)
    fingerprint: Fingerprint = field(repr=False)
    blocks: tuple[BlockChoices, ...] = field(repr=False)
    ops: tuple[str, ...] = field(default_factory=search_families)
    granularity: int = 8
    svd: str = "whitened"
    compensate: bool = False
    shrinkage: float = DEFAULT_SHRINKAGE

    def config(
        self, blocks: tuple[BlockSpec, ...] | list[BlockSpec], **kwargs: Any
    ) -> CompressionConfig:
        """A config of this space's model from per-block specs."""
        kwargs.setdefault("svd", self.svd)
        kwargs.setdefault("compensate", self.compensate)
        kwargs.setdefault("shrinkage", self.shrinkage)
        return CompressionConfig(
            self.model, dict(self.model_args), self.fingerprint, tuple(blocks), **kwargs
        )

    def dense(self) -> CompressionConfig:
        return self.config([BlockSpec() for _ in self.blocks])

    def check_on_grid(self, config: CompressionConfig) -> None:
        """Refuse a config with a knob this space does not offer: a rank, head count or
        width that saves no parameters, or one off the grid of this granularity.

        Rank 0 of a low-rank operator (the Linear kept dense) is always allowed. Merge
        ratios are not checked.
        """
        from vitrank.core.operators import of

        for choices, shape, block in zip(
            self.blocks, self.fingerprint.blocks, config.blocks, strict=True
        ):
            for part, spec in (("attn", block.attn), ("mlp", block.mlp)):
                op = of(spec)
                limits = op.limits(shape)
                for knob, grid in choices.grids(part, op.name).items():
                    value = getattr(spec, knob)
                    if value in grid or (value == 0 and limits.get(knob, (1,))[0] == 0):
                        continue
                    raise ValueError(
                        f"{choices.name}.{part} {op.name}: `{knob} in {list(grid)}` must hold "
                        f"(values that save parameters, on the grid of granularity "
                        f"{self.granularity}), but got {knob}={value}; a config a search "
                        "wrote always holds one of them."
                    )

    def random_config(self, rng: random.Random) -> CompressionConfig:
        """A point drawn uniformly per block: operator, then each of its knobs, then merging."""
        specs = []
        for choice in self.blocks:
            op = rng.choice(choice.attention_ops)
            attn = AttentionSpec(
                op, **{k: rng.choice(g) for k, g in choice.attention_grids(op).items()}
            )
            op = rng.choice(choice.mlp_ops)
            mlp = MlpSpec(op, **{k: rng.choice(g) for k, g in choice.mlp_grids(op).items()})
            specs.append(BlockSpec(attn, mlp, rng.choice(choice.merge_ratios)))
        return self.config(specs)

    @property
    def dense_params(self) -> int:
        return dense_params(self.fingerprint)

    @property
    def dense_flops(self) -> int:
        return dense_flops(self.fingerprint)

    def smallest(self, cost: str = "params") -> CompressionConfig:
        """The config with the fewest params (or FLOPs) the space reaches.

        Params and FLOPs add up over blocks' attention and MLP parts once the token schedule
        is fixed, and the most merging gives the fewest tokens everywhere, so picking the
        cheapest part of each block independently is exact.
        """
        if cost not in ("params", "flops"):
            raise ValueError(f"`cost` must be 'params' or 'flops', but got {cost=}.")
        specs = []
        for choice in self.blocks:
            attns, mlps = choice.cheapest_parts()
            ratio = max(choice.merge_ratios)
            options = [BlockSpec(a, m, ratio) for a in attns for m in mlps]
            specs.append(options)
        # Choose per block by its own cost, other blocks fixed at their first option.
        chosen = [opts[0] for opts in specs]
        measure = count_params if cost == "params" else count_flops
        for i, opts in enumerate(specs):
            costs = [measure(self.config(chosen[:i] + [o] + chosen[i + 1 :])) for o in opts]
            chosen[i] = opts[costs.index(min(costs))]
        return self.config(chosen)

    @property
    def min_params(self) -> int:
        return count_params(self.smallest("params"))

    @property
    def min_flops(self) -> int:
        return count_flops(self.smallest("flops"))

    def describe(self) -> str:
        """A readable table: one row per block, its operators and grids."""

        def grid(values: tuple) -> str:
            if not values:
                return "-"
            if len(values) <= 4:
                return ",".join(str(v) for v in values)
            step = values[1] - values[0]
            return f"{values[0]}..{values[-1]} step {step:g}"

        # Columns from the operator registry: per part, the operators offered, then each
        # operator's knobs (its grids joined by " / "); the merge ratios last.
        columns: list[tuple[str, Any]] = [("block", lambda c: c.name)]
        for part in PARTS:
            columns.append(
                ("attention" if part == "attn" else part, lambda c, p=part: "|".join(c.ops(p)))
            )
            for name in operator_names(part):
                knobs = operator(part, name).knobs
                if knobs:
                    title = f"{name} {'/'.join(knobs)}"
                    columns.append((title, lambda c, p=part, n=name, ks=knobs: " / ".join(
                        grid(c.grid(p, n, k)) for k in ks)))  # fmt: skip
        columns.append(("merge", lambda c: grid(c.merge_ratios)))
        cells = [[str(get(c)) for _, get in columns] for c in self.blocks]
        widths = [
            max(len(title), *(len(row[i]) for row in cells)) for i, (title, _) in enumerate(columns)
        ]
        header = "  ".join(title.ljust(w) for (title, _), w in zip(columns, widths, strict=True))
        lines = [
            f"Search space for {self.model} ({len(self.blocks)} blocks, ops={','.join(self.ops)}, "
            f"granularity={self.granularity})",
            header.rstrip(),
            "-" * len(header.rstrip()),
        ]
        lines += [
            "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
            for row in cells
        ]
        dp, df = self.dense_params, self.dense_flops
        mp, mf = self.min_params, self.min_flops
        lines.append(
            f"params: dense {dp:,}, smallest reachable {mp:,} ({mp / dp:.1%}); "
            f"FLOPs: dense {df:,}, smallest reachable {mf:,} ({mf / df:.1%})"
        )
        return "\n".join(lines)


def _block_choices(
    shape: BlockShape, ops: tuple[str, ...], granularity: int, merge_ratios: tuple[float, ...]
) -> BlockChoices:
    options: dict[str, dict[str, dict[str, tuple[int, ...]]]] = {}
    for part in PARTS:
        options[part] = {}
        for name in operator_names(part):
            op = operator(part, name)
            if op.family and op.family not in ops:
                continue
            grids = op.grids(shape, granularity)
            if grids is not None:
                options[part][name] = grids
    ratios = tuple(sorted(set(merge_ratios))) if MERGE_FAMILY in ops else (0.0,)
    return BlockChoices(name=shape.name, options=options, merge_ratios=ratios)


def build_space(
    model_or_fingerprint: nn.Module | Fingerprint,
    ops: tuple[str, ...] | list[str] | str | None = None,
    granularity: int = 8,
    merge_ratios: tuple[float, ...] = DEFAULT_MERGE_RATIOS,
    *,
    model_name: str | None = None,
    model_args: dict[str, Any] | None = None,
    svd: str = "whitened",
    compensate: bool = False,
    shrinkage: float = DEFAULT_SHRINKAGE,
) -> SearchSpace:
    """The search space of a timm ViT (or of its fingerprint).

    `ops` picks the operator families searched (a subset of `search_families()`, or a
    comma-separated string; default: those searched by default, `search_families(True)`);
    dense is always a choice. `model_name` defaults to the timm name the model was created
    with (or the fingerprint's architecture).
    """
    known = search_families()
    if ops is None:
        ops = search_families(default=True)
    elif isinstance(ops, str):
        ops = tuple(o.strip() for o in ops.split(",") if o.strip())
    ops = tuple(ops)
    unknown = [o for o in ops if o not in known]
    if unknown:
        raise ValueError(f"Unknown operator families {unknown}; known: {list(known)}.")
    if not isinstance(granularity, int) or granularity < 1:
        raise ValueError(f"`granularity >= 1` must hold, but got {granularity=}.")
    for ratio in merge_ratios:
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"`0 <= merge_ratio < 1` must hold, but got {ratio=}.")
    if isinstance(model_or_fingerprint, Fingerprint):
        fingerprint = model_or_fingerprint
        name = model_name or fingerprint.architecture
    else:
        cfg = getattr(model_or_fingerprint, "pretrained_cfg", None) or {}
        name = model_name or cfg.get("architecture") or type(model_or_fingerprint).__name__
        # No name: the fingerprint must match what `inspect_vit(model)` gives elsewhere.
        fingerprint = inspect_vit(model_or_fingerprint)
    blocks = tuple(
        _block_choices(shape, ops, granularity, tuple(merge_ratios)) for shape in fingerprint.blocks
    )
    return SearchSpace(
        model=name,
        model_args=dict(model_args or {}),
        fingerprint=fingerprint,
        blocks=blocks,
        ops=ops,
        granularity=granularity,
        svd=svd,
        compensate=compensate,
        shrinkage=shrinkage,
    )
