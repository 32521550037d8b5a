"""Save and load compressed models: model.safetensors + config.json, nothing else.

config.json holds what rebuilds the architecture without the teacher's weights: the timm
name (``model``), ``timm.create_model`` keyword arguments (``model_args``) and one block
spec per block (``blocks``) — the same keys as a ``spaces.CompressionConfig`` dict, so the
file that ``vitrank.save`` writes is also a loadable config. Loading creates the timm
model without weights, builds the compressed structure with ``apply_specs(...,
structure_only=True)`` and fills it from model.safetensors with ``strict=True``. The name
and ``model_args`` are checked first (``check_architecture``), so that loading reads
those two files and nothing else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from vitrank.core.files import atomic_write, atomic_write_text
from vitrank.core.spec import BlockSpec

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
REQUIRED_KEYS = ("model", "model_args", "blocks")
# `timm.create_model` keywords a config file may give: the shape of timm's
# VisionTransformer (its __init__), nothing that loads weights, reads a file, reaches the
# network or changes the pretrained config (checkpoint_path, pretrained, pretrained_cfg,
# pretrained_cfg_overlay, cache_dir). Layers only by name (act_layer="quick_gelu",
# norm_layer="rmsnorm"), which timm looks up in its own tables. Dropout rates are kept:
# they change nothing in eval and a teacher saved from training may record them.
ARCHITECTURE_ARGS = frozenset(
    {
        "img_size",
        "patch_size",
        "in_chans",
        "num_classes",
        "global_pool",
        "embed_dim",
        "depth",
        "num_heads",
        "mlp_ratio",
        "qkv_bias",
        "qk_norm",
        "scale_attn_norm",
        "scale_mlp_norm",
        "proj_bias",
        "init_values",
        "class_token",
        "pos_embed",
        "no_embed_class",
        "reg_tokens",
        "pre_norm",
        "final_norm",
        "fc_norm",
        "pool_include_prefix",
        "dynamic_img_size",
        "dynamic_img_pad",
        "act_layer",
        "norm_layer",
        "embed_norm_layer",
        "drop_rate",
        "pos_drop_rate",
        "patch_drop_rate",
        "proj_drop_rate",
        "attn_drop_rate",
        "drop_path_rate",
    }
)
# A timm registry name, with an optional pretrained tag: no source prefix ('hf-hub:',
# 'local-dir:') and no path ('timm/...'), which would load from elsewhere.
_TIMM_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_\-]+)?")


def check_architecture(model: Any, model_args: Any, source: str | Path) -> None:
    """Refuse a timm name or keyword from a file (`source`) that would load anything else.

    A config file describes an architecture; building it must read no other file and no
    network. Shared by saved models and by local-dir teachers.
    """
    if not isinstance(model, str) or not _TIMM_NAME.fullmatch(model):
        raise ValueError(
            f"{source}: the architecture must be a timm model name (e.g. "
            f"'vit_small_patch16_224'), but got {model!r}; a name with a source or a path "
            "('hf-hub:', 'local-dir:', 'timm/...') would load another model."
        )
    if not isinstance(model_args, dict):
        raise ValueError(
            f"{source}: `model_args` must be a JSON object, but got {type(model_args).__name__}."
        )
    refused = sorted(set(model_args) - ARCHITECTURE_ARGS)
    if refused:
        raise ValueError(
            f"{source}: `model_args` may hold only architecture arguments, but holds "
            f"{refused} (keys such as checkpoint_path or pretrained_cfg would load weights or "
            f"other files); remove them. Allowed: {', '.join(sorted(ARCHITECTURE_ARGS))}."
        )
    for key in ("act_layer", "norm_layer", "embed_norm_layer"):
        if not isinstance(model_args.get(key, ""), (str, type(None))):
            raise ValueError(
                f"{source}: `model_args.{key}` must be a timm layer name (e.g. 'gelu'), but "
                f"got {model_args[key]!r}."
            )


def _unshared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as contiguous CPU tensors with no two sharing memory.

    safetensors refuses tensors that share storage (tied weights, views of one factor);
    a shared tensor is cloned so each key is stored in full and ``strict`` loading fills
    every key.
    """
    state: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, value in model.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        storage = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if storage in seen or tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()
            storage = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        seen.add(storage)
        state[key] = tensor
    return state


