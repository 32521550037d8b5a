"""A compressed model from a teacher and a config, saved and loaded back.

    model = compress(teacher, config, stats)   # config: CompressionConfig
    save(model, "out/")                         # model.safetensors + config.json
    model = load("out/")                        # no teacher, no statistics

``vitrank.compress`` / ``save`` / ``load`` are these functions; the layers above (search,
evaluators) call them here, below the public façade.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn
from vitrank.core.apply import apply_specs, needs_factors
from vitrank.core.compensate import COMPENSATION_STEPS
from vitrank.core.compensate import compensate as refine
from vitrank.core.config import CompressionConfig
from vitrank.core.factorize import FactorCache
from vitrank.core.io import CONFIG_FILE, load_model, save_model
from vitrank.core.stats import CalibrationStats
from vitrank.core.structure import inspect_vit

if TYPE_CHECKING:
    from torch import Tensor
    from torch.utils.data import DataLoader, Dataset

CONFIG_ATTRIBUTE = "vitrank_config"


def factor_cache(
    model: nn.Module, config: CompressionConfig, stats: CalibrationStats | None
) -> FactorCache:
    """The factors ``config.svd`` asks for: whitened needs statistics, plain does not."""
    if config.svd == "whitened" and stats is None:
        raise ValueError(
            "`svd='whitened'` factorizes on calibration activations, so `stats` must be given "
            "(evaluators.calibrate(model, images)); use svd='plain' for weight-only SVD."
        )
    return FactorCache(model, stats, whitening=config.svd == "whitened", shrinkage=config.shrinkage)


def compress(
    model: nn.Module,
    config: CompressionConfig,
    stats: CalibrationStats | None = None,
    factors: FactorCache | None = None,
    images: Tensor | Dataset | DataLoader | None = None,
    *,
    compensation_steps: int = COMPENSATION_STEPS,
) -> nn.Module:
    """A new compressed model built from ``model`` as ``config`` says; ``model`` is untouched.

    ``stats`` (calibration statistics) are needed for whitened factors and for channel
    and head pruning; ``factors`` may be passed to reuse a ``FactorCache`` across many
    configs (a search does), else one is built here when the config needs it. With
    ``config.compensate`` the factorized parameters are then refined block by block
    against the teacher on the calibration ``images`` (a tensor, or (image, label) data).
    The config travels with the model (``model.vitrank_config``) for ``save``.
    """
    if not isinstance(config, CompressionConfig):
        raise TypeError(
            f"`config` must be a spaces.CompressionConfig, but got {type(config).__name__}."
        )
    # The fingerprint's label is the name it was made with; every shape is compared.
    config.check_compatible(inspect_vit(model, config.fingerprint.architecture))
    if factors is None and any(needs_factors(b) for b in config.blocks):
        factors = factor_cache(model, config, stats)
    elif factors is not None and factors.whitening != (config.svd == "whitened"):
        kind = "whitened" if factors.whitening else "plain"
        raise ValueError(
            f"`factors` must be of the kind the config asks for (svd={config.svd!r}), but "
            f"they are {kind} SVD factors."
        )
    elif factors is not None and factors.whitening and factors.shrinkage != config.shrinkage:
        raise ValueError(
            f"`factors` must be whitened with the config's shrinkage {config.shrinkage}, but "
            f"they were made with shrinkage {factors.shrinkage}."
        )
    if config.compensate and images is None:
        raise ValueError(
            "`config.compensate` refines the factors on calibration images, so `images` must "
            "be given (the calibration data), but got images=None."
        )
    student = apply_specs(model, config.blocks, factors, stats)
    if config.compensate and images is not None:
        refine(student, model, images, steps=compensation_steps)
    setattr(student, CONFIG_ATTRIBUTE, config)
    return student


def save(model: nn.Module, directory: str | Path) -> Path:
    """Write ``directory``/model.safetensors and config.json (the full CompressionConfig)."""
    config = getattr(model, CONFIG_ATTRIBUTE, None)
    if config is None:
        raise ValueError(
            f"`model` must come from vitrank.compress or vitrank.load (it carries "
            f"`{CONFIG_ATTRIBUTE}`), but {type(model).__name__} has none."
        )
    return save_model(model, directory, config.to_dict())


def load(directory: str | Path) -> nn.Module:
    """Rebuild a model saved by ``save`` from its two files alone, in eval mode."""
    parsed: list[CompressionConfig] = []

    def check(base: nn.Module, meta: dict[str, Any]) -> None:
        path = Path(directory) / CONFIG_FILE
        try:
            config = CompressionConfig.from_dict(meta)
            config.check_compatible(inspect_vit(base, config.fingerprint.architecture))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error
        parsed.append(config)

    model, _ = load_model(directory, check=check)
    setattr(model, CONFIG_ATTRIBUTE, parsed[0])
    return model


def check_buildable(config: CompressionConfig, source: str | Path) -> None:
    """Refuse, before any work, a config whose own architecture (``model`` and
    ``model_args``) is not the one its fingerprint describes, or that names a source of
    weights or files: what ``compress`` would build from it could not be loaded again."""
    import timm
    import torch
    from vitrank.core.io import check_architecture

    check_architecture(config.model, config.model_args, source)
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated or initialised
            base = timm.create_model(config.model, pretrained=False, **config.model_args)
    except Exception as error:  # timm raises RuntimeError, TypeError, ... for bad args
        raise ValueError(
            f"{source}: timm cannot build model={config.model!r} with "
            f"model_args={config.model_args!r}: {error}"
        ) from error
    found = inspect_vit(base, config.fingerprint.architecture)
    if found != config.fingerprint:
        raise ValueError(
            f"{source}: its model_args build another model than its fingerprint describes "
            f"({config.fingerprint.describe_difference(found)}); the file was edited or "
            "damaged: use the config.json the search saved."
        )
