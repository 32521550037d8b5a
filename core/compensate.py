"""Error compensation (Azizi, Nazemi, Pedram 2024): a few gradient steps on the factors.

The closed-form factors minimise each layer's output error on its own; compensation
then refines, block by block, the parameters of the factorized modules of a student
against the teacher: the student block sees the student's own inputs (so earlier
blocks' errors are compensated too) and is fitted to the teacher's hidden state after
the same block. Adam, full batch over the calibration images, starting from the closed
form; the best parameters seen are kept, so the error on the calibration data never
ends above where it started.

The two-term form Ŵ = W_a + W_b is one `LowRankLinear` whose rank is the sum of both
terms' ranks (`lowrank.add_residual_term`): fitted in closed form on the calibration
activations, the residual term W_b of a whitened W_a is the next whitened singular
components (Eckart-Young on W S), so the stacked factors are the closed-form start and
compensation moves both terms jointly.

Token merging in the student (fewer tokens than the teacher after a block) is handled
through the source map: the target of a merged token is the mean of the teacher's tokens
that went into it.

fp16 and bf16 students are compensated on fp32 master copies: Adam's moments overflow
and its steps round away in half precision (one step turns an fp16 error into NaN). The
block is copied to fp32, fed the student's own (half-precision) inputs cast up, fitted
to the teacher's tokens cast up; the best parameters are rounded back to the model's
dtype, and every reported error is the fp32 error of parameters the model can hold.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from vitrank.core.lowrank import LowRankLinear


@dataclass(frozen=True)
class BlockCompensation:
    block: int
    parameters: int  # number of scalars optimised
    error_before: float  # mean squared error vs the teacher's hidden state, calibration data
    error_after: float


def is_factorized(module: nn.Module) -> bool:
    """Modules whose parameters compensation may change: low-rank pairs, head factors."""
    if isinstance(module, LowRankLinear) or getattr(module, "is_factorized", False):
        return True
    from vitrank.core import attention

    return isinstance(module, attention.HeadFactorizedAttention)


def factorized_parameters(block: nn.Module) -> list[nn.Parameter]:
    """Parameters of the factorized modules inside `block` (each once)."""
    seen: dict[int, nn.Parameter] = {}
    for module in block.modules():
        if is_factorized(module):
            for param in module.parameters():
                seen.setdefault(id(param), param)
    return list(seen.values())


class _Stop(Exception):
    def __init__(self, value: Tensor) -> None:
        self.value = value


def _block_input(model: nn.Module, images: Tensor) -> Tensor:
    """Tokens entering `model.blocks` (after embeddings, prefix tokens, norm_pre)."""

    def hook(module: nn.Module, args: tuple) -> None:
        raise _Stop(args[0])

    blocks: Any = model.blocks
    handle = blocks.register_forward_pre_hook(hook)
    try:
        model(images)
    except _Stop as stop:
        return stop.value
    finally:
        handle.remove()
    raise RuntimeError("model.blocks was never called by the model's forward.")


def _is_compressed(blocks: nn.Module) -> bool:
    return hasattr(blocks, "forward_tokens")


def _run_block(block: nn.Module, state: tuple, compressed: bool) -> tuple:
    if compressed:
        return block(*state)
    return (block(state[0]),)


def _target(teacher_x: Tensor, student_state: tuple) -> Tensor:
    """Teacher tokens pooled onto the student's (possibly merged) tokens."""
    x = student_state[0]
    if x.shape[1] == teacher_x.shape[1]:
        return teacher_x
    source = student_state[2]
    index = source[..., None].expand(-1, -1, teacher_x.shape[-1])
    pooled = teacher_x.new_zeros(x.shape[0], x.shape[1], teacher_x.shape[-1])
    return pooled.scatter_reduce(1, index, teacher_x, reduce="mean", include_self=False)


def _chunks(images: Tensor | Dataset | DataLoader | Iterable, batch_size: int) -> list[Tensor]:
    if isinstance(images, Tensor):
        return list(images.split(batch_size))
    if isinstance(images, Dataset):
        images = DataLoader(images, batch_size=batch_size, shuffle=False)
    return [b[0] if isinstance(b, list | tuple) else b for b in images]


def _error(
    block: nn.Module, states: list[tuple], targets: list[Tensor], compressed: bool, grad: bool
) -> float:
    """Mean squared error over all calibration tokens; with `grad`, its gradient too.

    Merged tokens are weighted by their size, so the normaliser is the teacher's count.

    Chunk by chunk, so only one chunk's activations are alive at a time.
    """
    count = sum(t.numel() for t in targets)
    total = 0.0
    for state, target in zip(states, targets, strict=True):
        with torch.set_grad_enabled(grad):
            out = _run_block(block, state, compressed)
            squared = (out[0] - _target(target, out)).square()
            if len(out) > 1 and out[1] is not None:  # a merged token stands for `size` tokens
                squared = squared * out[1].unsqueeze(-1)
            loss = squared.sum() / count
        if grad:
            loss.backward()
        total += float(loss.detach())
    return total


