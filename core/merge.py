"""Token merging (ToMe): bipartite soft matching on the keys, as pure functions.

Adapted in idea from ToMe's ``bipartite_soft_matching`` (Bolya et al., ICLR 2023;
facebookresearch/ToMe, ``tome/merge.py``); our own code, changed in three ways: prefix
tokens are left out of the similarity matrix instead of masked with -inf, the unmerged A
tokens keep their original order, and the source map is an index per original token
(B, N_original) instead of a 0/1 matrix (B, N, N_original), which is enough to unmerge
and costs N_original integers per image. None of these changes which tokens merge, nor
the merged rows and their sizes: they are ToMe's, as a set of rows.

Tokens ``[prefix | patches]``: the prefix (cls, distillation, register tokens) is never
merged. As in ToMe, the sides alternate over the whole sequence, prefix included: set A
is the patch tokens at even positions, set B those at odd positions (so with one cls
token the first patch is a B token); a prefix token is neither merged away nor merged
into, as ToMe's -inf scores for the cls row and the distillation column make it. Each
A token is matched to its most similar B token (cosine of the head-averaged keys) and
the ``r`` best-matched A tokens are merged into their B partners. The merged sequence is
``[prefix | A tokens kept, in original order | B tokens]``, so the cls token stays first.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Matching(NamedTuple):
    """Which tokens merge into which, for one batch (indices are relative to A and B)."""

    num_prefix: int
    kept: Tensor  # (B, |A| - r) A tokens that stay, ascending
    merged: Tensor  # (B, r) A tokens merged away
    into: Tensor  # (B, r) the B token each of ``merged`` goes into
    num_b: int  # |B|, the number of patch tokens at odd positions

    @property
    def tokens_out(self) -> int:
        return self.num_prefix + self.kept.shape[1] + self.num_b


def _sides(num_prefix: int) -> tuple[int, int]:
    """Offsets of sets A and B in the patch tokens ``x[:, num_prefix:]``.

    A is the even positions of the whole sequence and B the odd ones (ToMe), so an odd
    number of prefix tokens makes the first patch token a B token.
    """
    a = num_prefix % 2
    return a, 1 - a


def match_tokens(metric: Tensor, r: int, num_prefix: int) -> Matching:
    """Bipartite soft matching of the patch tokens of ``metric`` (B, N, e), merging ``r``.

    Deterministic: ties in similarity are broken by position (stable sort, first maximum).
    The bound on ``r`` (``merge_count``'s) is at most |A| for any number of prefix tokens.
    """
    tokens = metric.shape[1]
    patches = tokens - num_prefix
    if not 0 <= r <= patches // 2:
        raise ValueError(
            f"`0 <= r <= (tokens - num_prefix) // 2` must hold, but got {r=}, {tokens=}, "
            f"{num_prefix=}."
        )
    # Only indices come out of here: no autograd graph for the similarity matrix.
    with torch.no_grad():
        # At least fp32 (half-precision cosines tie too often), and fp64 stays fp64.
        dtype = torch.promote_types(metric.dtype, torch.float32)
        metric = F.normalize(metric[:, num_prefix:].to(dtype), dim=-1)
        side_a, side_b = _sides(num_prefix)
        a, b = metric[:, side_a::2], metric[:, side_b::2]
        scores = a @ b.transpose(1, 2)  # (B, |A|, |B|) cosine similarities
        best, best_b = scores.max(dim=-1)
        order = torch.argsort(best, dim=-1, descending=True, stable=True)
        merged = order[:, :r]
        kept = order[:, r:].sort(dim=-1).values
        into = best_b.gather(1, merged)
    return Matching(num_prefix, kept, merged, into, b.shape[1])


def merge_tokens(x: Tensor, matching: Matching, reduce: str = "sum") -> Tensor:
    """Apply ``matching`` to ``x`` (B, N, c): merged A rows are reduced into their B rows.

    ``reduce`` is ``"sum"`` (what size-weighted means need: sums of x·size and of size)
    or any other ``scatter_reduce`` mode ("mean", "amax", ...).
    """
    p = matching.num_prefix
    channels = x.shape[-1]
    side_a, side_b = _sides(p)
    prefix, a, b = x[:, :p], x[:, p:][:, side_a::2], x[:, p:][:, side_b::2]

    def rows(t: Tensor, index: Tensor) -> Tensor:
        return t.gather(1, index[..., None].expand(-1, -1, channels))

    kept = rows(a, matching.kept)
    src = rows(a, matching.merged)
    b = b.scatter_reduce(1, matching.into[..., None].expand(-1, -1, channels), src, reduce=reduce)
    return torch.cat([prefix, kept, b], dim=1)


def merge_weighted(x: Tensor, size: Tensor | None, matching: Matching) -> tuple[Tensor, Tensor]:
    """Size-weighted mean merge of ``x`` (B, N, c); returns the new x and sizes (B, N').

    ``size`` None means every token has size 1 (nothing merged yet).
    """
    if size is None:
        size = x.new_ones(x.shape[:2])
    weights = size[..., None].to(x.dtype)
    # One merge for both sums (x·size and size): half the indexing work of two calls.
    total = merge_tokens(torch.cat([x * weights, weights], dim=-1), matching)
    new_size = total[..., -1:]
    return total[..., :-1] / new_size, new_size[..., 0].to(size.dtype)


def identity_source(batch: int, tokens: int, device: torch.device | None = None) -> Tensor:
    """Source map before any merge: original token i sits at position i."""
    return torch.arange(tokens, device=device).expand(batch, tokens)


def merge_source(source: Tensor, matching: Matching) -> Tensor:
    """Follow a merge in the source map (B, N_original) -> current position of each token."""
    p = matching.num_prefix
    batch = source.shape[0]
    num_a = matching.kept.shape[1] + matching.merged.shape[1]
    device = source.device
    # New position of every current token: prefix unchanged, kept A tokens packed after
    # the prefix, B tokens after those, merged A tokens at their B partner's position.
    new_a = torch.empty(batch, num_a, dtype=torch.long, device=device)
    num_kept = matching.kept.shape[1]
    kept_pos = torch.arange(p, p + num_kept, device=device).expand(batch, -1)
    new_a.scatter_(1, matching.kept, kept_pos)
    b_pos = torch.arange(p + num_kept, p + num_kept + matching.num_b, device=device)
    new_a.scatter_(1, matching.merged, b_pos[matching.into])
    new_pos = torch.empty(batch, p + num_a + matching.num_b, dtype=torch.long, device=device)
    new_pos[:, :p] = torch.arange(p, device=device)
    side_a, side_b = _sides(p)
    new_pos[:, p:][:, side_a::2] = new_a
    new_pos[:, p:][:, side_b::2] = b_pos.expand(batch, -1)
    return new_pos.gather(1, source)


def unmerge(x: Tensor, source: Tensor) -> Tensor:
    """Expand merged tokens ``x`` (B, N, c) back to the original grid (B, N_original, c).

    Row i of the result is the value of the merged token that original token i went into.
    """
    return x.gather(1, source[..., None].expand(-1, -1, x.shape[-1]))
