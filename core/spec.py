"""What to build in each block: the plain-data plan that `apply` turns into modules.

`spaces.CompressionConfig` carries one `BlockSpec` per block plus the model's fingerprint
and provenance; this module knows nothing of searches or budgets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar


@dataclass(frozen=True, init=False)
class PartSpec:
    """How one part of a block is built: an operator's name and its knob values.

    The knobs are whatever the operator declares (`Operator.knobs`): ``qkv_rank``,
    ``heads_kept``, ... A knob not set reads 0 (for the low-rank operators: that Linear
    stays dense), so two specs that differ only in knobs set to 0 are equal. Knobs read
    as attributes (``spec.qkv_rank``) or with `knob`; `replace` changes some.
    """

    op: str
    # (knob, value) pairs, sorted, knobs at 0 left out: what equality and hashing compare.
    knobs: tuple[tuple[str, Any], ...]

    def __init__(self, op: str = "dense", **knobs: Any) -> None:
        kept = tuple(sorted((k, v) for k, v in knobs.items() if not _is_zero(v)))
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "knobs", kept)

    def knob(self, name: str) -> Any:
        """The knob's value (0 when it is not set)."""
        for key, value in self.knobs:
            if key == name:
                return value
        return 0

    def __getattr__(self, name: str) -> Any:  # only for names that are not attributes
        if name.startswith("_"):
            raise AttributeError(name)
        return self.knob(name)

    def replace(self: _Spec, **knobs: Any) -> _Spec:
        """The same operator with some knobs changed."""
        return type(self)(self.op, **{**dict(self.knobs), **knobs})

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, **dict(self.knobs)}

    def __repr__(self) -> str:
        knobs = "".join(f", {k}={v!r}" for k, v in self.knobs)
        return f"{type(self).__name__}({self.op!r}{knobs})"


_Spec = TypeVar("_Spec", bound=PartSpec)


def _is_zero(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value == 0


class AttentionSpec(PartSpec):
    """The attention's operator: "dense" (untouched), "lowrank" (qkv and proj factorized
    separately), "heads" (COMCAT head-level factorization of W_qᵀW_k and W_vᵀW_oᵀ),
    "prune" (whole heads removed), or any operator registered for "attn"."""


class MlpSpec(PartSpec):
    """The MLP's operator: "dense", "lowrank" (fc1 and fc2 factorized), "prune" (hidden
    units removed), or any operator registered for "mlp"."""


@dataclass(frozen=True)
class BlockSpec:
    attn: AttentionSpec = field(default_factory=AttentionSpec)
    mlp: MlpSpec = field(default_factory=MlpSpec)
    # Fraction of the mergeable (non-prefix) tokens entering this block that are merged
    # away between its attention and its MLP (ToMe); see `merge_count`.
    merge_ratio: float = 0.0

    @property
    def is_dense(self) -> bool:
        return self.attn.op == "dense" and self.mlp.op == "dense" and self.merge_ratio == 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "attn": self.attn.to_dict(),
            "mlp": self.mlp.to_dict(),
            "merge_ratio": self.merge_ratio,
        }

    @classmethod
    def from_dict(cls, data: Any) -> BlockSpec:
        """The spec `to_dict` wrote (whether its knobs fit their operators is `apply`'s check)."""
        return cls(
            attn=AttentionSpec(**data["attn"]),
            mlp=MlpSpec(**data["mlp"]),
            merge_ratio=float(data["merge_ratio"]),
        )


# Token merging's name where operator families are listed (`--ops`): a knob of every block,
# not an operator.
MERGE_FAMILY = "tokens"


def merge_count(merge_ratio: float, tokens_in: int, num_prefix_tokens: int) -> int:
    """Number of tokens a block merges away: r = floor(ratio * patches), at most half.

    Bipartite matching pairs each token of one half with one of the other, so at most
    half of the mergeable tokens can go in one block. Both the merging module and the
    cost models use this function, so predicted and built token counts agree exactly.
    """
    if not 0.0 <= merge_ratio < 1.0:
        raise ValueError(f"`0 <= merge_ratio < 1` must hold, but got {merge_ratio=}.")
    mergeable = tokens_in - num_prefix_tokens
    if mergeable < 2:
        return 0
    return min(int(merge_ratio * mergeable + 1e-9), mergeable // 2)


def token_schedule(
    merge_ratios: list[float] | tuple[float, ...], num_tokens: int, num_prefix_tokens: int
) -> list[int]:
    """Tokens entering each block, plus the count leaving the last one (len = blocks + 1)."""
    counts = [num_tokens]
    for ratio in merge_ratios:
        counts.append(counts[-1] - merge_count(ratio, counts[-1], num_prefix_tokens))
    return counts
