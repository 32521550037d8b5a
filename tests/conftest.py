"""Fixtures shared by every test package: tiny random ViTs and the digits workload."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

# Small enough to build in milliseconds, big enough to have real structure
# (16 patch tokens + prefix tokens, 2 heads of 16 dims, MLP hidden 128).
TINY_VIT_ARGS: dict[str, Any] = {
    "img_size": 16,
    "patch_size": 4,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "num_classes": 5,
}


def make_tiny_vit(
    arch: str = "vit_small_patch16_224", seed: int = 0, **overrides: Any
) -> nn.Module:
    """A random-weight timm ViT in eval mode; `overrides` go to `timm.create_model`.

    `arch` picks the variant: e.g. "deit_tiny_distilled_patch16_224" (cls + distillation
    tokens, two heads) or "vit_base_patch16_reg4_gap_256" (register tokens, average pool).
    """
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, **{**TINY_VIT_ARGS, **overrides})
    return model.eval()


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests use tiny tensors: on a shared 2-core machine one thread is many times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_vit() -> Callable[..., nn.Module]:
    """Factory: `tiny_vit(**overrides)` -> a seeded random-weight timm ViT (eval mode)."""
    return make_tiny_vit


@pytest.fixture(scope="session")
def digits():
    """The embedded digits-vit workload (teacher + train / calib / val), loaded once."""
    from vitrank.workloads import load_workload

    return load_workload("digits-vit")
