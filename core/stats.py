"""Calibration statistics: the sums that the factorizations and the pruning scores need.

A plain container. `evaluators.calibrate` fills it in one pass over the calibration
images; `vitrank.core` only reads it. Everything is a *sum* in fp64 plus a token
count, so statistics of two passes add and nothing depends on the batch size.

Per linear layer key ("blocks.{i}.attn.qkv", "blocks.{i}.attn.proj", "blocks.{i}.mlp.fc1",
"blocks.{i}.mlp.fc2") the augmented Gram matrix Σ x̄ᵀx̄ with x̄ = [x, 1]: its leading
(in × in) block is Σ xᵀx, its last row Σ x, its corner the token count.
Per block: the (H, d, d) sums Σ (A_h x)ᵀ(A_h x) (input covariance of the value/output
product of head h; A_h the head's attention probabilities, x the attention input), the
mean |h| of each MLP hidden unit and the mean |o_h| of each head's attention output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from vitrank.core.files import load_tensors, save_tensors

LINEAR_KEYS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
_FORMAT = "vitrank.calibration/1"


def linear_keys(num_blocks: int) -> list[str]:
    """The layer keys of a model with `num_blocks` blocks, in block order."""
    return [f"blocks.{i}.{name}" for i in range(num_blocks) for name in LINEAR_KEYS]


@dataclass
class CalibrationStats:
    # Σ x̄ᵀx̄ over calibration tokens, x̄ = [x, 1], fp64, (in + 1, in + 1) per linear key.
    gram: dict[str, Tensor] = field(default_factory=dict)
    # Σ (A_h x)ᵀ(A_h x) per block index, fp64, (H, d, d); same token count as attn.qkv.
    head_gram: dict[int, Tensor] = field(default_factory=dict)
    # Mean |h_j| of the MLP hidden units (input of fc2) per block index, (hidden,).
    hidden_abs_mean: dict[int, Tensor] = field(default_factory=dict)
    # Mean |o_h| of each head's attention output (input of proj) per block index, (H,).
    head_abs_mean: dict[int, Tensor] = field(default_factory=dict)
    num_images: int = 0
    # Free-form description of how the statistics were made (model digest, data, settings).
    meta: dict = field(default_factory=dict)

    # -- reading -----------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.head_gram)

    def _gram(self, key: str) -> Tensor:
        if key not in self.gram:
            known = ", ".join(sorted(self.gram)[:8])
            raise KeyError(f"No calibration statistics for layer {key!r}; known: {known}, ...")
        return self.gram[key]

    def tokens(self, key: str) -> int:
        """Number of calibration tokens that went through the layer."""
        return int(round(self._gram(key)[-1, -1].item()))

    def covariance(self, key: str) -> Tensor:
        """Second moment E[x xᵀ] = XᵀX / n (in × in, fp64), uncentred on purpose.

        A Linear keeps its bias, so the error of x(W - Ŵ)ᵀ is governed by the second
        moment, not by the centred covariance.
        """
        gram = self._gram(key)
        return gram[:-1, :-1] / gram[-1, -1]

    def augmented_covariance(self, key: str) -> Tensor:
        """E[x̄ x̄ᵀ] with x̄ = [x, 1] ((in + 1) × (in + 1), fp64); its corner is 1."""
        gram = self._gram(key)
        return gram / gram[-1, -1]

    def mean(self, key: str) -> Tensor:
        """E[x] of the layer's input (in,), fp64 (e.g. the MLP hidden means for fc2)."""
        gram = self._gram(key)
        return gram[-1, :-1] / gram[-1, -1]

    def head_covariance(self, block: int) -> Tensor:
        """E[(A_h x)ᵀ(A_h x)] per head, (H, d, d) fp64, normalised per token."""
        if block not in self.head_gram:
            raise KeyError(f"No head statistics for block {block}; have {sorted(self.head_gram)}.")
        return self.head_gram[block] / self.tokens(f"blocks.{block}.attn.qkv")

    # -- checking ----------------------------------------------------------------------

    def _named_tensors(self) -> dict[str, Tensor]:
        named = {f"gram.{k}": v for k, v in self.gram.items()}
        for prefix, table in (
            ("head_gram", self.head_gram),
            ("hidden_abs_mean", self.hidden_abs_mean),
            ("head_abs_mean", self.head_abs_mean),
        ):
            named.update({f"{prefix}.{i}": v for i, v in table.items()})
        return named

    def check_finite(self) -> None:
        """Raise ValueError naming the first layer whose statistics hold NaN or Inf."""
        for name, value in self._named_tensors().items():
            # min and max propagate NaN and see ±Inf, in one pass without a boolean copy
            low, high = torch.aminmax(value) if value.numel() else (value.new_zeros(()),) * 2
            if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
                bad = int((~torch.isfinite(value)).sum())
                raise ValueError(
                    f"Calibration statistics must be finite, but {name} holds {bad} NaN/Inf "
                    "values (non-finite activations in the model or the images?)."
                )
        for key, gram in self.gram.items():
            if gram[-1, -1] <= 0:
                raise ValueError(f"`tokens > 0` must hold for {key}, but got {gram[-1, -1]}.")

    # -- disk --------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """One safetensors file; the small JSON header rides in its metadata. Atomic."""
        header = {"format": _FORMAT, "num_images": self.num_images, "meta": self.meta}
        save_tensors(path, self._named_tensors(), header)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationStats:
        """Read a file written by `save`; a damaged or foreign file raises ValueError."""
        header, tensors = load_tensors(path, "Calibration file", _FORMAT)
        stats = cls(num_images=int(header["num_images"]), meta=header.get("meta", {}))
        tables = {
            "head_gram": stats.head_gram,
            "hidden_abs_mean": stats.hidden_abs_mean,
            "head_abs_mean": stats.head_abs_mean,
        }
        for name, value in tensors.items():
            kind, _, rest = name.partition(".")
            if kind == "gram":
                stats.gram[rest] = value
            elif kind in tables:
                tables[kind][int(rest)] = value
            else:
                raise ValueError(f"Calibration file {path} holds an unknown tensor {name!r}.")
        return stats
