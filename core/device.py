"""One device and one floating dtype for the whole pipeline, named as users write them."""

from __future__ import annotations

import re

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_name(name: str | torch.device | None) -> str:
    """The device name, normalised, if it is one `resolve_device` reads; it need not be
    here (settings saved on a GPU machine are read elsewhere too)."""
    if isinstance(name, torch.device):
        name = str(name)
    name = ("auto" if name is None else name).strip().lower()  # "" is not "auto"
    if not _DEVICE.match(name):
        raise ValueError(
            f"unknown device {name!r}; use auto, cpu, cuda or cuda:N (auto picks the first "
            "CUDA GPU when there is one)."
        )
    return name


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (the first CUDA GPU when there is one, else the CPU), ``cpu``, ``cuda`` or
    ``cuda:N``; a device that is not there is refused with what there is."""
    name = check_device_name(name)
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(name.split(":")[1]) if ":" in name else 0
    if count == 0:
        raise ValueError(
            f"device {name!r} asks for a CUDA GPU, but torch sees none on this machine; use "
            "--device cpu (or auto)."
        )
    if index >= count:
        raise ValueError(
            f"device {name!r} does not exist: torch sees {count} CUDA GPU(s), cuda:0 to "
            f"cuda:{count - 1}."
        )
    return torch.device(f"cuda:{index}")


AUTO_DTYPE = "auto"  # bfloat16 on a CUDA GPU that has it, else float32


def resolve_dtype(name: str | torch.dtype, device: torch.device | str | None = None) -> torch.dtype:
    """``float32``, ``bfloat16`` or ``float16`` (the forward passes' dtype); ``auto`` is
    bfloat16 on a CUDA `device` that supports it (its tensor cores run it at full rate and
    its range is fp32's) and float32 elsewhere (a CPU runs bfloat16 slower than float32)."""
    if isinstance(name, torch.dtype):
        if name in DTYPES.values():
            return name
        name = str(name).removeprefix("torch.")
    if name == AUTO_DTYPE:
        device = torch.device("cpu" if device is None else device)
        if device.type == "cuda" and torch.cuda.is_available():
            with torch.cuda.device(device):
                if torch.cuda.is_bf16_supported():
                    return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join([AUTO_DTYPE, *DTYPES])}.")
    return DTYPES[name]