_HALF = (torch.float16, torch.bfloat16)


def _to_float(state: tuple) -> tuple:
    """The floating tensors of a block's state in fp32 (token sizes, not source indices)."""
    return tuple(t.float() if isinstance(t, Tensor) and t.is_floating_point() else t for t in state)


def compensate_block(
    block: nn.Module,
    states: list[tuple],
    targets: list[Tensor],
    compressed: bool,
    steps: int,
    lr: float,
    name: str = "block",
) -> tuple[float, float, int]:
    """Adam on `block`'s factorized parameters; keeps the best. -> (before, after, count).

    A half-precision block is fitted on an fp32 copy (see the module docstring). The best
    parameters are the ones with the lowest finite error; if the error stops being finite
    the steps stop there with a warning, and if rounding the best back to the model's dtype
    costs more than the steps gained, the start is kept.
    """
    params = factorized_parameters(block)
    half = any(p.dtype in _HALF for p in block.parameters())
    work = copy.deepcopy(block).float() if half else block
    if half:
        states = [_to_float(s) for s in states]
        targets = [t.float() for t in targets]
    if not params or steps <= 0:
        error = _error(work, states, targets, compressed, grad=False)
        return error, error, 0
    masters = factorized_parameters(work)  # `params` themselves unless `half`
    frozen = [(p, p.requires_grad) for p in work.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    for p in masters:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(masters, lr=lr)
    start: list[Tensor] = [p.detach().clone() for p in masters]
    best, best_error, before = start, float("inf"), float("nan")
    try:
        for step in range(steps + 1):
            optimizer.zero_grad(set_to_none=True)
            last = step == steps
            error = _error(work, states, targets, compressed, grad=not last)
            if step == 0:
                before = error
                if not math.isfinite(before):
                    raise ValueError(
                        f"{name}: the output error must be finite before compensation, but got "
                        f"{before} (NaN/Inf in the student's factors or inputs)."
                    )
            if not math.isfinite(error):
                warnings.warn(
                    f"{name}: the compensation error became {error} after {step} steps; "
                    f"keeping the best parameters seen (error {best_error:.6g}).",
                    RuntimeWarning,
                    stacklevel=2,
                )
                break
            if error < best_error:  # the error of the parameters *before* this step
                best_error = error
                best = start if step == 0 else [p.detach().clone() for p in masters]
            if last:
                break
            optimizer.step()
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    with torch.no_grad():
        for p, value in zip(params, best, strict=True):
            p.copy_(value)  # rounds to the model's dtype where `half`
        if half and best is not start:
            for p, q in zip(masters, params, strict=True):
                p.copy_(q)  # the error of what the model now holds
            best_error = _error(work, states, targets, compressed, grad=False)
            if not best_error <= before:
                for p, value in zip(params, start, strict=True):
                    p.copy_(value)
                best_error = before
    return before, best_error, sum(p.numel() for p in params)


# Gradient steps per block when error compensation runs (API, search winners, CLI alike).
COMPENSATION_STEPS = 50


def compensate(
    student: Any,
    teacher: Any,
    images: Tensor | Dataset | DataLoader,
    steps: int = COMPENSATION_STEPS,
    lr: float = 1e-4,
    batch_size: int = 64,
) -> list[BlockCompensation]:
    """Refine `student`'s factorized parameters in place, block by block, against `teacher`.

    `images`: a tensor of calibration images, or a Dataset / DataLoader of (image, label).
    Returns one record per block with the block's error before and after.
    """
    if len(student.blocks) != len(teacher.blocks):
        raise ValueError(
            f"`student` and `teacher` must have as many blocks, but got "
            f"{len(student.blocks)} != {len(teacher.blocks)}."
        )
    device = next(student.parameters()).device
    dtype = next(student.parameters()).dtype
    chunks = [c.to(device=device, dtype=dtype) for c in _chunks(images, batch_size)]
    if not chunks:
        raise ValueError("Compensation needs calibration images, but got none.")
    compressed = _is_compressed(student.blocks)
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    records = []
    try:
        with torch.no_grad():
            teacher_x = [_block_input(teacher, c) for c in chunks]
            states: list[tuple] = []
            for c in chunks:
                x = _block_input(student, c)
                if compressed:
                    from vitrank.core.merge import identity_source

                    states.append((x, None, identity_source(x.shape[0], x.shape[1], x.device)))
                else:
                    states.append((x,))
        for i, (block, teacher_block) in enumerate(
            zip(student.blocks, teacher.blocks, strict=True)
        ):
            with torch.no_grad():
                teacher_x = [teacher_block(x) for x in teacher_x]
            before, after, count = compensate_block(
                block, states, teacher_x, compressed, steps, lr, name=f"blocks.{i}"
            )
            records.append(BlockCompensation(i, count, before, after))
            with torch.no_grad():
                states = [_run_block(block, s, compressed) for s in states]
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    return records
