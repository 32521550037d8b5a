"""The embedded default: sklearn's UCI digits (1,797 real 8x8 images) and a small timm ViT
trained on them by ``benchmarks/train_digits_teacher.py``, shipped in
``workloads/assets/digits_vit`` in timm's own folder format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

DIGITS = "digits-vit"
DIGITS_DIR = Path(__file__).resolve().parent / "assets" / "digits_vit"
# The architecture of the digits teacher (timm's ViT at 8x8 pixels, 2x2 patches: 16 patch
# tokens + cls). Width 48 keeps it compact, as deployed ViTs are for their tasks, so that
# compressing it costs accuracy and the choice of ranks matters; head_dim 12 leaves
# head-level ranks (3, 6, 9) below it. It trains in a few minutes on two CPU cores.
DIGITS_MODEL_NAME = "vit_small_patch16_224"
DIGITS_MODEL_ARGS: dict[str, Any] = {
    "img_size": 8,
    "patch_size": 2,
    "in_chans": 1,
    "num_classes": 10,
    "embed_dim": 48,
    "depth": 4,
    "num_heads": 4,
    "mlp_ratio": 4.0,
}


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits as (images float32 N x 1 x 8 x 8 in [0, 1], labels int64)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[:, None]  # pixel values are 0..16
    return images, digits.target.astype(np.int64)


def digits_tensors(mean: float, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as normalized (images, labels) tensors, in sklearn's order."""
    images, labels = digits_arrays()
    return (torch.from_numpy(images) - mean) / std, torch.from_numpy(labels)
