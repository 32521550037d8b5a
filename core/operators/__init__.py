"""The operator registry: every way vitrank can build a block's attention or MLP.

A new operator is one module here with an `Operator` subclass, plus its line below;
`apply`, the cost models, the search space, the spectral proxy and its sensitivity terms,
the latency table, the reports, `--ops` and the local search read it from `OPERATORS`
(keyed ``"attn.<name>"`` / ``"mlp.<name>"``).
"""

from __future__ import annotations

from vitrank.core.registry import Registry

from ._base import (
    NEEDS_STATS,
    PARTS,
    AttentionCore,
    BuildContext,
    Linear,
    Operator,
    Spec,
    TermContext,
    factorized,
    saving_ranks,
)
from .channels import ChannelsOp
from .dense import DenseAttentionOp, DenseMlpOp
from .heads import HeadsOp, head_rank_step
from .lowrank import LowRankAttentionOp, LowRankMlpOp
from .prune import PruneHeadsOp, PruneMlpOp

OPERATORS: Registry[Operator] = Registry("operator")
for _operator in (
    DenseAttentionOp(),
    LowRankAttentionOp(),
    HeadsOp(),
    PruneHeadsOp(),
    ChannelsOp(),
    DenseMlpOp(),
    LowRankMlpOp(),
    PruneMlpOp(),
):
    OPERATORS.add(f"{_operator.part}.{_operator.name}", _operator)


def operator(part: str, name: str) -> Operator:
    """The operator `name` of `part` ("attn" or "mlp"); unknown names list the known ones."""
    if part not in PARTS:
        raise ValueError(f"`part in {PARTS}` must hold, but got {part=}.")
    key = f"{part}.{name}"
    if key not in OPERATORS:
        raise ValueError(
            f"unknown {'attention' if part == 'attn' else 'mlp'} operator {name!r}; "
            f"known: {', '.join(operator_names(part))}."
        )
    return OPERATORS.get(key)


def operator_names(part: str) -> tuple[str, ...]:
    """The names of the operators registered for `part`, dense first."""
    return tuple(key.split(".", 1)[1] for key in OPERATORS if key.startswith(f"{part}."))


def of(spec: Spec) -> Operator:
    """The operator a part's spec names."""
    from vitrank.core.spec import AttentionSpec

    return operator("attn" if isinstance(spec, AttentionSpec) else "mlp", spec.op)


def families(default: bool = False) -> tuple[str, ...]:
    """The operator families `--ops` can switch on, besides "tokens" (merging); with
    `default`, those a search offers without `--ops`."""
    seen: dict[str, None] = {}
    for _, op in OPERATORS.items():
        if op.family and (op.searched_by_default or not default):
            seen[op.family] = None
    return tuple(seen)


__all__ = [
    "OPERATORS",
    "PARTS",
    "AttentionCore",
    "BuildContext",
    "Linear",
    "Operator",
    "NEEDS_STATS",
    "Spec",
    "TermContext",
    "factorized",
    "families",
    "head_rank_step",
    "of",
    "operator",
    "operator_names",
    "saving_ranks",
]
