"""The entry point: which teacher and images a run uses, as one frozen set of settings."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset, TensorDataset
from vitrank.core.registry import Registry

from ._base import Workload, calibration_indices, stratified_split
from ._digits import DIGITS, DIGITS_DIR, digits_arrays, digits_tensors
from ._fashion import FASHION, FASHION_DIR, fashion_arrays, fashion_tensors
from ._images import _folder_splits, _PilImages, _probe_classes
from ._models import _create_teacher, _data_config, _pil_mode, _transform, normalization


@dataclass(frozen=True)
class WorkloadSettings:
    """What `load()` needs to rebuild a workload: the same keys in run.yaml, a config's
    provenance and the CLI's workload options."""

    workload: str | None = DIGITS  # a named workload (its teacher and its images)
    model: str | None = None  # a timm name or local-dir:PATH replacing the named teacher
    # An ImageFolder tree replacing the images; for fashion-vit, the folder of its idx files.
    data: str | None = None
    pretrained: bool = False  # hub weights for a model given by name
    calib_size: int = 256
    seed: int = 0  # picks the calibration subset

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def of(cls, source: Any, **overrides: Any) -> WorkloadSettings:
        """The settings a mapping or an object (SearchSettings, argparse args) holds."""
        values: dict[str, Any] = {}
        for key in cls.names():
            value = source.get(key) if isinstance(source, Mapping) else getattr(source, key, None)
            if value is not None:
                values[key] = value
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values.get("data") is not None:
            values["data"] = str(values["data"])
        if "pretrained" in values:
            values["pretrained"] = bool(values["pretrained"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def teacher_keys(self) -> dict[str, Any]:
        """The keys that say which teacher and images (not the calibration draw), set ones only."""
        chosen = {k: getattr(self, k) for k in ("workload", "model", "data", "pretrained")}
        return {k: v for k, v in chosen.items() if v is not None and v is not False}

    def load(self) -> Workload:
        """The teacher and its train / calibration / validation data."""
        name = self.workload or DIGITS
        WORKLOADS.check(name)
        if not isinstance(self.calib_size, int) or self.calib_size < 1:  # before any model
            raise ValueError(
                f"`calib_size >= 1` must hold, but got calib_size={self.calib_size!r}."
            )
        workload = WORKLOADS.get(name)(self)
        num_train = len(workload.train)  # type: ignore[arg-type]  # every dataset here is sized
        indices = calibration_indices(num_train, self.calib_size, self.seed)
        return dataclasses.replace(workload, calib=Subset(workload.train, indices.tolist()))


def _shipped(directory: Path, script: str) -> str:
    if not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"the teacher is missing from {directory}; rebuild it with `python {script}`."
        )
    return f"local-dir:{directory}"


def _workload(
    name: str, teacher: tuple, config: dict[str, Any], train: Dataset, val: Dataset, classes: int
) -> Workload:
    model, model_name, model_args = teacher
    return Workload(
        name=name,
        model=model,
        model_name=model_name,
        model_args=model_args,
        train=train,
        calib=train,  # drawn by `WorkloadSettings.load`
        val=val,
        num_classes=classes,
        input_size=tuple(config["input_size"]),  # type: ignore[arg-type]
        data_config=config,
    )


def _on_folder(settings: WorkloadSettings, model: str) -> Workload:
    """Any teacher on an ImageFolder tree; the data's class count decides a random head."""
    data = Path(str(settings.data)).expanduser()
    probe, _ = _probe_classes(data)
    teacher = _create_teacher(model, settings.pretrained, probe)
    config = _data_config(teacher[0])
    train, val, classes = _folder_splits(data, _transform(config), _pil_mode(config))
    return _workload(f"{model}@{data}", teacher, config, train, val, classes)


def _on_arrays(
    settings: WorkloadSettings,
    model: str,
    label: str,
    pixels: tuple[np.ndarray, np.ndarray],
    targets: tuple[np.ndarray, np.ndarray],
) -> Workload:
    """Another teacher on a named workload's uint8 images, through its own preprocessing."""
    teacher = _create_teacher(model, settings.pretrained, None)
    config = _data_config(teacher[0])
    transform, mode = _transform(config), _pil_mode(config)
    train = _PilImages(pixels[0], targets[0], transform, mode)
    val = _PilImages(pixels[1], targets[1], transform, mode)
    return _workload(
        f"{model}@{label}", teacher, config, train, val, int(teacher[2]["num_classes"])
    )


def _digits(settings: WorkloadSettings) -> Workload:
    model = settings.model or _shipped(DIGITS_DIR, "benchmarks/train_digits_teacher.py")
    if settings.data is not None:
        return _on_folder(settings, model)
    arrays, target = digits_arrays()
    train_idx, val_idx = stratified_split(target)
    if settings.model is not None:
        pixels = np.round(arrays[:, 0] * 255).astype(np.uint8)
        return _on_arrays(
            settings,
            model,
            "digits",
            (pixels[train_idx], pixels[val_idx]),
            (target[train_idx], target[val_idx]),
        )
    teacher = _create_teacher(model, settings.pretrained, None)
    config = _data_config(teacher[0])
    # the exact float pixels the teacher was trained on (no uint8 round trip)
    images, labels = digits_tensors(*normalization(DIGITS_DIR / "config.json"))
    train = TensorDataset(images[train_idx], labels[train_idx])
    val = TensorDataset(images[val_idx], labels[val_idx])
    return _workload(DIGITS, teacher, config, train, val, 10)


def _fashion(settings: WorkloadSettings) -> Workload:
    """Fashion-MNIST: the official test split validates; calibration comes from train."""
    model = settings.model or _shipped(FASHION_DIR, "benchmarks/train_fashion_teacher.py")
    if settings.model is not None:
        pixels = fashion_arrays(settings.data)
        return _on_arrays(
            settings, model, "fashion", (pixels[0], pixels[2]), (pixels[1], pixels[3])
        )
    teacher = _create_teacher(model, settings.pretrained, None)
    config = _data_config(teacher[0])
    tensors = fashion_tensors(*normalization(FASHION_DIR / "config.json"), settings.data)
    return _workload(
        FASHION,
        teacher,
        config,
        TensorDataset(tensors[0], tensors[1]),
        TensorDataset(tensors[2], tensors[3]),
        10,
    )


WORKLOADS: Registry[Callable[[WorkloadSettings], Workload]] = Registry("workload")
WORKLOADS.add(DIGITS, _digits)
WORKLOADS.add(FASHION, _fashion)


def load_workload(
    workload: str | None = DIGITS,
    model: str | None = None,
    data: str | Path | None = None,
    pretrained: bool = False,
    calib_size: int = 256,
    seed: int = 0,
) -> Workload:
    """The teacher and its train / calibration / validation data (see `WorkloadSettings`).

    ``model`` (a timm name or ``local-dir:PATH``) replaces the named workload's teacher,
    ``data`` (an ImageFolder directory) its images; images are always shown to the teacher
    through timm's preprocessing for it. ``seed`` picks the calibration subset.
    """
    return WorkloadSettings(
        workload, model, None if data is None else str(data), pretrained, calib_size, seed
    ).load()
