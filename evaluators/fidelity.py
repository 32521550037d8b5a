"""How well a proxy orders candidates: Kendall's tau-b (with its p-value) and Spearman's
rho against accuracy. The one rank-agreement function: the rungs, the reports and the
benchmarks all call `rank_fidelity`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

# Pairs compared at once in tau-b, to bound memory at about 8 MB per chunk.
_CHUNK_PAIRS = 1_000_000


@dataclass(frozen=True)
class Fidelity:
    # +1: the proxy orders the candidates exactly as accuracy does; -1: exactly reversed.
    # NaN when fewer than 3 finite pairs remain or one side is constant (no order to compare).
    kendall_tau: float  # tau-b (ties corrected)
    spearman_rho: float  # Pearson correlation of average ranks (ties share their mean rank)
    n: int  # pairs used (non-finite ones are dropped)
    kendall_p: float = math.nan  # two-sided p-value of tau-b against no association

    def to_dict(self) -> dict:
        return asdict(self)


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of the ranks they span."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Start index of each run of equal values, and the run each sorted position is in.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    run_of = np.repeat(np.arange(len(starts)), ends - starts)
    mean_rank = (starts + ends + 1) / 2.0  # mean of (start+1 .. end)
    ranks = np.empty(len(values))
    ranks[order] = mean_rank[run_of]
    return ranks


def spearman_rho(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    rx, ry = average_ranks(np.asarray(x)), average_ranks(np.asarray(y))
    dx, dy = rx - rx.mean(), ry - ry.mean()
    denominator = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / denominator if denominator > 0 else math.nan


def kendall_tau_b(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """tau-b = (concordant - discordant) / sqrt((n0 - ties_x)(n0 - ties_y)), n0 = n(n-1)/2."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(x)
    score = untied_x = untied_y = 0
    rows_per_chunk = max(1, _CHUNK_PAIRS // max(n, 1))
    for start in range(0, n, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, n))
        sx = np.sign(x[rows, None] - x[None, :])
        sy = np.sign(y[rows, None] - y[None, :])
        # Every unordered pair appears twice (i, j) and (j, i) with the same product.
        score += int((sx * sy).sum())
        untied_x += int(np.count_nonzero(sx))
        untied_y += int(np.count_nonzero(sy))
    denominator = math.sqrt(untied_x * untied_y)
    return score / denominator if denominator > 0 else math.nan


def rank_fidelity(
    proxy_scores: Sequence[float] | np.ndarray,
    accuracies: Sequence[float] | np.ndarray,
    *,
    lower_is_better: bool = True,
) -> Fidelity:
    """Kendall tau-b and Spearman rho between a proxy's scores and the candidates' accuracies.

    Proxy scores are losses by default (KL, discarded energy: lower predicts better), so
    they are negated before correlating: a perfect proxy gives +1 either way. Pairs where
    either value is NaN or infinite are dropped; with fewer than 3 left both figures are NaN.
    """
    scores = np.asarray(proxy_scores, dtype=np.float64).ravel()
    accuracy = np.asarray(accuracies, dtype=np.float64).ravel()
    if scores.shape != accuracy.shape:
        raise ValueError(
            f"one proxy score per accuracy is needed, but got {len(scores)} scores and "
            f"{len(accuracy)} accuracies."
        )
    keep = np.isfinite(scores) & np.isfinite(accuracy)
    scores, accuracy = scores[keep], accuracy[keep]
    if lower_is_better:
        scores = -scores
    n = len(scores)
    if n < 3:
        return Fidelity(kendall_tau=math.nan, spearman_rho=math.nan, n=n)
    tau = kendall_tau_b(scores, accuracy)
    return Fidelity(
        kendall_tau=tau,
        spearman_rho=spearman_rho(scores, accuracy),
        n=n,
        kendall_p=_kendall_p(scores, accuracy) if math.isfinite(tau) else math.nan,
    )


def _kendall_p(x: np.ndarray, y: np.ndarray) -> float:
    """SciPy's two-sided p-value of tau-b (exact for small untied samples)."""
    from scipy.stats import kendalltau

    return float(kendalltau(x, y).pvalue)
