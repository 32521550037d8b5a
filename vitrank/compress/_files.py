"""Atomic writes and self-describing safetensors files, shared by every on-disk artefact."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Write through ``write(tmp_path)`` and rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_tensors(path: str | Path, tensors: dict[str, Tensor], header: dict[str, Any]) -> Path:
    """One safetensors file whose small JSON header rides in its metadata; atomic."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    metadata = {"vitrank": json.dumps(header)}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_tensors(
    path: str | Path, what: str, expected_format: str
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Read a file written by `save_tensors`; a damaged or foreign file raises ValueError.

    `what` names the artefact in messages ("Calibration file", "Factor file").
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            header = json.loads((handle.metadata() or {}).get("vitrank", "{}"))
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except FileNotFoundError:
        raise
    except Exception as error:  # safetensors raises several types for a bad file
        raise ValueError(f"{what} {path} is damaged or not safetensors: {error}") from error
    if header.get("format") != expected_format:
        raise ValueError(
            f"{what} {path} must have format {expected_format!r}, but got {header.get('format')!r}."
        )
    return header, tensors
