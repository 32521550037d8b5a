"""ToMe merging as pure functions: matching, size-weighted merge, source map, unmerge."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitrank.compress.merge import (
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
    x[:, 0] = x[:, 2]  # cls identical to patch token 1 (an A token)
    x[:, 1] = x[:, 4]  # a register identical to another A token
    matching = match_tokens(x, 4, num_prefix=2)
    source = merge_source(identity_source(2, 11), matching)
    assert torch.equal(source[:, :2], identity_source(2, 2))
    assert (torch.bincount(source[0], minlength=7)[:2] == 1).all()


def test_best_matches_are_merged_into_their_best_b() -> None:
    x = _tokens(batch=2, tokens=13)
    r, prefix = 3, 1
    matching = match_tokens(x, r, prefix)
    metric = F.normalize(x[:, prefix:], dim=-1)
    scores = metric[:, 0::2] @ metric[:, 1::2].transpose(1, 2)
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
