"""Pareto selection and the choice of winners: pure functions on (proxy, cost) points."""

from __future__ import annotations

from collections.abc import Sequence


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (both coordinates minimised), by rising cost.

    A point is dominated when another is no worse in both coordinates and better in one;
    of exact duplicates the first is kept.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][1], points[i][0], i))
    front: list[int] = []
    best_proxy = float("inf")
    for i in order:
        proxy, _ = points[i]
        # Sorted by cost, a point is on the front iff its proxy beats every cheaper one's.
        if proxy < best_proxy:
            front.append(i)
            best_proxy = proxy
    return front


def pick_winners(points: Sequence[tuple[float, float]], front: Sequence[int], k: int) -> list[int]:
    """Top `k` of a front: the best proxy first, then points spread evenly along the cost axis.

    `front` holds indices into `points` (feasible points only). Returns at most `k`
    distinct indices, the best proxy first.
    """
    if k <= 0 or not front:
        return []
    by_cost = sorted(front, key=lambda i: points[i][1])
    best = min(front, key=lambda i: (points[i][0], points[i][1]))
    chosen = [best]
    rest = [i for i in by_cost if i != best]
    want = min(k - 1, len(rest))
    if want > 0:
        # Evenly spaced positions over the remaining front, from its cheapest end.
        step = len(rest) / want
        for j in range(want):
            chosen.append(rest[min(len(rest) - 1, int(j * step))])
    return list(dict.fromkeys(chosen))[:k]
