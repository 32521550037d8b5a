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

from vitrank.compress.attention import (
    DenseAttention,
    HeadFactorizedAttention,
    LowRankAttention,
)
from vitrank.compress.blocks import CompressedBlock, CompressedBlocks
from vitrank.compress.lowrank import LowRankLinear, empty_linear, linear_from
from vitrank.compress.spec import ATTENTION_OPS, MLP_OPS, AttentionSpec, BlockSpec, MlpSpec
from vitrank.compress.structure import BlockShape, Fingerprint, inspect_vit

if TYPE_CHECKING:
    from vitrank.compress.factorize import FactorCache
    from vitrank.compress.stats import CalibrationStats


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
    attn, mlp = spec.attn, spec.mlp
    _check(
        attn.op in ATTENTION_OPS,
        name,
        f"attention op must be one of {ATTENTION_OPS}, but got op={attn.op!r}.",
    )
    _check(mlp.op in MLP_OPS, name, f"mlp op must be one of {MLP_OPS}, but got op={mlp.op!r}.")
    d, inner, dh, heads, hidden = (
        shape.dim,
        shape.attn_inner,
        shape.head_dim,
        shape.num_heads,
        shape.mlp_hidden,
    )
    limits: list[tuple[str, int, int, int]] = []  # (field, value, low, high)
    if attn.op == "lowrank":
        limits += [
            ("attn.qkv_rank", attn.qkv_rank, 0, min(d, 3 * inner)),
            ("attn.proj_rank", attn.proj_rank, 0, min(inner, d)),
        ]
    elif attn.op == "heads":
        _check(
            not shape.qk_norm,
            name,
            "head-level factorization needs plain q·k logits, but this block normalizes q "
            "and k (qk_norm=True); use attention op 'lowrank' or 'prune'.",
        )
        limits += [("attn.qk_rank", attn.qk_rank, 1, dh), ("attn.vo_rank", attn.vo_rank, 1, dh)]
    elif attn.op == "prune":
        limits.append(("attn.heads_kept", attn.heads_kept, 1, heads))
    if mlp.op == "lowrank":
        limits += [
            ("mlp.fc1_rank", mlp.fc1_rank, 0, min(d, hidden)),
            ("mlp.fc2_rank", mlp.fc2_rank, 0, min(d, hidden)),
        ]
    elif mlp.op == "prune":
        limits.append(("mlp.hidden_kept", mlp.hidden_kept, 1, hidden))
    for label, value, low, high in limits:
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
    attn, mlp = block.attn, block.mlp
    out: list[nn.Module] = []
    if spec.attn.op in ("heads", "prune"):
        out += [attn.qkv, attn.proj]
    elif spec.attn.op == "lowrank":
        out += [
            m for m, r in ((attn.qkv, spec.attn.qkv_rank), (attn.proj, spec.attn.proj_rank)) if r
        ]
    if spec.mlp.op == "prune":
        out += [mlp.fc1, mlp.fc2]
    elif spec.mlp.op == "lowrank":
        out += [m for m, r in ((mlp.fc1, spec.mlp.fc1_rank), (mlp.fc2, spec.mlp.fc2_rank)) if r]
    return out


