"""Images from an ImageFolder tree (``train/`` and ``val/``, or one folder split
deterministically) or from arrays, shown to the teacher through timm's transforms."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ._base import stratified_split

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder

_FOLDER_LAYOUT = (
    "an ImageFolder tree: DIR/train/<class>/<image> and DIR/val/<class>/<image>, "
    "or DIR/<class>/<image> (split deterministically into train and val)"
)


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
