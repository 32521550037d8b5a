"""Fashion-MNIST (Zalando; 60,000 train and 10,000 test 28x28 images, 10 classes) from the
idx files of Debian's ``dataset-fashion-mnist``, and a timm ViT trained on them by
``benchmarks/train_fashion_teacher.py``, shipped in ``workloads/assets/fashion_vit``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

FASHION = "fashion-vit"
FASHION_DIR = Path(__file__).resolve().parent / "assets" / "fashion_vit"
# Debian's `dataset-fashion-mnist` puts the four idx files (gzipped) here.
FASHION_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
# The Fashion-MNIST teacher: timm's ViT at 28x28 pixels with 4x4 patches (49 patch tokens +
# cls, like DeiT's 196 + cls at a quarter of the sequence), head_dim 24.
FASHION_MODEL_NAME = "vit_small_patch16_224"
FASHION_MODEL_ARGS: dict[str, Any] = {
    "img_size": 28,
    "patch_size": 4,
    "in_chans": 1,
    "num_classes": 10,
    "embed_dim": 96,
    "depth": 4,
    "num_heads": 4,
    "mlp_ratio": 4.0,
}
FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def _read_idx(path: Path) -> np.ndarray:
    """One idx file (gzipped or not) as a uint8 array of the shape its header gives."""
    import gzip

    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (bad header).")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(shape)):
        raise ValueError(
            f"{path} is damaged: its header promises {shape} but it holds "
            f"{len(raw) - header} bytes of data; reinstall dataset-fashion-mnist."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_file(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"Fashion-MNIST's {stem}(.gz) is not in {directory}. Install it with "
        "`apt-get install dataset-fashion-mnist` (it goes to /usr/share/datasets/fashion-mnist), "
        "or give the folder holding the four idx files as --data DIR with --workload "
        "fashion-vit (or set VITRANK_FASHION_DIR)."
    )


def fashion_arrays(
    directory: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fashion-MNIST as uint8 (train images N x 28 x 28, train labels, test images, labels)."""
    root = Path(directory or os.environ.get("VITRANK_FASHION_DIR") or FASHION_DATA_DIR)
    root = root.expanduser()
    out = []
    for split in ("train", "t10k"):
        images = _read_idx(_idx_file(root, f"{split}-images-idx3-ubyte"))
        labels = _read_idx(_idx_file(root, f"{split}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{root}: {split} images {images.shape} and labels {labels.shape} do not pair up."
            )
        out += [images, labels.astype(np.int64)]
    return out[0], out[1], out[2], out[3]


def fashion_tensors(
    mean: float, std: float, directory: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalized float (train images N x 1 x 28 x 28, train labels, test images, labels)."""
    x_train, y_train, x_test, y_test = fashion_arrays(directory)

    def norm(x: np.ndarray) -> torch.Tensor:
        return ((torch.from_numpy(x.astype(np.float32)) / 255.0 - mean) / std)[:, None]

    return norm(x_train), torch.from_numpy(y_train), norm(x_test), torch.from_numpy(y_test)
