"""What to build in each block: the plain-data plan that `apply` turns into modules.

`spaces.CompressionConfig` carries one `BlockSpec` per block plus the model's fingerprint
and provenance; this module knows nothing of searches or budgets.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AttentionSpec:
    # dense: untouched; lowrank: qkv and proj factorized separately (matrix level);
    # heads: COMCAT head-level factorization of W_q^T W_k and W_v^T W_o^T;
    # prune: whole heads removed.
    op: str = "dense"
    qkv_rank: int = 0  # lowrank: rank of the qkv Linear
    proj_rank: int = 0  # lowrank: rank of the proj Linear
    qk_rank: int = 0  # heads: rank of every head's query-key product (all heads share it)
    vo_rank: int = 0  # heads: rank of every head's value-output product
    heads_kept: int = 0  # prune: number of heads kept


@dataclass(frozen=True)
class MlpSpec:
    # dense: untouched; lowrank: fc1 and fc2 factorized; prune: hidden units removed.
    op: str = "dense"
    fc1_rank: int = 0  # lowrank
    fc2_rank: int = 0  # lowrank
    hidden_kept: int = 0  # prune: number of hidden units kept


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
