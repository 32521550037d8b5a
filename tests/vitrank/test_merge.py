"""ToMe merging as pure functions: matching, size-weighted merge, source map, unmerge."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from vitrank.core.merge import (
    identity_source,
    match_tokens,
    merge_source,
    merge_tokens,
    merge_weighted,
    unmerge,
)


def _tokens(batch: int = 3, tokens: int = 19, channels: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, channels, generator=generator)


def _brute_force_merge(x0: torch.Tensor, source: torch.Tensor, tokens: int) -> torch.Tensor:
    """Mean of the original tokens that went into each current token (all sizes 1 at first)."""
    batch, _, channels = x0.shape
    expected = torch.zeros(batch, tokens, channels, dtype=torch.float64)
    for b in range(batch):
        for j in range(tokens):
            expected[b, j] = x0[b, source[b] == j].double().mean(0)
    return expected


@pytest.mark.parametrize("num_prefix", [0, 1, 2, 5])
@pytest.mark.parametrize("r", [0, 1, 4, 7])
def test_merge_removes_r_tokens_and_keeps_prefix(num_prefix: int, r: int) -> None:
    x = _tokens(tokens=num_prefix + 15)
    matching = match_tokens(x, r, num_prefix)
    merged, size = merge_weighted(x, None, matching)
    assert merged.shape == (3, num_prefix + 15 - r, 8)
    assert matching.tokens_out == merged.shape[1]
    assert torch.equal(size.sum(1), torch.full((3,), 15.0 + num_prefix))
    # Prefix tokens are untouched, keep size 1 and stay at their own positions.
    assert torch.equal(merged[:, :num_prefix], x[:, :num_prefix])
    assert torch.equal(size[:, :num_prefix], torch.ones(3, num_prefix))
    source = merge_source(identity_source(3, x.shape[1]), matching)
    assert torch.equal(source[:, :num_prefix], identity_source(3, num_prefix))
    # A prefix position receives no other token.
    assert not torch.isin(source[:, num_prefix:], torch.arange(num_prefix)).any()


def test_prefix_tokens_never_merge_even_when_most_similar() -> None:
    x = _tokens(batch=2, tokens=11)
    x[:, 0] = x[:, 3]  # cls identical to a B token
    x[:, 1] = x[:, 4]  # a register identical to an A token
    matching = match_tokens(x, 4, num_prefix=2)
    source = merge_source(identity_source(2, 11), matching)
    assert torch.equal(source[:, :2], identity_source(2, 2))
    assert (torch.bincount(source[0], minlength=7)[:2] == 1).all()


def test_best_matches_are_merged_into_their_best_b() -> None:
    x = _tokens(batch=2, tokens=13)
    r, prefix = 3, 1
    matching = match_tokens(x, r, prefix)
    # A: even positions of the whole sequence (cls at 0 left out), B: odd positions.
    metric = F.normalize(x, dim=-1)
    scores = metric[:, 2::2] @ metric[:, 1::2].transpose(1, 2)
    best, best_b = scores.max(-1)
    for b in range(2):
        top = torch.topk(best[b], r).indices
        assert set(matching.merged[b].tolist()) == set(top.tolist())
        assert torch.equal(matching.into[b], best_b[b, matching.merged[b]])
        kept = sorted(set(range(best.shape[1])) - set(top.tolist()))
        assert matching.kept[b].tolist() == kept


def test_size_weighted_mean_equals_mean_of_original_tokens_over_two_merges() -> None:
    x0 = _tokens(batch=2, tokens=21, channels=5, seed=1)
    source = identity_source(2, 21)
    x, size = x0, None
    for r in (6, 4):
        # A different metric than the values: merging follows keys, not x.
        matching = match_tokens(x + 0.3 * torch.randn_like(x), r, 1)
        x, size = merge_weighted(x, size, matching)
        source = merge_source(source, matching)
    assert x.shape[1] == 21 - 10
    counts = torch.stack([torch.bincount(s, minlength=x.shape[1]) for s in source])
    assert torch.equal(size, counts.float())
    expected = _brute_force_merge(x0, source, x.shape[1])
    torch.testing.assert_close(x.double(), expected, rtol=1e-5, atol=1e-6)


def test_unmerge_gives_full_grid_of_merged_values() -> None:
    x0 = _tokens(batch=2, tokens=17, channels=4)
    matching = match_tokens(x0, 5, 1)
    x, _ = merge_weighted(x0, None, matching)
    source = merge_source(identity_source(2, 17), matching)
    full = unmerge(x, source)
    assert full.shape == x0.shape
    for b in range(2):
        for i in range(17):
            assert torch.equal(full[b, i], x[b, source[b, i]])
    # Tokens that were not merged come back exactly.
    alone = torch.bincount(source[0], minlength=x.shape[1])[source[0]] == 1
    assert torch.equal(full[0, alone], x0[0, alone])


def test_merge_sum_and_other_reductions() -> None:
    x = torch.ones(1, 9, 2)
    matching = match_tokens(_tokens(batch=1, tokens=9), 3, 1)
    assert merge_tokens(x, matching).sum() == 18
    assert torch.equal(merge_tokens(x, matching, reduce="amax"), torch.ones(1, 6, 2))


def test_matching_is_deterministic_with_ties() -> None:
    metric = torch.ones(2, 11, 4)  # every pair equally similar
    first = match_tokens(metric, 4, 1)
    again = match_tokens(metric.clone(), 4, 1)
    for a, b in zip(first[1:4], again[1:4], strict=True):
        assert torch.equal(a, b)
    assert first.merged[0].tolist() == [0, 1, 2, 3]  # ties go to the earlier token


def test_too_many_merges_are_refused() -> None:
    with pytest.raises(ValueError, match="r <= "):
        match_tokens(_tokens(tokens=11), 6, 1)


# --- Agreement with ToMe ---------------------------------------------------------------
# Reference: Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023, and its code
# github.com/facebookresearch/ToMe (tome/merge.py: `bipartite_soft_matching`,
# `merge_wavg`). Re-implemented here from that description, one image at a time, to check
# vitrank's matching against it: sides alternate over the whole sequence (A = even
# positions, B = odd), the cls row and the distillation column of the scores are -inf,
# the r A tokens with the highest best-match score go into their best B token by a
# size-weighted mean, and the output is [kept A tokens | B tokens] (kept A sorted when
# there is a cls token; with a distillation token it goes right after the cls token).


def _tome_reference(
    x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int, num_prefix: int
) -> tuple[torch.Tensor, torch.Tensor]:
    class_token, distill_token = num_prefix >= 1, num_prefix == 2
    tokens = x.shape[1]
    r = min(r, (tokens - num_prefix) // 2)
    xs, sizes = [], []
    for image in range(x.shape[0]):
        keys = metric[image] / metric[image].norm(dim=-1, keepdim=True)
        side_a, side_b = list(range(0, tokens, 2)), list(range(1, tokens, 2))
        scores = keys[side_a] @ keys[side_b].T
        if class_token:
            scores[0, :] = -float("inf")
        if distill_token:
            scores[:, 0] = -float("inf")
        best, partner = scores.max(dim=1)
        ranked = sorted(range(len(side_a)), key=lambda i: -best[i].item())
        weighted = {j: x[image, j] * size[image, j] for j in side_b}
        total = {j: size[image, j].clone() for j in side_b}
        for i in ranked[:r]:
            src, dst = side_a[i], side_b[int(partner[i])]
            weighted[dst] = weighted[dst] + x[image, src] * size[image, src]
            total[dst] = total[dst] + size[image, src]
        kept = [side_a[i] for i in ranked[r:]]
        if class_token:
            kept.sort()
        rows = [(x[image, i], size[image, i]) for i in kept]
        rows += [(weighted[j] / total[j], total[j]) for j in side_b]
        if distill_token:  # [cls, distillation, other kept A, other B]
            rows.insert(1, rows.pop(len(kept)))
        xs.append(torch.stack([row for row, _ in rows]))
        sizes.append(torch.stack([s for _, s in rows]))
    return torch.stack(xs), torch.stack(sizes)


def _as_row_sets(x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Rows [x, size] of each image sorted by their first channel: order-free comparison."""
    rows = torch.cat([x, size[..., None]], dim=-1)
    order = rows[..., 0].argsort(dim=-1)
    return rows.gather(1, order[..., None].expand_as(rows))


