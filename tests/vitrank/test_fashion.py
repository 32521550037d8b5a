"""The fashion-vit workload: Fashion-MNIST's idx files and the shipped teacher."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from vitrank.workloads import FASHION_DATA_DIR, FASHION_DIR, fashion_arrays, load_workload

HAVE_DATA = (FASHION_DATA_DIR / "t10k-labels-idx1-ubyte.gz").is_file()
NO_DATA = "Fashion-MNIST is not installed: `apt-get install dataset-fashion-mnist`"
HAVE_TEACHER = (FASHION_DIR / "model.safetensors").is_file()
NO_TEACHER = "the fashion-vit teacher is not built: `python benchmarks/train_fashion_teacher.py`"


def _idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def _fake_fashion(folder: Path, compress: bool = True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 20),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (7, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 7),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        _idx(folder / (f"{stem}.gz" if compress else stem), array, compress)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_idx_files_are_read_exactly(tmp_path: Path, compress: bool) -> None:
    arrays = _fake_fashion(tmp_path, compress)
    x_train, y_train, x_test, y_test = fashion_arrays(tmp_path)
    assert np.array_equal(x_train, arrays["train-images-idx3-ubyte"])
    assert np.array_equal(y_train, arrays["train-labels-idx1-ubyte"])
    assert np.array_equal(x_test, arrays["t10k-images-idx3-ubyte"])
    assert np.array_equal(y_test, arrays["t10k-labels-idx1-ubyte"])


def test_missing_files_name_the_package_and_the_option(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*--data"):
        fashion_arrays(tmp_path)


def test_a_damaged_file_is_named(tmp_path: Path) -> None:
    _fake_fashion(tmp_path, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte is damaged"):
        fashion_arrays(tmp_path)


@pytest.mark.skipif(not HAVE_DATA, reason=NO_DATA)
@pytest.mark.skipif(not HAVE_TEACHER, reason=NO_TEACHER)
def test_the_shipped_teacher_reaches_088_on_the_10000_test_images() -> None:
    from vitrank.evaluators import evaluate_accuracy

    workload = load_workload("fashion-vit")
    assert (len(workload.train), len(workload.val)) == (60_000, 10_000)
    assert len(workload.calib) == 256
    params = sum(p.numel() for p in workload.model.parameters())
    assert params >= 300_000 and len(workload.model.blocks) >= 4
    assert workload.model.patch_embed.num_patches == 49  # 28 px, 4-px patches: 49 + cls
    assert evaluate_accuracy(workload.model, workload.val, progress=False) >= 0.88
