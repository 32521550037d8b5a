"""Calibration: one forward pass that sums the statistics the factorizations need.

Hooks on every block's Linears accumulate Σ x̄ᵀx̄ (x̄ = [x, 1]) in fp64; a hook on the
attention computes the attention probabilities explicitly (timm's fused path never
materialises them) to sum Σ (A_h x)ᵀ(A_h x) per head. Nothing is stored per image, so
memory is bounded by one batch whatever the number of images.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from vitrank.core.factorize import weights_digest
from vitrank.core.stats import CalibrationStats
from vitrank.evaluators._data import progress_bar


class _Accumulator:
    """The hooks and the running sums of one calibration pass."""

    def __init__(self, blocks: Iterable[Any]) -> None:
        self.stats = CalibrationStats()
        self.abs_sums: dict[tuple[str, int], Tensor] = {}
        self.abs_counts: dict[tuple[str, int], int] = {}
        self.handles: list = []
        for i, block in enumerate(blocks):
            attn, mlp = block.attn, block.mlp
            for name, layer in (
                ("attn.qkv", attn.qkv),
                ("attn.proj", attn.proj),
                ("mlp.fc1", mlp.fc1),
                ("mlp.fc2", mlp.fc2),
            ):
                self.handles.append(
                    layer.register_forward_pre_hook(self._linear_hook(f"blocks.{i}.{name}"))
                )
            self.handles.append(attn.register_forward_pre_hook(self._attention_hook(i, attn)))
            self.handles.append(
                mlp.fc2.register_forward_pre_hook(self._abs_hook("hidden", i, None))
            )
            self.handles.append(
                attn.proj.register_forward_pre_hook(self._abs_hook("head", i, attn.num_heads))
            )

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _add(self, table: dict, key, value: Tensor) -> None:
        table[key] = value if key not in table else table[key] + value

    def _linear_hook(self, key: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            x_bar = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
            self._add(self.stats.gram, key, x_bar.T @ x_bar)

        return hook

    def _attention_hook(self, index: int, attn: Any):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            batch, tokens, dim = x.shape
            H, d_h = attn.num_heads, attn.head_dim
            # F.linear, not attn.qkv(x): the qkv pre-hook must see each token once.
            qkv = (
                F.linear(x, attn.qkv.weight, attn.qkv.bias)
                .reshape(batch, tokens, 3, H, d_h)
                .permute(2, 0, 3, 1, 4)
            )
            q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
            probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            x64 = x.double()
            grams = []
            for h in range(H):  # one head at a time keeps the fp64 A_h x at (B, N, d)
                mixed = (probs[:, h].double() @ x64).reshape(-1, dim)
                grams.append(mixed.T @ mixed)
            self._add(self.stats.head_gram, index, torch.stack(grams))

        return hook

    def _abs_hook(self, kind: str, index: int, num_heads: int | None):
        def hook(module: nn.Module, args: tuple) -> None:
            h = args[0].detach().double().abs()
            h = h.reshape(-1, h.shape[-1])
            if num_heads is not None:  # proj input: heads are contiguous column groups
                h = h.reshape(h.shape[0], num_heads, -1).mean(-1)
            self._add(self.abs_sums, (kind, index), h.sum(0))
            self.abs_counts[(kind, index)] = self.abs_counts.get((kind, index), 0) + h.shape[0]

        return hook

    def finish(self, num_images: int) -> CalibrationStats:
        for (kind, index), total in self.abs_sums.items():
            table = self.stats.hidden_abs_mean if kind == "hidden" else self.stats.head_abs_mean
            table[index] = total / self.abs_counts[(kind, index)]
        self.stats.num_images = num_images
        return self.stats


def _batches(data: Dataset | DataLoader | Iterable, batch_size: int) -> Iterable:
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, Dataset):
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    return data


def calibrate(
    model: nn.Module,
    data: Dataset | DataLoader,
    batch_size: int = 64,
    max_images: int | None = None,
    progress: bool = True,
) -> CalibrationStats:
    """Sum the calibration statistics of `model` over `data` ((image, label) pairs).

    The model is run in eval mode without gradients and left as it was found.
    """
    from vitrank.core.structure import inspect_vit

    inspect_vit(model)  # unsupported models fail here with a clear message
    if max_images is not None and max_images < 1:
        raise ValueError(f"`max_images >= 1` must hold, but got {max_images=}.")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    accumulator = _Accumulator(model.blocks)  # type: ignore[arg-type]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        total = len(data) if hasattr(data, "__len__") and not isinstance(data, DataLoader) else None  # type: ignore[arg-type]
        if total is not None and max_images is not None:
            total = min(total, max_images)
        with torch.no_grad(), progress_bar("calibration images", total, progress) as advance:
            for batch in _batches(data, batch_size):
                images = batch[0] if isinstance(batch, list | tuple) else batch
                if max_images is not None:
                    images = images[: max_images - seen]
                if len(images) == 0:
                    break
                model(images.to(device=device, dtype=dtype))
                seen += len(images)
                advance(len(images))
                if max_images is not None and seen >= max_images:
                    break
    finally:
        accumulator.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("Calibration data must hold at least one image, but it is empty.")
    stats = accumulator.finish(seen)
    stats.check_finite()
    return stats


def cache_path(
    model: nn.Module, cache_dir: str | Path, key: str, batch_size: int, max_images: int | None
) -> Path:
    """The cache file for this model's weights, data identity `key` and settings."""
    identity = {
        "weights": weights_digest(model),
        "data": key,
        "max_images": max_images,
        # Sums do not depend on the batch size, except through floating-point order.
        "batch_size": batch_size,
        "dtype": str(next(model.parameters()).dtype),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"calibration-{digest}.safetensors"


def calibrate_cached(
    model: nn.Module,
    data: Dataset | DataLoader,
    cache_dir: str | Path,
    key: str,
    batch_size: int = 64,
    max_images: int | None = None,
    progress: bool = True,
) -> CalibrationStats:
    """`calibrate`, reusing a file in `cache_dir` made for the same weights, data and settings.

    `key` names the data (e.g. workload name + split + size + seed): the caller knows what
    makes two datasets the same. A damaged cache file is reported with a warning and
    recomputed (then overwritten).
    """
    path = cache_path(model, cache_dir, key, batch_size, max_images)
    if path.exists():
        try:
            stats = CalibrationStats.load(path)
            stats.check_finite()
            return stats
        except (ValueError, KeyError, OSError) as error:
            warnings.warn(
                f"Calibration cache {path} is damaged ({error}); recomputing it.", stacklevel=2
            )
    stats = calibrate(model, data, batch_size=batch_size, max_images=max_images, progress=progress)
    stats.meta = {"data": key, "batch_size": batch_size, "max_images": max_images}
    stats.save(path)
    return stats
