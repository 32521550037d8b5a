"""What every benchmark script shares: the machine it ran on and how results are written."""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

RESULTS = Path(__file__).resolve().parent / "results"

T = TypeVar("T")


def comma_list(text: str, convert: Callable[[str], T]) -> list[T]:
    """The stripped, non-empty parts of a comma-separated option, each converted."""
    return [convert(part.strip()) for part in text.split(",") if part.strip()]


def _timm_version() -> str:
    import timm

    return timm.__version__


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """CPU model, cores, torch version, device and date, recorded next to every figure."""
    from vitrank.core.timing import machine_info as describe

    device = "cuda" if torch.cuda.is_available() else "cpu"
    machine = describe(device)
    return {
        "cpu": machine["processor"],
        "cores": machine["cpu_count"],
        "torch_threads": threads if threads is not None else torch.get_num_threads(),
        "torch": machine["torch"],
        "timm": _timm_version(),
        "python": machine["python"],
        "device": machine.get("gpu", "cpu"),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        # OpenMP's wait policy changes CPU timings several-fold when the cores are shared.
        "omp": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")},
    }


def command_line() -> str:
    """The command that is running, as a reader would retype it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    root = RESULTS.parent.parent
    if script.is_relative_to(root):
        script = script.relative_to(root)
    return " ".join(["python", str(script), *sys.argv[1:]])


def write_result(name: str, data: dict[str, Any], out_dir: Path | None = None) -> Path:
    """Write `results/<name>.json` atomically and return its path."""
    data.setdefault("command", command_line())
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path
