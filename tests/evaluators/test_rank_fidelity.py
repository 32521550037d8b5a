from __future__ import annotations

import math

import numpy as np
import pytest
from vitrank.evaluators import rank_fidelity
from vitrank.evaluators.fidelity import average_ranks, kendall_tau_b, spearman_rho


def test_average_ranks_share_ties():
    assert average_ranks(np.array([10.0, 20.0, 10.0, 5.0])).tolist() == [2.5, 4.0, 2.5, 1.0]


def test_hand_computed_values_without_ties():
    x = [1, 2, 3, 4, 5]
    y = [2, 1, 4, 3, 5]
    # Pairs: 10, discordant (1,2) and (3,4): tau = (8 - 2) / 10.
    assert kendall_tau_b(x, y) == pytest.approx(0.6)
    # sum d^2 = 4: rho = 1 - 6 * 4 / (5 * 24).
    assert spearman_rho(x, y) == pytest.approx(0.8)


def test_hand_computed_values_with_ties():
    x = [1, 1, 2, 3]
    y = [1, 2, 2, 3]
    # Pairs: (0,1) tie in x, (1,2) tie in y, the other 4 concordant.
    # tau-b = 4 / sqrt((6 - 1) * (6 - 1)) = 0.8.
    assert kendall_tau_b(x, y) == pytest.approx(0.8)
    # Ranks x: 1.5 1.5 3 4, y: 1 2.5 2.5 4 -> Pearson of the ranks.
    rx, ry = np.array([1.5, 1.5, 3, 4]), np.array([1, 2.5, 2.5, 4])
    expected = np.corrcoef(rx, ry)[0, 1]
    assert spearman_rho(x, y) == pytest.approx(expected)


def test_matches_scipy_on_random_data_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, size=200).astype(float)
    y = x + rng.integers(0, 4, size=200)
    assert kendall_tau_b(x, y) == pytest.approx(stats.kendalltau(x, y).statistic)
    assert spearman_rho(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)


def test_rank_fidelity_signs_losses_so_a_perfect_proxy_scores_one():
    kl = [0.1, 0.5, 0.2, 0.9]
    accuracy = [0.95, 0.7, 0.9, 0.3]
    perfect = rank_fidelity(kl, accuracy)
    assert perfect.kendall_tau == pytest.approx(1.0)
    assert perfect.spearman_rho == pytest.approx(1.0)
    assert perfect.n == 4
    reversed_ = rank_fidelity(kl, accuracy, lower_is_better=False)
    assert reversed_.kendall_tau == pytest.approx(-1.0)


def test_small_or_constant_inputs_give_nan_and_nonfinite_pairs_are_dropped():
    two = rank_fidelity([0.1, 0.2], [0.9, 0.8])
    assert two.n == 2 and math.isnan(two.kendall_tau) and math.isnan(two.spearman_rho)
    constant = rank_fidelity([0.1, 0.1, 0.1], [0.9, 0.8, 0.7])
    assert constant.n == 3 and math.isnan(constant.kendall_tau)
    dropped = rank_fidelity([0.1, float("nan"), 0.3, 0.2], [0.9, 0.5, 0.1, 0.5])
    assert dropped.n == 3 and dropped.kendall_tau == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one proxy score per accuracy"):
        rank_fidelity([0.1, 0.2, 0.3], [0.9, 0.8])
