"""A tiny calibrated teacher with its factor cache and search space, built once per module."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import timm
import torch
from torch import nn

TINY_ARGS = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)


@dataclass
class TinySetup:
    teacher: nn.Module
    stats: object  # CalibrationStats
    factors: object  # FactorCache
    space: object  # spaces.SearchSpace
    images: torch.Tensor  # held-out batch (not the calibration images)
    labels: torch.Tensor


def _random_configs(space, count: int, seed: int = 0) -> list:
    """Configs drawn uniformly from the space with D's raw parametrization."""
    import optuna
    from vitrank.spaces import suggest_raw

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [suggest_raw(study.ask(), space) for _ in range(count)]


@pytest.fixture(scope="module")
def tiny_setup() -> TinySetup:
    from vitrank.core.factorize import FactorCache
    from vitrank.evaluators.calibration import calibrate
    from vitrank.spaces import build_space, search_families

    torch.manual_seed(0)
    teacher = timm.create_model("vit_small_patch16_224", pretrained=False, **TINY_ARGS).eval()
    with torch.no_grad():  # sharper logits than random init, so agreement means something
        teacher.head.weight.mul_(30.0)
    generator = torch.Generator().manual_seed(0)
    calib = torch.randn(48, 3, 16, 16, generator=generator)
    images = torch.randn(24, 3, 16, 16, generator=generator)
    with torch.no_grad():
        labels = teacher(images).argmax(-1)
    labels[:6] = (labels[:6] + 1) % 5  # a quarter wrong: accuracy 0.75 for the teacher
    stats = calibrate(teacher, [(calib, None)], progress=False)
    factors = FactorCache(teacher, stats)
    # every operator family, those a search leaves out by default too
    space = build_space(
        teacher, model_name="vit_small_patch16_224", model_args=TINY_ARGS, ops=search_families()
    )
    return TinySetup(teacher, stats, factors, space, images, labels)


@pytest.fixture
def random_configs():
    """Factory: `random_configs(space, count, seed=0)` -> configs drawn uniformly."""
    return _random_configs
