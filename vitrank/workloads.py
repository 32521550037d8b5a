"""Workloads: a teacher ViT with its train / calibration / validation images.

Three sources, one shape (`Workload`):

- ``digits-vit`` (the embedded default): sklearn's UCI digits (1,797 real 8x8 images) and
  a small timm ViT trained on them by ``benchmarks/train_digits_teacher.py``, shipped in
  ``vitrank/assets/digits_vit`` in timm's own folder format;
- any timm ViT by name (``deit_small_patch16_224``; hub weights with ``pretrained=True``)
  or a local timm folder (``local-dir:PATH``, as written by ``timm.models.save_for_hf``);
- images from an ImageFolder directory, with ``train/`` and ``val/`` or one folder that is
  split deterministically, transformed with timm's data config for the model.

The train / validation split is fixed (it does not move with ``seed``), so the shipped
teacher's validation images are never in its training set; ``seed`` picks the
calibration subset, which is drawn from the training split.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder

DIGITS = "digits-vit"
WORKLOADS = (DIGITS,)
DIGITS_DIR = Path(__file__).parent / "assets" / "digits_vit"
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
VAL_FRACTION = 0.2
SPLIT_SEED = 0  # fixed: the split never moves, so a teacher's val images stay unseen
_FOLDER_LAYOUT = (
    "an ImageFolder tree: DIR/train/<class>/<image> and DIR/val/<class>/<image>, "
    "or DIR/<class>/<image> (split deterministically into train and val)"
)


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


# --- the embedded digits ------------------------------------------------------------------


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


def _digits_normalization(config_path: Path) -> tuple[float, float]:
    cfg = json.loads(config_path.read_text())["pretrained_cfg"]
    return float(cfg["mean"][0]), float(cfg["std"][0])


# --- models -------------------------------------------------------------------------------


def _check_model_name(name: str) -> None:
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(
        f"unknown timm model {name!r}.{hint} (`timm.list_models('*vit*')` lists the ViTs; "
        "a local timm folder is given as local-dir:PATH)"
    )


def _local_dir_config(path: Path) -> tuple[str, dict[str, Any]]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} does not exist; local-dir:PATH expects a timm model folder "
            "(config.json + model.safetensors, as written by timm.models.save_for_hf)."
        )
    config = json.loads(config_file.read_text())
    args = dict(config.get("model_args", {}))
    args.setdefault("num_classes", config.get("num_classes", 1000))
    return config["architecture"], args


def _create_teacher(
    model: str, pretrained: bool, num_classes: int | None
) -> tuple[nn.Module, str, dict[str, Any]]:
    """The teacher in eval mode with its timm name and rebuild arguments."""
    import timm

    from vitrank.compress.structure import inspect_vit

    if model.startswith("local-dir:"):
        path = Path(model.removeprefix("local-dir:")).expanduser()
        model_name, model_args = _local_dir_config(path)
        # a local folder is a checkpoint: its weights are always loaded
        teacher = timm.create_model(f"local-dir:{path}", pretrained=True)
        if num_classes is not None and num_classes != teacher.num_classes:
            raise ValueError(
                f"{model} has {teacher.num_classes} classes but the data has {num_classes}; "
                "the teacher must be trained on the images it is compressed with."
            )
    else:
        _check_model_name(model)
        model_name, model_args = model, {}
        if num_classes is not None and not pretrained:
            model_args["num_classes"] = num_classes
        try:
            teacher = timm.create_model(model_name, pretrained=pretrained, **model_args)
        except (OSError, RuntimeError) as error:
            if not pretrained:
                raise
            # typically no network or no hub weights for this name
            raise RuntimeError(
                f"could not load pretrained weights for {model_name}: {error}. Without a "
                "network, pass a local checkpoint as --model local-dir:PATH."
            ) from error
        model_args.setdefault("num_classes", teacher.num_classes)
        if pretrained and num_classes is not None and num_classes != teacher.num_classes:
            raise ValueError(
                f"{model_name}'s pretrained head has {teacher.num_classes} classes but the "
                f"data has {num_classes}; fine-tune the teacher on these images first and "
                "pass it as --model local-dir:PATH."
            )
    inspect_vit(teacher, model)  # UnsupportedModelError for anything vitrank cannot compress
    return teacher.eval(), model_name, model_args


def _data_config(model: nn.Module) -> dict[str, Any]:
    """timm's eval preprocessing for the model as it was built (size, channels, mean, std)."""
    try:
        from timm.data.model_config import resolve_input_data_config

        config = dict(resolve_input_data_config(model))
    except ImportError:  # older timm: the pretrained config only
        from timm.data import resolve_data_config

        config = dict(resolve_data_config({}, model=model))
    if min(config["input_size"][1:]) < 64:
        config["crop_pct"] = 1.0  # a centre crop would cut most of a tiny image away
    return config


def _transform(config: dict[str, Any]) -> Callable:
    from timm.data import create_transform

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return create_transform(**{k: config[k] for k in keys if k in config})


def _pil_mode(config: dict[str, Any]) -> str:
    channels = config["input_size"][0]
    if channels not in (1, 3):
        raise ValueError(f"`in_chans in (1, 3)` must hold for images, but got {channels=}.")
    return "L" if channels == 1 else "RGB"


# --- images -------------------------------------------------------------------------------


class _PilImages(Dataset):
    """In-memory uint8 arrays shown to a timm transform as PIL images."""

    def __init__(self, arrays: np.ndarray, labels: np.ndarray, transform: Callable, mode: str):
        self.arrays, self.labels, self.transform, self.mode = arrays, labels, transform, mode

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        image = Image.fromarray(self.arrays[index]).convert(self.mode)
        return self.transform(image), int(self.labels[index])


