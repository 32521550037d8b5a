"""Teachers: a timm ViT by name (hub weights with ``pretrained``) or a local timm folder
(``local-dir:PATH``, as written by ``timm.models.save_for_hf``), with timm's preprocessing."""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn


def _check_model_name(name: str) -> None:
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(
        f"unknown timm model {name!r}.{hint} (`timm.list_models('*vit*')` lists the ViTs; "
        "a local timm folder is given as local-dir:PATH)"
    )


def _local_dir_config(path: Path) -> tuple[str, dict[str, Any]]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} does not exist; local-dir:PATH expects a timm model folder "
            "(config.json + model.safetensors, as written by timm.models.save_for_hf)."
        )
    from vitrank.core.io import check_architecture

    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise ValueError(
            f"{config_file} is not valid JSON ({error}); a local timm folder needs the "
            "config.json timm.models.save_for_hf wrote with its weights."
        ) from error
    if not isinstance(config, dict):
        raise ValueError(
            f"{config_file} must hold a JSON object (timm's model config, as "
            f"timm.models.save_for_hf writes it), but holds a {type(config).__name__}."
        )
    if "architecture" not in config:
        raise ValueError(
            f"{config_file} lacks `architecture` (the timm model name, e.g. "
            "'vit_small_patch16_224'); a local timm folder needs the config.json "
            "timm.models.save_for_hf wrote with its weights."
        )
    # timm builds the teacher from these (and the run records them): nothing else is read.
    check_architecture(config.get("architecture"), config.get("model_args", {}), config_file)
    args = dict(config.get("model_args", {}))
    args.setdefault("num_classes", config.get("num_classes", 1000))
    return config["architecture"], args


def _create_teacher(
    model: str, pretrained: bool, num_classes: int | None
) -> tuple[nn.Module, str, dict[str, Any]]:
    """The teacher in eval mode with its timm name and rebuild arguments."""
    import timm
    from vitrank.core.structure import check_teacher, inspect_vit

    if model.startswith("local-dir:"):
        path = Path(model.removeprefix("local-dir:")).expanduser()
        model_name, model_args = _local_dir_config(path)
        teacher = _load_local_dir(path, model_name, model_args)
        check_teacher(teacher, model)  # the rule before the class count of the data
        if num_classes is not None and num_classes != teacher.num_classes:
            raise ValueError(
                f"{model} has {teacher.num_classes} classes but the data has {num_classes}; "
                "the teacher must be trained on the images it is compressed with."
            )
    else:
        _check_model_name(model)
        model_name, model_args = model, {}
        if num_classes is not None and not pretrained:
            model_args["num_classes"] = num_classes
        try:
            teacher = timm.create_model(model_name, pretrained=pretrained, **model_args)
        except (OSError, RuntimeError) as error:
            if not pretrained:
                raise
            # typically no network or no hub weights for this name
            raise RuntimeError(
                f"could not load pretrained weights for {model_name}: {error}. Without a "
                "network, pass a local checkpoint as --model local-dir:PATH."
            ) from error
        model_args.setdefault("num_classes", teacher.num_classes)
        if pretrained and num_classes is not None and num_classes != teacher.num_classes:
            raise ValueError(
                f"{model_name}'s pretrained head has {teacher.num_classes} classes but the "
                f"data has {num_classes}; fine-tune the teacher on these images first and "
                "pass it as --model local-dir:PATH."
            )
    inspect_vit(teacher, model)  # UnsupportedModelError for anything vitrank cannot compress
    check_teacher(teacher, model)
    return teacher.eval(), model_name, model_args


def _load_local_dir(path: Path, model_name: str, model_args: dict[str, Any]) -> nn.Module:
    """The checkpoint in a local timm folder; its architecture is built and checked first.

    A bare build on the meta device costs no memory and reads no weights, so a config.json
    naming a non-ViT or arguments timm refuses is reported against config.json, and a
    damaged weights file against itself.
    """
    import timm
    import torch
    from vitrank.core.structure import inspect_vit

    config_file = path / "config.json"
    try:
        with torch.device("meta"):
            bare = timm.create_model(model_name, pretrained=False, **model_args)
    except Exception as error:  # timm raises TypeError, RuntimeError, ... for bad arguments
        raise ValueError(
            f"{config_file}: timm cannot build {model_name!r} with model_args {model_args} "
            f"({error}); a local folder needs the config.json timm.models.save_for_hf wrote "
            "with its weights."
        ) from error
    inspect_vit(bare, f"{model_name}, which {config_file} names,")
    weights = [p for p in (path / "model.safetensors", path / "pytorch_model.bin") if p.is_file()]
    if not weights:
        raise FileNotFoundError(
            f"{path} has no model.safetensors; local-dir:PATH expects a timm model folder "
            "(config.json + model.safetensors, as written by timm.models.save_for_hf)."
        )
    try:
        # a local folder is a checkpoint: its weights are always loaded
        return timm.create_model(f"local-dir:{path}", pretrained=True)
    except Exception as error:  # safetensors and torch raise several types for a bad file
        raise ValueError(
            f"{weights[0]} cannot be loaded ({error}): it is truncated, damaged or not the "
            f"weights {config_file} describes; copy the checkpoint's files again (as "
            "timm.models.save_for_hf wrote them)."
        ) from error


def _data_config(model: nn.Module) -> dict[str, Any]:
    """timm's eval preprocessing for the model as it was built (size, channels, mean, std)."""
    try:
        from timm.data.model_config import resolve_input_data_config

        config = dict(resolve_input_data_config(model))
    except ImportError:  # older timm: the pretrained config only
        from timm.data import resolve_data_config

        config = dict(resolve_data_config({}, model=model))
    if min(config["input_size"][1:]) < 64:
        config["crop_pct"] = 1.0  # a centre crop would cut most of a tiny image away
    return config


def _transform(config: dict[str, Any]) -> Callable:
    from timm.data import create_transform

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return create_transform(**{k: config[k] for k in keys if k in config})


def _pil_mode(config: dict[str, Any]) -> str:
    channels = config["input_size"][0]
    if channels not in (1, 3):
        raise ValueError(f"`in_chans in (1, 3)` must hold for images, but got {channels=}.")
    return "L" if channels == 1 else "RGB"


def normalization(config_path: Path) -> tuple[float, float]:
    """The (mean, std) a single-channel local timm folder's config.json records."""
    cfg = json.loads(config_path.read_text())["pretrained_cfg"]
    return float(cfg["mean"][0]), float(cfg["std"][0])
