"""Compressed transformer blocks: a timm Block's own parts plus new attention/MLP and ToMe.

A ``CompressedBlock`` is the teacher's pre-norm block with its ``attn`` and ``mlp``
swapped (dense, low rank, head-factorized or pruned) and, between attention and MLP, a
ToMe merge of ``merge_count(merge_ratio, ...)`` tokens. The token state (sizes and the
source map) is passed from block to block explicitly by ``CompressedBlocks``, which
replaces ``model.blocks`` of a timm ``VisionTransformer``; nothing is stored on the model
between calls.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

from torch import Tensor, nn
from vitrank.core.merge import identity_source, match_tokens, merge_source, merge_weighted
from vitrank.core.spec import merge_count

_BLOCK_PARTS = ("norm1", "ls1", "drop_path1", "norm2", "ls2", "drop_path2")


def _block_part(block: nn.Module, name: str) -> nn.Module:
    part = getattr(block, name, None)
    if not isinstance(part, nn.Module):
        raise TypeError(
            f"`block` must be a timm pre-norm Block with {', '.join(_BLOCK_PARTS)}, but "
            f"{type(block).__name__} has no module {name!r}."
        )
    return part


class CompressedBlock(nn.Module):
    """x += ls1(attn(norm1(x))); merge tokens; x += ls2(mlp(norm2(x))).

    ``attn`` has the signature ``forward(x, log_size=None) -> (output, keys)`` (see
    ``vitrank.core.attention``); ``mlp`` maps (B, N, d) to (B, N, d). The norms,
    layer scales and drop paths are the ``block``'s own modules (shared, not copied).
    """

    def __init__(
        self,
        block: nn.Module,
        attn: nn.Module,
        mlp: nn.Module,
        merge_ratio: float = 0.0,
        num_prefix_tokens: int = 1,
    ) -> None:
        super().__init__()
        merge_count(merge_ratio, 0, 0)  # validates the ratio now rather than at forward
        if num_prefix_tokens < 0:
            raise ValueError(f"`num_prefix_tokens >= 0` must hold, but got {num_prefix_tokens=}.")
        self.merge_ratio = float(merge_ratio)
        self.num_prefix_tokens = num_prefix_tokens
        # The block's own modules (shared parameters), in timm's order.
        self.norm1 = _block_part(block, "norm1")
        self.attn = attn
        self.ls1 = _block_part(block, "ls1")
        self.drop_path1 = _block_part(block, "drop_path1")
        self.norm2 = _block_part(block, "norm2")
        self.mlp = mlp
        self.ls2 = _block_part(block, "ls2")
        self.drop_path2 = _block_part(block, "drop_path2")

    def forward(
        self, x: Tensor, size: Tensor | None = None, source: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """One block on tokens ``x`` (B, N, d).

        ``size`` (B, N): how many original tokens each token stands for; None while no
        token has been merged (attention then keeps the fused path with no size bias).
        ``source`` (B, N_original): current position of each original token, or None when
        not tracked.
        """
        if not isinstance(x, Tensor):
            raise TypeError(
                "CompressedBlock takes and returns (x, size, source); run the blocks through "
                "the CompressedBlocks container (`model.blocks(x)` or `forward_tokens`), not "
                "one by one (timm's forward_intermediates and grad checkpointing do that), "
                f"but got x of type {type(x).__name__}."
            )
        log_size = None if size is None else size.log()
        attn_out, keys = self.attn(self.norm1(x), log_size=log_size)
        x = x + self.drop_path1(self.ls1(attn_out))
        r = merge_count(self.merge_ratio, x.shape[1], self.num_prefix_tokens)
        if r > 0:
            matching = match_tokens(keys, r, self.num_prefix_tokens)
            x, size = merge_weighted(x, size, matching)
            if source is not None:
                source = merge_source(source, matching)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, size, source

    def extra_repr(self) -> str:
        return f"merge_ratio={self.merge_ratio}, num_prefix_tokens={self.num_prefix_tokens}"


class CompressedBlocks(nn.ModuleList):
    """The sequence of ``CompressedBlock``; drop-in for a timm ViT's ``model.blocks``.

    A ModuleList, so state-dict keys stay ``blocks.{i}.…`` as in timm. Calling it maps
    tokens to tokens like timm's ``nn.Sequential``; ``forward_tokens`` also returns the
    token sizes and the source map (for ``merge.unmerge`` back to the full grid).
    """

    def __init__(self, blocks: Iterable[CompressedBlock] = ()) -> None:
        blocks = list(blocks)
        for index, block in enumerate(blocks):
            if not isinstance(block, CompressedBlock):
                raise TypeError(
                    f"blocks[{index}] must be a CompressedBlock, but got {type(block).__name__}."
                )
        super().__init__(blocks)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        size = None
        for block in self:
            x, size, _ = block(x, size, None)
        return x

    def forward_tokens(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Tokens, sizes (B, N) and source map (B, N_original) after the last block."""
        source = identity_source(x.shape[0], x.shape[1], x.device)
        size = None
        for block in self:
            x, size, source = block(x, size, source)
        if size is None:
            size = x.new_ones(x.shape[:2])
        return x, size, source

    @property
    def merge_ratios(self) -> tuple[float, ...]:
        return tuple(cast(CompressedBlock, block).merge_ratio for block in self)