def save_model(model: nn.Module, directory: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``directory``/model.safetensors and config.json (``meta``), each atomically.

    ``meta`` must hold ``model`` (timm name), ``model_args`` and ``blocks`` (spec dicts or
    ``BlockSpec``s); any other JSON-serialisable keys are kept as they are.
    """
    from safetensors.torch import save_file

    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise ValueError(
            f"`meta` must hold {list(REQUIRED_KEYS)} to rebuild the model, but lacks {missing}."
        )
    # Refused now, not when the saved model is loaded again.
    check_architecture(meta["model"], meta["model_args"], f"the model to save in {directory}")
    meta = dict(meta)
    meta["blocks"] = [b.to_dict() if isinstance(b, BlockSpec) else dict(b) for b in meta["blocks"]]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = _unshared_state(model)
    _check_finite_state(state, directory / WEIGHTS_FILE, "save")
    text = json.dumps(meta, indent=2)
    atomic_write(
        directory / WEIGHTS_FILE,
        lambda tmp: save_file(state, tmp, metadata={"format": "pt"}),
    )
    atomic_write_text(directory / CONFIG_FILE, text)
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    """config.json of a saved model, checked for the keys that rebuild it."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a saved vitrank model has {CONFIG_FILE}.")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise ValueError(f"{path} is damaged (not valid JSON): {error}.") from error
    if not isinstance(meta, dict):
        raise ValueError(f"{path} is damaged: expected a JSON object, got {type(meta).__name__}.")
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise ValueError(f"{path} is damaged: it lacks the keys {missing}.")
    check_architecture(meta["model"], meta["model_args"], path)
    return meta


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a saved vitrank model has {WEIGHTS_FILE}.")
    try:
        state = load_file(str(path))
    except Exception as error:  # safetensors raises several types for a damaged file
        raise ValueError(f"{path} is damaged or not a safetensors file: {error}.") from error
    _check_finite_state(state, path, "load")
    return state


def _check_finite_state(state: dict[str, torch.Tensor], path: Path, action: str) -> None:
    from vitrank.core.structure import first_non_finite

    found = first_non_finite(state)
    if found is not None:
        raise ValueError(
            f"Weights must be finite, but {found[0]} holds {found[1]} NaN/Inf values "
            f"(refusing to {action} {path})."
        )


def load_model(
    directory: str | Path,
    check: Callable[[nn.Module, dict[str, Any]], None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model written by ``save_model`` from its two files alone; eval mode.

    ``check(fresh_timm_model, meta)``, when given, runs on the uncompressed architecture
    before the compressed structure is built (e.g. a fingerprint check).
    """
    import timm
    from vitrank.core.apply import apply_specs

    directory = Path(directory)
    meta = read_meta(directory)
    config_path = directory / CONFIG_FILE
    try:
        specs = [BlockSpec.from_dict(b) for b in meta["blocks"]]
    except (TypeError, KeyError, ValueError) as error:
        raise ValueError(f"{config_path} is damaged: bad block spec ({error!r}).") from error
    state = _read_state(directory / WEIGHTS_FILE)
    try:
        base = timm.create_model(meta["model"], pretrained=False, **meta["model_args"])
    except Exception as error:  # timm raises RuntimeError, TypeError, ... for a bad name/args
        raise ValueError(
            f"{config_path}: timm cannot build model={meta['model']!r} with "
            f"model_args={meta['model_args']!r}: {error}"
        ) from error
    if check is not None:
        check(base, meta)
    model = apply_specs(base, specs, None, structure_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"{directory / WEIGHTS_FILE} does not match the structure in {config_path}: {error}"
        ) from error
    return model.eval(), meta