class _Builder:
    """Builds one block's modules; ``factors``/``stats`` None under ``structure_only``."""

    def __init__(
        self,
        factors: FactorCache | None,
        stats: CalibrationStats | None,
        structure_only: bool,
    ) -> None:
        self.factors = factors
        self.stats = stats
        self.structure_only = structure_only

    def low_rank(self, key: str, teacher: nn.Linear, rank: int) -> LowRankLinear:
        kw: dict[str, Any] = {"dtype": teacher.weight.dtype, "device": teacher.weight.device}
        if self.structure_only:
            return LowRankLinear(
                teacher.in_features, teacher.out_features, rank, teacher.bias is not None, **kw
            )
        assert self.factors is not None
        down, up, bias = self.factors.linear(key, rank)
        return LowRankLinear.from_factors(down, up, bias, **kw)

    def attention(self, index: int, teacher: Any, copied: Any, spec: AttentionSpec) -> nn.Module:
        drops = (teacher.attn_drop.p, teacher.proj_drop.p)
        kw: dict[str, Any] = {
            "dtype": teacher.qkv.weight.dtype,
            "device": teacher.qkv.weight.device,
        }
        if spec.op == "dense":
            return DenseAttention.from_timm(copied)
        if spec.op == "lowrank":
            qkv, proj = copied.qkv, copied.proj
            if spec.qkv_rank:
                qkv = self.low_rank(f"blocks.{index}.attn.qkv", teacher.qkv, spec.qkv_rank)
            if spec.proj_rank:
                proj = self.low_rank(f"blocks.{index}.attn.proj", teacher.proj, spec.proj_rank)
            return LowRankAttention(
                qkv, proj, teacher.num_heads, teacher.head_dim, teacher.scale,
                copied.q_norm, copied.k_norm, *drops,
            )  # fmt: skip
        if spec.op == "heads":
            if self.structure_only:
                dim = teacher.qkv.in_features
                module = HeadFactorizedAttention.empty(
                    dim, teacher.num_heads, spec.qk_rank, spec.vo_rank, teacher.scale, **kw
                )
                module.attn_drop, module.proj_drop.p = drops
                return module
            assert self.factors is not None
            P, Q = self.factors.qk(index, spec.qk_rank)
            V, out_factor, out_bias = self.factors.vo(index, spec.vo_rank)
            return HeadFactorizedAttention.from_factors(
                P.to(**kw),
                Q.to(**kw),
                V.to(**kw),
                out_factor.to(**kw),
                None if out_bias is None else out_bias.to(**kw),
                teacher.scale,
                *drops,
            )
        # prune: whole heads removed; the kept heads keep the teacher's scale and qk-norms.
        kept, dh = spec.heads_kept, teacher.head_dim
        if self.structure_only:
            dim = teacher.qkv.in_features
            qkv = empty_linear(dim, 3 * kept * dh, teacher.qkv.bias is not None, **kw)
            proj = empty_linear(kept * dh, dim, teacher.proj.bias is not None, **kw)
            return DenseAttention(
                qkv, proj, kept, dh, teacher.scale, copied.q_norm, copied.k_norm, *drops
            )
        from vitrank.compress.prune import prune_heads

        stats = self._require_stats(index)
        pruned = prune_heads(
            teacher.qkv.weight,
            teacher.qkv.bias,
            teacher.proj.weight,
            teacher.proj.bias,
            stats.head_abs_mean[index],
            stats.mean(f"blocks.{index}.attn.proj"),
            teacher.num_heads,
            dh,
            kept,
        )
        return DenseAttention.from_weights(
            pruned.qkv_weight,
            pruned.qkv_bias,
            pruned.proj_weight,
            pruned.proj_bias,
            kept, dh, teacher.scale, copied.q_norm, copied.k_norm, *drops,
        )  # fmt: skip

    def mlp(self, index: int, teacher: Any, copied: Any, spec: MlpSpec) -> nn.Module:
        fc1, fc2 = teacher.fc1, teacher.fc2
        if spec.op == "lowrank":
            if spec.fc1_rank:
                copied.fc1 = self.low_rank(f"blocks.{index}.mlp.fc1", fc1, spec.fc1_rank)
            if spec.fc2_rank:
                copied.fc2 = self.low_rank(f"blocks.{index}.mlp.fc2", fc2, spec.fc2_rank)
        elif spec.op == "prune":
            kept = spec.hidden_kept
            if self.structure_only:
                kw: dict[str, Any] = {"dtype": fc1.weight.dtype, "device": fc1.weight.device}
                copied.fc1 = empty_linear(fc1.in_features, kept, fc1.bias is not None, **kw)
                copied.fc2 = empty_linear(kept, fc2.out_features, fc2.bias is not None, **kw)
            else:
                from vitrank.compress.prune import prune_mlp

                stats = self._require_stats(index)
                pruned = prune_mlp(
                    fc1.weight,
                    fc1.bias,
                    fc2.weight,
                    fc2.bias,
                    stats.hidden_abs_mean[index],
                    stats.mean(f"blocks.{index}.mlp.fc2"),
                    kept,
                )
                copied.fc1 = linear_from(pruned.fc1_weight, pruned.fc1_bias)
                copied.fc2 = linear_from(pruned.fc2_weight, pruned.fc2_bias)
        return copied

    def _require_stats(self, index: int) -> CalibrationStats:
        if self.stats is None:
            raise ValueError(
                f"blocks.{index}: pruning scores units by their calibration activations, so "
                "`stats` (CalibrationStats) must be given, but got stats=None."
            )
        return self.stats


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
        needing = [
            f"blocks.{i}" for i, s in enumerate(specs) if s.attn.op in ("lowrank", "heads")
            or s.mlp.op == "lowrank"
        ]  # fmt: skip
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
    builder = _Builder(factors, stats, structure_only)
    blocks = []
    with torch.no_grad():
        for index, (teacher, block, spec) in enumerate(
            zip(teacher_blocks, student_blocks, specs, strict=True)
        ):
            attn = builder.attention(index, teacher.attn, block.attn, spec.attn)
            mlp = builder.mlp(index, teacher.mlp, block.mlp, spec.mlp)
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
