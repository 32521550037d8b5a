"""Top-1 accuracy of a classifier on a whole split."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from vitrank.evaluators._data import as_loader, images_and_labels, num_batches, progress_bar

# Show a progress bar on its own only when the split is long enough to wait for.
_AUTO_PROGRESS_BATCHES = 50


def input_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model's inputs must have: its parameters' (fp16 and bf16 models too)."""
    first = next(iter(model.parameters()), None)
    return first.dtype if first is not None and first.is_floating_point() else torch.float32


def _forward(
    model: nn.Module,
    data: Dataset | DataLoader | Iterable,
    batch_size: int,
    device: str | torch.device,
    progress: bool | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, labels) per batch of `data`: the model in eval mode under
    `torch.inference_mode` on `device`, left in the mode it had afterwards."""
    loader = as_loader(data, batch_size)
    total_batches = num_batches(loader)
    if progress is None:
        progress = total_batches is not None and total_batches > _AUTO_PROGRESS_BATCHES
    was_training = model.training
    model.eval()
    dtype = input_dtype(model)
    seen = 0
    try:
        with torch.inference_mode(), progress_bar("accuracy", total_batches, progress) as advance:
            for batch in loader:
                images, labels = images_and_labels(batch)
                logits = model(images.to(device=device, dtype=dtype))
                seen += len(labels.reshape(-1))
                yield logits, labels.reshape(-1)
                advance()
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("accuracy needs at least one labelled image, but the data is empty.")


def correct_predictions(
    model: nn.Module,
    data: Dataset | DataLoader | Iterable,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> torch.Tensor:
    """Whether `model`'s top-1 class is the label, per image of `data` (a bool tensor).

    `data` is a dataset of (image, label) pairs or a loader of batches. The model runs
    in eval mode under `torch.inference_mode` on `device` and is left in the mode it had;
    `progress=None` shows a bar only for long splits.
    """
    hits = [
        logits.argmax(-1).cpu() == labels
        for logits, labels in _forward(model, data, batch_size, device, progress)
    ]
    return torch.cat(hits)


def predicted_logits(
    model: nn.Module,
    data: Dataset | DataLoader | Iterable,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of every image of `data`: fp32 logits on the CPU, as
    `correct_predictions` runs the model."""
    pairs = list(_forward(model, data, batch_size, device, progress))
    return torch.cat([p[0].float().cpu() for p in pairs]), torch.cat([p[1] for p in pairs])


def evaluate_accuracy(
    model: nn.Module,
    data: Dataset | DataLoader | Iterable,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> float:
    """Top-1 accuracy of `model` over every (image, label) of `data`, in [0, 1]."""
    return float(correct_predictions(model, data, batch_size, device, progress).double().mean())