@pytest.mark.parametrize("num_prefix", [0, 1, 2])
@pytest.mark.parametrize("tokens", [16, 17])
@pytest.mark.parametrize("r", [0, 1, 3, 7])
def test_one_merge_equals_tome_as_sets_of_rows_with_sizes(
    num_prefix: int, tokens: int, r: int
) -> None:
    x = _tokens(batch=4, tokens=tokens, channels=6, seed=r).double()
    metric = _tokens(batch=4, tokens=tokens, channels=5, seed=100 + r).double()
    # Sizes carried from earlier merges: not all one.
    size = torch.randint(1, 5, (4, tokens), generator=torch.Generator().manual_seed(r)).double()
    matching = match_tokens(metric, r, num_prefix)
    merged, new_size = merge_weighted(x, size, matching)
    expected, expected_size = _tome_reference(x, size, metric, r, num_prefix)
    assert merged.shape == expected.shape == (4, tokens - r, 6)
    torch.testing.assert_close(
        _as_row_sets(merged, new_size), _as_row_sets(expected, expected_size), rtol=0, atol=1e-12
    )
    # The prefix stays in front (timm pools token 0), as in ToMe with a cls token.
    assert torch.equal(merged[:, :num_prefix], x[:, :num_prefix])


@pytest.mark.parametrize("num_prefix", [0, 1, 2])
def test_successive_merges_equal_tome_with_sizes_carried(num_prefix: int) -> None:
    x0 = _tokens(batch=3, tokens=27, channels=6, seed=7).double()
    project = _tokens(batch=1, tokens=6, channels=4, seed=8).double()[0]  # keys = x W
    ours, ours_size = x0, None
    ref, ref_size = x0, torch.ones(3, 27, dtype=torch.float64)
    source = identity_source(3, 27)
    for r in (6, 5, 4, 2):
        # Each side computes its keys from its own tokens (as blocks do) and merges again.
        matching = match_tokens(ours @ project, r, num_prefix)
        ours, ours_size = merge_weighted(ours, ours_size, matching)
        source = merge_source(source, matching)
        ref, ref_size = _tome_reference(ref, ref_size, ref @ project, r, num_prefix)
        torch.testing.assert_close(
            _as_row_sets(ours, ours_size), _as_row_sets(ref, ref_size), rtol=0, atol=1e-12
        )
        if num_prefix == 0:
            # ToMe keeps its unmerged A tokens in ranked order without a cls token; the next
            # merge then alternates over another order, so only one step is comparable.
            ref, ref_size = ours, ours_size
        else:  # with a cls token ToMe's order is ours too
            assert torch.equal(ours, ref) and torch.equal(ours_size, ref_size)
    # The carried sizes count the original tokens in each merged token.
    counts = torch.stack([torch.bincount(s, minlength=ours.shape[1]) for s in source])
    assert torch.equal(ours_size, counts.double())


@pytest.mark.parametrize("num_prefix", [0, 1, 2, 5])
@pytest.mark.parametrize("tokens", [12, 13])
def test_cost_model_sides_are_the_matched_sides(num_prefix: int, tokens: int) -> None:
    from vitrank.spaces._cost import merge_sets

    matching = match_tokens(_tokens(batch=1, tokens=tokens), 2, num_prefix)
    side_a = matching.kept.shape[1] + matching.merged.shape[1]
    assert merge_sets(tokens, num_prefix) == (side_a, matching.num_b)
