"""Images from an ImageFolder tree (``train/`` and ``val/``, or one folder split
deterministically) or from arrays, shown to the teacher through timm's transforms."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
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

    def read(path: str) -> Image.Image:
        try:
            with Image.open(path) as image:
                return image.convert(mode)
        except _IMAGE_ERRORS as error:
            raise ValueError(_damaged(path, error)) from error

    try:
        folder = _image_tree()(str(root), transform=transform, loader=read)
    except FileNotFoundError as error:  # no class folders, or no images in them
        raise FileNotFoundError(f"no images found in {root}; expected {_FOLDER_LAYOUT}.") from error
    check_images([path for path, _ in folder.samples])
    return folder


# What PIL raises for a file that is not a (whole) image.
# DecompressionBombError: an image too large to decode safely (PIL refuses it)
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# Images opened with a progress line, not silently.
CHECK_PROGRESS_FROM = 2000


def _damaged(path: str, error: BaseException) -> str:
    return f"image {path} is damaged or not an image ({error}); replace or delete it."


def check_images(paths: list[str]) -> None:
    """Open every image once, so that a damaged file is refused now, not after a search.

    `verify()` reads a PNG whole (its checksums) but only a JPEG's header: a JPEG without
    its end marker (a truncated download) is decoded in full to be sure.
    """
    from PIL import Image
    from vitrank.core.progress import progress

    enabled = len(paths) >= CHECK_PROGRESS_FROM
    with progress("checking images", len(paths), enabled) as advance:
        for path in paths:
            try:
                with Image.open(path) as image:
                    jpeg = image.format == "JPEG"
                    image.verify()
                if jpeg and not _ends_like_a_jpeg(path):
                    with Image.open(path) as image:
                        image.load()
            except _IMAGE_ERRORS as error:
                raise ValueError(_damaged(path, error)) from error
            advance()


def _ends_like_a_jpeg(path: str) -> bool:
    with open(path, "rb") as handle:
        handle.seek(0, 2)
        handle.seek(max(0, handle.tell() - 2))
        return handle.read() == b"\xff\xd9"


@functools.cache
def _image_tree() -> type:
    from torchvision.datasets import ImageFolder

    class ImageTree(ImageFolder):
        """torchvision's ImageFolder, walking its class folders with `image_files`."""

        @staticmethod
        def make_dataset(  # type: ignore[override]
            directory: str,
            class_to_idx: dict[str, int],
            extensions: tuple[str, ...] | None = None,
            is_valid_file: Callable[[str], bool] | None = None,
            allow_empty: bool = False,
        ) -> list[tuple[str, int]]:
            samples = []
            for name in sorted(class_to_idx):
                files = image_files(Path(directory) / name, Path(directory), extensions or ())
                if not files and not allow_empty:
                    raise FileNotFoundError(f"no images in {Path(directory) / name}")
                samples += [(path, class_to_idx[name]) for path in files]
            return samples

    return ImageTree


def image_files(top: Path, tree: Path, extensions: tuple[str, ...]) -> list[str]:
    """The images under `top`, in torchvision's order, following no link back into `tree`.

    torchvision walks with `followlinks=True`: a link to a parent folder repeats the same
    images until the paths grow too long. Here a link that leaves the tree is followed
    (datasets shared by links), one back into it is skipped with a warning, and no folder
    is read twice.
    """
    import warnings

    inside = str(tree.resolve())
    files: list[str] = []
    visited: set[str] = set()
    stack = [str(top)]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in visited:
            continue
        visited.add(real)
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir():
                    target = os.path.realpath(entry.path)
                    if entry.is_symlink() and (target + os.sep).startswith(inside + os.sep):
                        warnings.warn(
                            f"{entry.path} links back into {tree}; not followed (it would "
                            "repeat images).",
                            stacklevel=2,
                        )
                        continue
                    stack.append(entry.path)
                elif entry.name.lower().endswith(extensions):
                    files.append(entry.path)
    # sorted(os.walk(...)) then sorted file names: by folder, then name
    return sorted(files, key=lambda path: (os.path.dirname(path), os.path.basename(path)))


def _probe_classes(data: Path) -> tuple[int, list[str]]:
    """Class folders of an ImageFolder tree, checked before a model is built for them."""
    if data.exists() and not data.is_dir():
        raise FileNotFoundError(
            f"--data {data} is a file, not a folder; expected {_FOLDER_LAYOUT}."
        )
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
