"""Is one classifier really more accurate than another on the same images? McNemar's test.

Only the images on which exactly one of the two is right carry information: with `a_only`
right for the first alone and `b_only` for the second alone, under the null hypothesis
(equal accuracy) each such image is a fair coin. The exact two-sided binomial p-value is
used, which stays valid for the few disagreements small test sets give.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class McNemar:
    images: int  # images both were scored on
    a_only: int  # the first right, the second wrong
    b_only: int  # the second right, the first wrong
    p_value: float  # exact two-sided binomial test on a_only vs b_only

    @property
    def disagreements(self) -> int:
        return self.a_only + self.b_only

    def to_dict(self) -> dict:
        return {**asdict(self), "disagreements": self.disagreements}


def _binomial_two_sided(k: int, n: int) -> float:
    """P(X <= min(k, n-k)) + P(X >= max(k, n-k)) for X ~ Binomial(n, 1/2), exactly."""
    if n == 0:
        return 1.0
    low = min(k, n - k)
    # log-space terms: n up to millions of images stays finite
    log_half = n * math.log(0.5)
    tail = sum(
        math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half)
        for i in range(low + 1)
    )
    return min(1.0, 2.0 * tail)


def mcnemar(correct_a: torch.Tensor, correct_b: torch.Tensor) -> McNemar:
    """McNemar's exact test of two per-image correctness vectors over the same images."""
    a, b = (
        torch.as_tensor(correct_a, dtype=torch.bool),
        torch.as_tensor(correct_b, dtype=torch.bool),
    )
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"both correctness vectors must be 1-D over the same images, but got {tuple(a.shape)} "
            f"and {tuple(b.shape)}."
        )
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    return McNemar(len(a), a_only, b_only, _binomial_two_sided(a_only, a_only + b_only))