def _image_folder(root: Path, transform: Callable, mode: str) -> ImageFolder:
    from PIL import Image
    from torchvision.datasets import ImageFolder

    def read(path: str) -> Image.Image:
        with Image.open(path) as image:
            return image.convert(mode)

    try:
        return ImageFolder(str(root), transform=transform, loader=read)
    except FileNotFoundError as error:  # no class folders, or no images in them
        raise FileNotFoundError(f"no images found in {root}; expected {_FOLDER_LAYOUT}.") from error


def _probe_classes(data: Path) -> tuple[int, list[str]]:
    """Class folders of an ImageFolder tree, checked before a model is built for them."""
    if not data.is_dir():
        raise FileNotFoundError(f"data folder {data} does not exist; expected {_FOLDER_LAYOUT}.")
    has_train, has_val = (data / "train").is_dir(), (data / "val").is_dir()
    if has_train != has_val:
        raise FileNotFoundError(
            f"{data} has {'train/' if has_train else 'val/'} but not "
            f"{'val/' if has_train else 'train/'}; expected {_FOLDER_LAYOUT}."
        )
    root = data / "train" if has_train else data
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"no class folders in {root}; expected {_FOLDER_LAYOUT}.")
    from torchvision.datasets.folder import IMG_EXTENSIONS

    for name in classes:
        if not any(f.suffix.lower() in IMG_EXTENSIONS for f in (root / name).iterdir()):
            raise FileNotFoundError(
                f"no images ({', '.join(IMG_EXTENSIONS)}) in {root / name}; "
                f"expected {_FOLDER_LAYOUT}."
            )
    return len(classes), classes


def _folder_splits(data: Path, transform: Callable, mode: str) -> tuple[Dataset, Dataset, int]:
    """(train, val, number of classes); the layout was checked by `_probe_classes`."""
    if (data / "train").is_dir():
        train = _image_folder(data / "train", transform, mode)
        val = _image_folder(data / "val", transform, mode)
        if train.classes != val.classes:
            raise ValueError(
                f"{data}/train and {data}/val must have the same class folders, but got "
                f"{train.classes} and {val.classes}."
            )
        return train, val, len(train.classes)
    everything = _image_folder(data, transform, mode)
    train_idx, val_idx = stratified_split(everything.targets)
    if len(val_idx) == 0:
        raise ValueError(
            f"{data} has too few images to split (each class needs at least 2); "
            f"got {len(everything)}."
        )
    return (
        Subset(everything, train_idx.tolist()),
        Subset(everything, val_idx.tolist()),
        len(everything.classes),
    )


# --- the entry point ----------------------------------------------------------------------


def load_workload(
    workload: str | None = DIGITS,
    model: str | None = None,
    data: str | Path | None = None,
    pretrained: bool = False,
    calib_size: int = 256,
    seed: int = 0,
) -> Workload:
    """The teacher and its train / calibration / validation data.

    ``model`` (a timm name or ``local-dir:PATH``) replaces the digits teacher, ``data`` (an
    ImageFolder directory) replaces the digits images; images are always shown to the
    teacher through timm's preprocessing for it. ``pretrained`` loads hub weights for a
    model given by name. ``seed`` picks the calibration subset.
    """
    workload = workload or DIGITS
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; known workloads: {', '.join(WORKLOADS)}.")
    if calib_size < 1:  # checked before any model is built
        raise ValueError(f"`calib_size >= 1` must hold, but got {calib_size=}.")
    if model is None:
        if not (DIGITS_DIR / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"the digits teacher is missing from {DIGITS_DIR}; rebuild it with "
                "`python benchmarks/train_digits_teacher.py`."
            )
        model = f"local-dir:{DIGITS_DIR}"
    data_path = Path(data).expanduser() if data is not None else None

    if data_path is None and model == f"local-dir:{DIGITS_DIR}":
        teacher, model_name, model_args = _create_teacher(model, pretrained, None)
        config = _data_config(teacher)
        # the exact float pixels the teacher was trained on (no uint8 round trip)
        images, labels = digits_tensors(*_digits_normalization(DIGITS_DIR / "config.json"))
        train_idx, val_idx = stratified_split(labels.numpy())
        train: Dataset = TensorDataset(images[train_idx], labels[train_idx])
        val: Dataset = TensorDataset(images[val_idx], labels[val_idx])
        num_classes, name = 10, DIGITS
    elif data_path is None:
        # another teacher on the digits: its own preprocessing (resize, channels)
        teacher, model_name, model_args = _create_teacher(model, pretrained, None)
        config = _data_config(teacher)
        arrays, target = digits_arrays()
        pixels = np.round(arrays[:, 0] * 255).astype(np.uint8)
        dataset = _PilImages(pixels, target, _transform(config), _pil_mode(config))
        train_idx, val_idx = stratified_split(target)
        train, val = Subset(dataset, train_idx.tolist()), Subset(dataset, val_idx.tolist())
        num_classes, name = int(model_args["num_classes"]), f"{model}@digits"
    else:
        # the data's class count decides a randomly initialised head
        probe, _ = _probe_classes(data_path)
        teacher, model_name, model_args = _create_teacher(model, pretrained, probe)
        config = _data_config(teacher)
        train, val, num_classes = _folder_splits(data_path, _transform(config), _pil_mode(config))
        name = f"{model}@{data_path}"

    num_train = len(train)  # type: ignore[arg-type]  # every dataset here is sized
    calib = Subset(train, calibration_indices(num_train, calib_size, seed).tolist())
    return Workload(
        name=name,
        model=teacher,
        model_name=model_name,
        model_args=model_args,
        train=train,
        calib=calib,
        val=val,
        num_classes=num_classes,
        input_size=tuple(config["input_size"]),  # type: ignore[arg-type]
        data_config=config,
    )
