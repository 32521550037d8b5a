"""Build a compressed model from per-block specs: factors and weights in, modules out.

``apply_specs`` copies the teacher, validates every ``BlockSpec`` against the block's
shape, and replaces ``model.blocks`` with ``CompressedBlocks`` whose attention and MLP are
the operators the specs name. Factors come from a ``FactorCache`` (slices, no SVD), so a
block is built in milliseconds; ``structure_only`` builds the same shapes with
uninitialised weights, the skeleton that ``io.load_model`` fills from a saved state.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from vitrank.core.blocks import CompressedBlock, CompressedBlocks
from vitrank.core.operators import BuildContext, of, operator, operator_names
from vitrank.core.spec import BlockSpec
from vitrank.core.structure import BlockShape, Fingerprint, inspect_vit

if TYPE_CHECKING:
    from vitrank.core.factorize import FactorCache
    from vitrank.core.stats import CalibrationStats


def _check(rule: bool, block: str, text: str) -> None:
    if not rule:
        raise ValueError(f"{block}: {text}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_block(spec: BlockSpec, shape: BlockShape) -> None:
    """Raise ValueError naming the block, the rule and the value when ``spec`` cannot be built.

    Ranks may go up to the full rank (which reproduces the layer exactly); the search
    space offers only ranks that save parameters. For ``lowrank`` a rank of 0 keeps that
    Linear dense.
    """
    name = shape.name
    for part, sub in (("attn", spec.attn), ("mlp", spec.mlp)):
        known = operator_names(part)
        _check(
            sub.op in known,
            name,
            f"{'attention' if part == 'attn' else 'mlp'} op must be one of {known}, "
            f"but got op={sub.op!r}.",
        )
        op = operator(part, sub.op)
        why_not = op.unsupported(shape)
        _check(why_not is None, name, str(why_not))
        foreign = [k for k, _ in sub.knobs if k not in op.knobs]
        _check(
            not foreign,
            name,
            f"{part} op {sub.op!r} has knobs {op.knobs}, but got {', '.join(foreign)}.",
        )
        for knob, (low, high) in op.limits(shape).items():
            value = getattr(sub, knob)
            label = f"{part}.{knob}"
            why = " (0 keeps the Linear dense)" if low == 0 else ""
            _check(
                _is_int(value) and low <= value <= high,
                name,
                f"`{low} <= {label} <= {high}`{why} must hold, but got {label}={value!r}.",
            )
    ratio = spec.merge_ratio
    _check(
        isinstance(ratio, (int, float)) and 0.0 <= ratio < 1.0,
        name,
        f"`0 <= merge_ratio < 1` must hold, but got merge_ratio={ratio!r}.",
    )


def needs_factors(spec: BlockSpec) -> bool:
    """Whether building `spec` slices a FactorCache (low-rank and head-level operators)."""
    return of(spec.attn).needs_factors or of(spec.mlp).needs_factors


def validate_specs(specs: Sequence[BlockSpec], shapes: Sequence[BlockShape]) -> None:
    """One spec per block, each buildable (see ``validate_block``)."""
    if len(specs) != len(shapes):
        raise ValueError(
            f"`len(specs) == {len(shapes)}` (blocks in the model) must hold, but got "
            f"len(specs)={len(specs)}."
        )
    for index, (spec, shape) in enumerate(zip(specs, shapes, strict=True)):
        if not isinstance(spec, BlockSpec):
            raise ValueError(
                f"blocks.{index}: a spec must be a BlockSpec, but got {type(spec).__name__}."
            )
        validate_block(spec, shape)


def _replaced_linears(block: Any, spec: BlockSpec) -> list[nn.Module]:
    """The teacher Linears that the spec rebuilds (not worth copying)."""
    return of(spec.attn).replaced(block.attn, spec.attn) + of(spec.mlp).replaced(
        block.mlp, spec.mlp
    )


def apply_specs(
    model: nn.Module,
    specs: Sequence[BlockSpec],
    factors: FactorCache | None,
    stats: CalibrationStats | None = None,
    *,
    structure_only: bool = False,
    fingerprint: Fingerprint | None = None,
) -> nn.Module:
    """A new model whose blocks follow ``specs`` (one per block); ``model`` is untouched.

    ``fingerprint`` may pass ``inspect_vit(model)`` when the caller already has it (a proxy
    building thousands of candidates from one teacher); it is read from the model otherwise.

    ``factors`` (a ``FactorCache`` of ``model``) is needed for ``lowrank`` and ``heads``;
    ``stats`` for ``prune``. With ``structure_only`` neither is read: modules get the
    right shapes and uninitialised weights, for ``load_state_dict`` to fill.
    """
    fingerprint = fingerprint or inspect_vit(model)
    specs = tuple(specs)
    validate_specs(specs, fingerprint.blocks)
    if not structure_only and factors is None:
        needing = [f"blocks.{i}" for i, s in enumerate(specs) if needs_factors(s)]
        if needing:
            raise ValueError(
                f"{needing[0]}: low-rank and head-level operators are slices of a FactorCache, "
                "so `factors` must be given, but got factors=None."
            )
    teacher_blocks: Any = list(model.blocks)  # type: ignore[arg-type]
    # Copy everything except the Linears that get rebuilt: a memo entry makes deepcopy
    # put None in their place instead of copying their weights.
    memo: dict[int, object] = {
        id(layer): None
        for block, spec in zip(teacher_blocks, specs, strict=True)
        for layer in _replaced_linears(block, spec)
    }
    student = copy.deepcopy(model, memo)
    student_blocks: Any = student.blocks
    ctx = BuildContext(factors, stats, structure_only)
    blocks = []
    with torch.no_grad():
        for index, (teacher, block, spec) in enumerate(
            zip(teacher_blocks, student_blocks, specs, strict=True)
        ):
            part = ctx.block(index, merges=spec.merge_ratio > 0)
            attn = of(spec.attn).build(part, teacher.attn, block.attn, spec.attn)
            mlp = of(spec.mlp).build(part, teacher.mlp, block.mlp, spec.mlp)
            blocks.append(
                CompressedBlock(
                    block,
                    attn=attn,
                    mlp=mlp,
                    merge_ratio=spec.merge_ratio,
                    num_prefix_tokens=fingerprint.num_prefix_tokens,
                )
            )
    student.blocks = CompressedBlocks(blocks)
    # New modules start in training mode; the student takes the teacher's mode throughout.
    return student.train(model.training)
