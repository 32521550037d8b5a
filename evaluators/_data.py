"""Small helpers shared by the evaluators: batching a dataset and showing progress."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


def as_loader(
    data: Dataset | DataLoader | Iterable,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterable:
    """A DataLoader over `data`; an existing loader (or any iterable of batches) passes through.

    Shuffling uses its own seeded generator so that a run does not depend on (or move)
    the global random state.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size >= 1` must hold, but got {batch_size=}.")
    if isinstance(data, DataLoader) or not isinstance(data, Dataset):
        return data
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator)


def num_batches(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def images_and_labels(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) from a batch given as a pair or as a dict with image/label keys."""
    if isinstance(batch, dict):
        image_key = next(
            (k for k in ("image", "images", "pixel_values", "img") if k in batch), None
        )
        label_key = next((k for k in ("label", "labels", "target") if k in batch), None)
        if image_key is None or label_key is None:
            raise ValueError(
                f"a batch dict needs an image key and a label key, but got keys {sorted(batch)}."
            )
        return batch[image_key], torch.as_tensor(batch[label_key])
    images, labels = batch[0], batch[1]
    return images, torch.as_tensor(labels)


def gather(dataset: Any, indices: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of the items of `dataset` at `indices`, stacked into one batch."""
    items = [dataset[int(i)] for i in indices]
    images = torch.stack([torch.as_tensor(image) for image, _ in items])
    labels = torch.as_tensor([int(label) for _, label in items])
    return images, labels


def progress_bar(description: str, total: int | None, enabled: bool) -> Any:
    """`vitrank.core.progress.progress` (a bar on a terminal, lines elsewhere)."""
    from vitrank.core.progress import progress

    return progress(description, total, enabled)
