"""Atomic writes and self-describing safetensors files, shared by every on-disk artefact."""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor


def _new_temp_file(directory: Path, name: str) -> tuple[str, int]:
    """A new empty file beside `name` and its mode, the one ``open(path, "w")`` would give.

    Not `tempfile.mkstemp`: its files are 0600, and the rename would carry that mode onto
    the artefact. Created with 0666, the file gets the umask from the kernel, as any new
    file does, and the process-wide umask is never read or changed.
    """
    while True:
        tmp = directory / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            return str(tmp), stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Write through ``write(tmp_path)`` and rename, so a reader never sees half a file.

    The file gets the mode of a new file under the umask, even when `write` puts a file of
    its own in the temporary's place (safetensors writes 0600 files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = _new_temp_file(path.parent, path.name)
    try:
        write(tmp)
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if _disk_full(error):
            raise WriteError(
                errno.ENOSPC,
                f"no space left on the device to write {path} (the file was left as it was); "
                "free space there, or write elsewhere (--out), and run again.",
            ) from error
        raise
    return path


class WriteError(OSError):
    """A file vitrank must write cannot be: no space, or a folder it may not write to.

    The user fixes it (frees space, picks another --out); `str()` is the whole message.
    """

    def __str__(self) -> str:
        return str(self.strerror)


def _disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    # safetensors (Rust) reports the OS error inside its own exception's text
    text = str(error)
    return "No space left on device" in text or "StorageFull" in text


def check_writable(directory: str | Path) -> Path:
    """Raise `WriteError` naming `directory` unless files can be written there.

    Called before long work whose result goes there, so a read-only folder is refused at
    the start, not after the work. An existing folder is tried with a file created and
    removed at once; for a new one, the nearest existing parent must be writable (nothing
    is created).
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise WriteError(
            errno.ENOTDIR, f"{directory} is a file, not a folder; choose another --out."
        )
    try:
        if directory.is_dir():
            tmp, _ = _new_temp_file(directory, "check")
            os.unlink(tmp)
        else:
            parent = next(p for p in directory.absolute().parents if p.exists())
            if not os.access(parent, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, f"{parent} is not writable")
    except OSError as error:
        raise WriteError(
            error.errno or errno.EACCES,
            f"cannot write into {directory} ({error.strerror or error}); choose a folder you "
            "can write to (--out), or change its permissions.",
        ) from error
    return directory


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """`data` as `path`: a reader (or a run killed half-way) sees the old file or the new one."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def strict_json(data: Any) -> Any:
    """`data` as strict JSON can hold it: NaN and ±Inf become null (a bare ``NaN`` is not
    JSON, and strict parsers refuse the file), numpy / torch scalars become numbers."""
    if isinstance(data, dict):
        return {str(k): strict_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(v) for v in data]
    if isinstance(data, bool) or data is None or isinstance(data, (str, int)):
        return data
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    item = getattr(data, "item", None)  # numpy / torch scalars
    if callable(item) and getattr(data, "ndim", 0) == 0:
        return strict_json(item())
    return str(data)


def json_text(data: Any) -> str:
    """The text of every JSON file vitrank writes: strict JSON, indented, one final newline."""
    return json.dumps(strict_json(data), indent=2, allow_nan=False) + "\n"


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json_text(data))


def save_tensors(path: str | Path, tensors: dict[str, Tensor], header: dict[str, Any]) -> Path:
    """One safetensors file whose small JSON header rides in its metadata; atomic."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
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
