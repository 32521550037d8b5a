"""The shape every workload has, and the deterministic splits they share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

VAL_FRACTION = 0.2
SPLIT_SEED = 0  # fixed: the split never moves, so a teacher's val images stay unseen


@dataclass
class Workload:
    """A teacher and its data; every dataset yields ``(image_tensor, label)``."""

    name: str
    model: nn.Module  # the teacher, in eval mode
    model_name: str  # with model_args: `timm.create_model(model_name, **model_args)` rebuilds it
    model_args: dict[str, Any]
    train: Dataset
    calib: Dataset  # a deterministic subset of train
    val: Dataset
    num_classes: int
    input_size: tuple[int, int, int]  # (channels, height, width)
    data_config: dict[str, Any] = field(default_factory=dict)  # timm preprocessing


def loader(
    dataset: Dataset, batch_size: int = 128, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """A single-process DataLoader; shuffling is seeded so runs repeat."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


# --- splits -------------------------------------------------------------------------------


def stratified_split(
    labels: np.ndarray | list[int], val_fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split into sorted (train indices, val indices)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"`0 < val_fraction < 1` must hold, but got {val_fraction=}.")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        # every class with two or more images keeps at least one on each side
        n_val = int(round(val_fraction * len(members)))
        n_val = min(max(n_val, 1), len(members) - 1) if len(members) > 1 else 0
        val.append(members[:n_val])
        train.append(members[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def calibration_indices(num_train: int, calib_size: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded random subset of the training split."""
    if calib_size < 1:
        raise ValueError(f"`calib_size >= 1` must hold, but got {calib_size=}.")
    if num_train < 1:
        raise ValueError("the training split is empty; there is nothing to calibrate on.")
    size = min(calib_size, num_train)
    return np.sort(np.random.default_rng(seed).choice(num_train, size=size, replace=False))
