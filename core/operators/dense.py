"""The teacher's own attention and MLP, unchanged."""

from __future__ import annotations

from typing import Any

from torch import nn
from vitrank.core.attention import DenseAttention
from vitrank.core.structure import BlockShape

from ._base import BuildContext, Linear, Operator


class DenseAttentionOp(Operator):
    name, part = "dense", "attn"

    def linears(self, shape: BlockShape, spec: Any, merges: bool = False) -> list[Linear]:
        d, inner = shape.dim, shape.attn_inner
        return [
            Linear("qkv", d, 3 * inner, shape.qkv_bias),
            Linear("proj", inner, d, shape.proj_bias),
        ]

    def build(self, ctx: BuildContext, teacher: Any, copied: Any, spec: Any) -> nn.Module:
        return DenseAttention.from_timm(copied)

    def describe(self, spec: Any, shape: BlockShape) -> str:
        return "dense"


class DenseMlpOp(Operator):
    name, part = "dense", "mlp"

    def linears(self, shape: BlockShape, spec: Any, merges: bool = False) -> list[Linear]:
        d, hidden = shape.dim, shape.mlp_hidden
        return [Linear("fc1", d, hidden, shape.fc1_bias), Linear("fc2", hidden, d, shape.fc2_bias)]

    def build(self, ctx: BuildContext, teacher: Any, copied: Any, spec: Any) -> nn.Module:
        return copied

    def describe(self, spec: Any, shape: BlockShape) -> str:
        return "dense"
