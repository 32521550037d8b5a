"""`vitrank export`: a saved compressed model as ONNX."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._options import saved_model_dir

HELP = "export a saved compressed model to ONNX"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="DIR", help="a saved compressed model")
    p.add_argument("--onnx", required=True, metavar="FILE", help="the ONNX file to write")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 17)")


def _check_target(target: Path, directory: Path) -> None:
    """Refuse, before any work, an --onnx path that is a folder or a file of the model
    folder being read (it would overwrite the model's own weights or config)."""
    if target.is_dir():
        raise ValueError(
            f"--onnx {target} is a directory; give a file name, e.g. {target / 'model.onnx'}."
        )
    resolved = target.resolve()
    # an earlier export (.onnx) may be written again; the model's own files may not
    own = {p.resolve() for p in Path(directory).iterdir() if p.is_file() and p.suffix != ".onnx"}
    if resolved in own:
        raise ValueError(
            f"--onnx {target} is a file of the model folder {directory} being exported; "
            f"write the ONNX file elsewhere, e.g. {Path(directory) / 'model.onnx'}."
        )
    if not resolved.parent.is_dir():
        raise ValueError(
            f"--onnx {target}: the folder {resolved.parent} does not exist; create it first."
        )


def run(args: argparse.Namespace) -> int:
    from timm.data.model_config import resolve_input_data_config

    from vitrank.core.model import load
    from vitrank.core.onnx import DEFAULT_OPSET, export_onnx

    directory = saved_model_dir(args.model_dir)
    opset = DEFAULT_OPSET if args.opset is None else args.opset
    if opset < 11:
        raise ValueError(f"`--opset >= 11` must hold (token merging sorts), but got {opset}.")
    _check_target(Path(args.onnx), directory)
    model = load(directory).eval()
    input_size = tuple(resolve_input_data_config(model)["input_size"])
    error = export_onnx(model, args.onnx, input_size, opset=opset)
    if error is None:
        print(
            f"wrote {args.onnx} (not checked: install onnxruntime, `pip install 'vitrank[onnx]'`, "
            "to compare it with PyTorch)."
        )
    else:
        print(
            f"wrote {args.onnx}; onnxruntime matches PyTorch (max |logit difference| {error:.2g})."
        )
    return 0
