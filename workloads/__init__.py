"""Workloads: a teacher ViT with its train / calibration / validation images.

The layer right above the model-surgery core: ``spaces``, ``evaluators`` and ``search`` use
it without importing the public façade. Named workloads (`WORKLOADS`):

- ``digits-vit`` (the embedded default): sklearn's UCI digits and a small timm ViT trained
  on them, shipped in ``workloads/assets/digits_vit``;
- ``fashion-vit``: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` idx files and a
  timm ViT at 28 px with 4-px patches (50 tokens), shipped in ``workloads/assets/fashion_vit``.

Either teacher may be replaced by any timm ViT by name or a local timm folder
(``local-dir:PATH``), and the images by an ImageFolder tree. Splits are fixed (they do not
move with ``seed``), so a shipped teacher's validation images are never in its training
set; ``seed`` picks the calibration subset, which is drawn from the training split.
"""

from __future__ import annotations

from ._base import SPLIT_SEED, VAL_FRACTION, Workload, calibration_indices, loader, stratified_split
from ._digits import DIGITS, DIGITS_DIR, DIGITS_MODEL_ARGS, DIGITS_MODEL_NAME, digits_arrays
from ._fashion import (
    FASHION,
    FASHION_CLASSES,
    FASHION_DATA_DIR,
    FASHION_DIR,
    FASHION_MODEL_ARGS,
    FASHION_MODEL_NAME,
    fashion_arrays,
)
from ._load import WORKLOADS, WorkloadSettings, load_workload

__all__ = [
    "DIGITS",
    "DIGITS_DIR",
    "DIGITS_MODEL_ARGS",
    "DIGITS_MODEL_NAME",
    "FASHION",
    "FASHION_CLASSES",
    "FASHION_DATA_DIR",
    "FASHION_DIR",
    "FASHION_MODEL_ARGS",
    "FASHION_MODEL_NAME",
    "SPLIT_SEED",
    "VAL_FRACTION",
    "WORKLOADS",
    "Workload",
    "WorkloadSettings",
    "calibration_indices",
    "digits_arrays",
    "fashion_arrays",
    "load_workload",
    "loader",
    "stratified_split",
]
