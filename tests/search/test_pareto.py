from __future__ import annotations

import random

import pytest
from vitrank.search import pareto_front, pick_winners


def _dominated(p: tuple[float, float], q: tuple[float, float]) -> bool:
    return q[0] <= p[0] and q[1] <= p[1] and q != p


@pytest.mark.parametrize("seed", range(5))
def test_front_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    points = [(rng.randint(0, 20) / 4, rng.randint(0, 20)) for _ in range(60)]
    front = pareto_front(points)
    expected = {
        points[i] for i in range(len(points)) if not any(_dominated(points[i], q) for q in points)
    }
    assert {points[i] for i in front} == expected
    assert len(front) == len(expected)  # one index per distinct point
    costs = [points[i][1] for i in front]
    assert costs == sorted(costs)


def test_winners_best_first_then_spread() -> None:
    points = [(5.0, 1.0), (4.0, 2.0), (3.0, 3.0), (2.0, 4.0), (1.0, 5.0)]
    front = pareto_front(points)
    chosen = pick_winners(points, front, 3)
    assert chosen[0] == 4  # lowest proxy
    assert len(set(chosen)) == 3
    assert 0 in chosen  # the cheap end of the front is represented
    assert pick_winners(points, front, 0) == []
    assert sorted(pick_winners(points, front, 10)) == sorted(front)
