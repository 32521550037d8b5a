from __future__ import annotations

import json

import pytest
import torch
from _compress_cases import VARIANTS, build, calibration, images, model_args
from vitrank.core.apply import apply_specs
from vitrank.core.factorize import FactorCache
from vitrank.core.io import load_model, save_model
from vitrank.core.spec import AttentionSpec, BlockSpec, MlpSpec


def _specs(name: str) -> list[BlockSpec]:
    lowrank = AttentionSpec("lowrank", qkv_rank=5, proj_rank=0)
    attn = lowrank if name == "qk_norm" else AttentionSpec("heads", qk_rank=3, vo_rank=5)
    return [
        BlockSpec(attn, MlpSpec("prune", hidden_kept=50), 0.3),
        BlockSpec(
            AttentionSpec("prune", heads_kept=2), MlpSpec("lowrank", fc1_rank=7, fc2_rank=0), 0.25
        ),
    ]


def _compressed(name: str):
    teacher = build(name)
    stats = calibration(teacher)
    specs = _specs(name)
    model = apply_specs(teacher, specs, FactorCache(teacher, stats), stats)
    meta = {"model": VARIANTS[name][0], "model_args": model_args(name), "blocks": specs}
    return model, meta


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_save_then_load_gives_identical_logits(tmp_path, name):
    model, meta = _compressed(name)
    save_model(model, tmp_path, {**meta, "note": "kept"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded, read = load_model(tmp_path)
    assert not loaded.training
    x = images()
    assert torch.equal(loaded(x), model(x))
    assert read["note"] == "kept"
    assert [BlockSpec.from_dict(b) for b in read["blocks"]] == meta["blocks"]


def test_spec_dicts_round_trip():
    spec = BlockSpec(
        AttentionSpec("heads", qk_rank=2, vo_rank=3), MlpSpec("prune", hidden_kept=9), 0.5
    )
    assert BlockSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_shared_tensors_are_saved_and_loaded(tmp_path):
    model, meta = _compressed("vit")
    # Tie two same-shaped parameters (as a user's model might): safetensors refuses
    # shared storage unless save_model takes care of it.
    model.blocks[1].norm2.weight = model.blocks[1].norm1.weight
    save_model(model, tmp_path, meta)
    loaded, _ = load_model(tmp_path)
    assert torch.equal(loaded.blocks[1].norm2.weight, model.blocks[1].norm1.weight)
    assert torch.equal(loaded(images()), model(images()))


def test_meta_must_say_how_to_rebuild(tmp_path):
    model, meta = _compressed("vit")
    with pytest.raises(ValueError, match=r"lacks \['blocks'\]"):
        save_model(model, tmp_path, {"model": meta["model"], "model_args": {}})
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_missing_and_damaged_files_are_named(tmp_path):
    model, meta = _compressed("vit")
    save_model(model, tmp_path, meta)
    weights, config = tmp_path / "model.safetensors", tmp_path / "config.json"
    good_weights, good_config = weights.read_bytes(), config.read_text()

    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_model(tmp_path)
    weights.write_bytes(good_weights[: len(good_weights) // 2])
    with pytest.raises(ValueError, match="model.safetensors is damaged"):
        load_model(tmp_path)
    weights.write_bytes(good_weights)

    config.write_text(good_config[:-20])
    with pytest.raises(ValueError, match="config.json is damaged"):
        load_model(tmp_path)
    config.write_text(json.dumps({"model": "vit_small_patch16_224"}))
    with pytest.raises(ValueError, match=r"config.json is damaged: it lacks .*model_args"):
        load_model(tmp_path)
    config.unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_model(tmp_path)

    # A config whose specs do not match the stored weights is refused with both names.
    wrong = json.loads(good_config)
    wrong["blocks"][1]["mlp"]["fc1_rank"] = 6
    config.write_text(json.dumps(wrong))
    with pytest.raises(ValueError, match=r"model.safetensors does not match .*config.json"):
        load_model(tmp_path)


def test_non_finite_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model, meta = _compressed("vit")
    save_model(model, tmp_path, meta)
    state = load_file(str(tmp_path / "model.safetensors"))
    key = "blocks.0.attn.q.weight"
    state[key][0, 0] = float("nan")
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"{key} holds 1 NaN/Inf"):
        load_model(tmp_path)
    with torch.no_grad():
        model.blocks[1].mlp.fc2.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"blocks.1.mlp.fc2.weight holds 1 NaN/Inf"):
        save_model(model, tmp_path / "other", meta)


def test_saving_over_an_existing_model_replaces_it_atomically(tmp_path):
    model, meta = _compressed("vit")
    save_model(model, tmp_path, meta)
    other, other_meta = _compressed("registers")
    save_model(other, tmp_path, other_meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded, _ = load_model(tmp_path)
    assert torch.equal(loaded(images()), other(images()))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("checkpoint_path", "/elsewhere/weights.pth"),
        ("pretrained_cfg_overlay", {"file": "/elsewhere/weights.pth"}),
        ("pretrained", True),
        ("pretrained_cfg", {"hf_hub_id": "timm/vit_small_patch16_224"}),
        ("cache_dir", "/elsewhere"),
    ],
)
def test_model_args_that_reach_outside_the_folder_are_refused(tmp_path, monkeypatch, key, value):
    import timm

    import vitrank
    from vitrank.cli import main

    model, meta = _compressed("vit")
    save_model(model, tmp_path, meta)
    config = tmp_path / "config.json"
    data = json.loads(config.read_text())
    data["model_args"][key] = value
    config.write_text(json.dumps(data))

    def never(*args, **kwargs):
        raise AssertionError("timm.create_model must not run on a refused config")

    monkeypatch.setattr(timm, "create_model", never)
    with pytest.raises(ValueError, match=rf"config.json: `model_args` may hold only .*'{key}'"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match=key):
        vitrank.load(tmp_path)
    assert main(["eval", str(tmp_path)]) == 2
    with pytest.raises(ValueError, match=rf"the model to save in .*'{key}'"):
        save_model(model, tmp_path / "again", {**meta, "model_args": data["model_args"]})


@pytest.mark.parametrize(
    "name", ["hf-hub:timm/vit_small_patch16_224", "local-dir:/elsewhere", "timm/vit_small"]
)
def test_architecture_names_that_load_another_model_are_refused(tmp_path, monkeypatch, name):
    import timm

    model, meta = _compressed("vit")
    save_model(model, tmp_path, meta)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model": name}))
    monkeypatch.setattr(timm, "create_model", None)
    with pytest.raises(ValueError, match=r"architecture must be a timm model name.*'hf-hub:'"):
        load_model(tmp_path)


def test_every_architecture_argument_builds_a_vit_and_only_those_pass() -> None:
    """The allow-list is timm's VisionTransformer's own keywords, less the loading ones."""
    import inspect

    from timm.models.vision_transformer import VisionTransformer
    from vitrank.core.io import ARCHITECTURE_ARGS, check_architecture

    keywords = set(inspect.signature(VisionTransformer.__init__).parameters)
    assert not ARCHITECTURE_ARGS - keywords
    check_architecture("vit_small_patch16_224.augreg_in21k", {"act_layer": "gelu"}, "x")
    with pytest.raises(ValueError, match=r"`model_args.norm_layer` must be a timm layer name"):
        check_architecture("vit_small_patch16_224", {"norm_layer": {"file": "x"}}, "x")


@pytest.mark.parametrize(
    "failure",
    [
        OSError(28, "No space left on device"),
        # safetensors (Rust) wraps the OS error in its own exception's text
        RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                     'message: "No space left on device" })'),
    ],
)  # fmt: skip
def test_a_full_disk_names_the_file_and_leaves_it_as_it_was(tmp_path, failure):
    from pathlib import Path

    from vitrank.core.files import WriteError, atomic_write, atomic_write_text

    from vitrank.cli import _is_usage_error

    target = atomic_write_text(tmp_path / "pareto.json", "old\n")

    def write(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise failure

    with pytest.raises(WriteError) as error:
        atomic_write(target, write)
    assert str(error.value).startswith(f"no space left on the device to write {target}")
    assert "free space there" in str(error.value)
    assert target.read_text() == "old\n" and sorted(tmp_path.iterdir()) == [target]
    assert _is_usage_error(error.value)  # the CLI says it in one line and exits 2


def test_an_unwritable_output_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    import os

    from vitrank.core import files
    from vitrank.core.files import WriteError, check_writable

    assert check_writable(tmp_path / "new" / "model") == tmp_path / "new" / "model"
    assert not (tmp_path / "new").exists()  # nothing is created by the check
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(WriteError, match="is a file, not a folder"):
        check_writable(tmp_path / "a-file")

    def denied(directory, name):
        raise PermissionError(13, "Permission denied", str(directory))

    monkeypatch.setattr(files, "_new_temp_file", denied)
    with pytest.raises(WriteError, match=rf"cannot write into {tmp_path} \(Permission denied\)"):
        check_writable(tmp_path)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(WriteError, match="choose a folder you can write to"):
        check_writable(tmp_path / "new")
