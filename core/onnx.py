"""ONNX export of a compressed model, checked against PyTorch with onnxruntime."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_OPSET = 17


class OnnxMismatchError(RuntimeError):
    """The exported graph's logits differ from PyTorch's beyond float tolerance."""


def _stable_sort_symbolics() -> dict[str, Any]:
    from torch.onnx import symbolic_helper

    def sort(g: Any, values: Any, *rest: Any) -> Any:
        # Token merging's stable sort (aten::sort.stable / argsort.stable, which the
        # TorchScript exporter refuses) as ONNX TopK, whose ties keep index order: stable.
        dim = symbolic_helper._maybe_get_const(rest[-2], "i")
        descending = symbolic_helper._maybe_get_const(rest[-1], "b")
        return symbolic_helper._sort_helper(g, values, dim, descending=descending)

    def argsort(g: Any, values: Any, *rest: Any) -> Any:
        return sort(g, values, *rest)[1]

    return {"aten::sort": sort, "aten::argsort": argsort}


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_size: tuple[int, ...],
    *,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
) -> float | None:
    """Write ``model`` (batch-dynamic ``images`` -> ``logits``) to ``path``.

    With ``check`` and onnxruntime installed, runs both on random images and returns the
    max |logit difference| (raising `OnnxMismatchError` beyond 1e-4 relative); None when
    not checked.
    """
    if opset < 11:
        raise ValueError(f"`opset >= 11` must hold (token merging sorts), but got {opset=}.")
    path = Path(path)
    model = model.eval()
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, *input_size, generator=generator)
    path.parent.mkdir(parents=True, exist_ok=True)
    symbolics = _stable_sort_symbolics()
    try:
        for name, function in symbolics.items():
            torch.onnx.register_custom_op_symbolic(name, function, opset)
        with warnings.catch_warnings():
            # The tracer warns about every Python branch on shapes; the check below is the test.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,  # the TorchScript exporter needs no onnxscript
                opset_version=opset,
                input_names=["images"],
                output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            )
    finally:
        for name in symbolics:
            torch.onnx.unregister_custom_op_symbolic(name, opset)
    if not check:
        return None
    try:
        import onnxruntime
    except ImportError:
        return None
    images = torch.randn(3, *input_size, generator=generator)
    with torch.inference_mode():
        expected = model(images).numpy()
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # shape-inference warnings of traced reshapes are noise
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": images.numpy()})[0]
    error = float(abs(got - expected).max())
    tolerance = 1e-4 * max(1.0, float(abs(expected).max()))
    if not error <= tolerance:
        raise OnnxMismatchError(
            f"{path} disagrees with PyTorch: max |logit difference| {error:.3g} > "
            f"{tolerance:.3g}; please report it with the model directory."
        )
    return error
