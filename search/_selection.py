"""The selection split: training images only the ladder's signals read (see
`selection_data`), and every signal of a model measured on them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn
from vitrank.evaluators import gather
from vitrank.evaluators.signals import Measured

if TYPE_CHECKING:
    from torch.utils.data import Dataset
    from vitrank.search._problem import Problem
    from vitrank.workloads import Workload

BATCH_SIZE = 64  # the selection images' forward batch


@dataclass(frozen=True)
class SelectionData:
    """The distillation images and the selection images (held out from it), both train."""

    train: Dataset
    images: Tensor
    labels: Tensor
    indices: list[int]  # the selection images' indices in the training split
    teacher_logits: Tensor  # the teacher's on the selection images (fp32, CPU)
    forward_seconds: float = 0.0  # the teacher's forward per image here (what rung 1 plans by)


def selection_data(problem: Problem, workload: Workload) -> SelectionData:
    """The selection split: a seeded choice of training images that no other phase reads,
    neither the calibration (whose first images compensation refines on) nor the proxy's
    held-out batch (whose first images measure the sensitivity), and that no distillation
    trains on; the distillation trains on every other training image."""
    from torch.utils.data import Subset
    from vitrank.evaluators.proxies import heldout_indices
    from vitrank.search._problem import selection_size
    from vitrank.workloads import calibration_indices

    train = workload.train
    total = len(train)  # type: ignore[arg-type]
    seed = problem.settings.seed
    calib = problem.sizes.calib if problem.sizes else len(workload.calib)  # type: ignore[arg-type]
    calibration = calibration_indices(total, calib, seed)
    excluded = set(calibration.tolist())
    sizes = problem.sizes
    if sizes is not None and sizes.selection is not None:
        excluded |= set(heldout_indices(total, calibration, sizes.heldout, seed).tolist())
        remaining = np.array([i for i in range(total) if i not in excluded])
        size = min(sizes.selection, len(remaining))
    else:  # a run of an older version: selection images from what calibration leaves
        remaining = np.array([i for i in range(total) if i not in excluded])
        size = min(selection_size(total), len(remaining) // 2)
    if size < 1:
        raise ValueError(
            f"the {total} training images leave none for selection after the {calib} "
            "calibration and the proxy's held-out images; use a smaller --calib-size or "
            "--heldout-size."
        )
    rng = np.random.default_rng(problem.settings.seed + 7919)
    chosen = sorted(int(i) for i in rng.permutation(remaining)[:size])
    picked = set(chosen)
    images, labels = gather(train, chosen)
    rest = Subset(train, [i for i in range(total) if i not in picked])
    began = time.perf_counter()
    logits, _ = _logits(problem.teacher, images, labels, problem.device)
    per_image = (time.perf_counter() - began) / max(len(chosen), 1)
    return SelectionData(rest, images, labels, chosen, logits, per_image)


def _logits(
    model: nn.Module, images: Tensor, labels: Tensor, device: torch.device
) -> tuple[Tensor, Tensor]:
    from torch.utils.data import TensorDataset
    from vitrank.evaluators import predicted_logits

    data = TensorDataset(images, labels)
    return predicted_logits(model, data, BATCH_SIZE, device=device, progress=False)


def selection_signals(
    model: nn.Module, data: SelectionData, device: torch.device
) -> dict[str, Measured]:
    """Every registered signal of `model` on the selection images (one forward pass)."""
    from vitrank.evaluators.signals import measure_signals

    logits, labels = _logits(model, data.images, data.labels, device)
    return measure_signals(logits, data.teacher_logits, labels)


def _selection(current: Problem, workload: Workload) -> SelectionData:
    if current.selection is None:
        current.selection = selection_data(current, workload)
    return current.selection
