"""Signals: what a compressed model's logits on held-out images say of its quality.

The fidelity ladder (`vitrank.search`) ranks candidates by one of them, measured on the
run's selection images; every registered signal is recorded beside it (the trials table,
``rungs.json``, the report), so how well each one predicts the final accuracy can be read
off any run. Each signal is a per-image value whose mean is the signal, oriented so that
higher is better: its standard error is the noise the ladder weighs a difference against.

- ``kl``: minus KL(teacher ‖ model) per image, in nats (the distillation's own target).
- ``agreement``: whether the model's top-1 is the teacher's.
- ``accuracy``: whether the model's top-1 is the label.

A new signal is one `Signal` and its `SIGNALS.add` line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from vitrank.core.registry import Registry


@dataclass(frozen=True)
class Signal:
    """One per-image measure of a model against the teacher and the labels."""

    name: str
    description: str
    # (logits, teacher_logits, labels) -> one value per image, higher is better
    per_image: Callable[[Tensor, Tensor, Tensor], Tensor]
    # 0/1 values: a perfect score still gets one image's worth of noise
    binary: bool = False

    def measure(self, logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> Measured:
        values = self.per_image(logits.double(), teacher_logits.double(), labels).double()
        n = values.numel()
        if n == 0:
            raise ValueError(f"signal {self.name!r} needs at least one image, but got none.")
        mean = float(values.mean())
        variance = float(values.var(unbiased=False))
        if self.binary:
            variance = max(variance, 1.0 / n)
        return Measured(mean, math.sqrt(variance / n), n)


@dataclass(frozen=True)
class Measured:
    """A signal's value on `images` images and its standard error."""

    value: float
    se: float
    images: int

    def beats(self, other: Measured, z: float = 2.0) -> bool:
        """Whether this value is above `other` by more than `z` standard errors of the
        difference (the two measured independently: a conservative margin)."""
        return self.value - other.value > z * math.hypot(self.se, other.se)


def _neg_kl(logits: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
    log_p, log_q = F.log_softmax(teacher, -1), F.log_softmax(logits, -1)
    return -(log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)


def _agreement(logits: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(-1) == teacher.argmax(-1)).double()


def _accuracy(logits: Tensor, teacher: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(-1) == labels.to(logits.device)).double()


SIGNALS: Registry[Signal] = Registry("signal")
for _signal in (
    Signal("kl", "minus KL(teacher ‖ model) per image, nats", _neg_kl),
    Signal("agreement", "top-1 agreement with the teacher", _agreement, binary=True),
    Signal("accuracy", "top-1 accuracy on the labels", _accuracy, binary=True),
):
    SIGNALS.add(_signal.name, _signal)


def measure_signals(logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> dict[str, Measured]:
    """Every registered signal of one model's logits, in registry order."""
    with torch.no_grad():
        return {name: s.measure(logits, teacher_logits, labels) for name, s in SIGNALS.items()}


def signal_names() -> tuple[str, ...]:
    return SIGNALS.names()


__all__ = ["SIGNALS", "Measured", "Signal", "measure_signals", "signal_names"]
