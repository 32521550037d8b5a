"""Workloads: the shipped digits teacher, deterministic splits, real ImageFolder loading."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models import save_for_hf
from vitrank.core.structure import UnsupportedModelError
from vitrank.workloads import (
    calibration_indices,
    digits_arrays,
    load_workload,
    loader,
    stratified_split,
)


@torch.no_grad()
def _accuracy(model: torch.nn.Module, dataset) -> float:
    correct = total = 0
    for images, labels in loader(dataset, batch_size=256):
        correct += (model(images).argmax(-1) == labels).sum().item()
        total += len(labels)
    return correct / total


def test_shipped_teacher_reaches_95_percent_on_val(digits):
    assert digits.name == "digits-vit"
    assert not digits.model.training
    assert digits.input_size == (1, 8, 8)
    assert digits.num_classes == 10
    assert _accuracy(digits.model, digits.val) >= 0.95


def test_digits_splits_are_fixed_stratified_and_disjoint(digits):
    _, labels = digits_arrays()
    train, val = stratified_split(labels)
    again_train, again_val = stratified_split(labels)
    np.testing.assert_array_equal(train, again_train)
    np.testing.assert_array_equal(val, again_val)
    assert not set(train) & set(val)
    assert len(train) + len(val) == len(labels) == len(digits.train) + len(digits.val)
    # every class is in val at about the split fraction
    for label in range(10):
        share = np.mean(labels[val] == label) / np.mean(labels == label)
        assert 0.9 < share < 1.1
    # the workload's val images are exactly those of the split
    images, targets = digits.val.tensors
    np.testing.assert_array_equal(targets.numpy(), labels[val])


def test_calibration_subset_is_seeded_and_drawn_from_train(digits):
    a = calibration_indices(1000, 64, seed=0)
    np.testing.assert_array_equal(a, calibration_indices(1000, 64, seed=0))
    assert not np.array_equal(a, calibration_indices(1000, 64, seed=1))
    assert len(set(a)) == 64 and a.max() < 1000
    assert len(digits.calib) == 256
    image, label = digits.calib[0]
    first = digits.calib.indices[0]
    torch.testing.assert_close(image, digits.train[first][0])
    small = load_workload(calib_size=10, seed=3)
    assert len(small.calib) == 10
    with pytest.raises(ValueError, match="calib_size"):
        load_workload(calib_size=0)


def test_model_name_and_args_rebuild_the_teacher(digits):
    rebuilt = timm.create_model(digits.model_name, **digits.model_args).eval()
    rebuilt.load_state_dict(digits.model.state_dict())
    images = torch.stack([digits.val[i][0] for i in range(8)])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), digits.model(images))


def _write_pngs(root, classes, per_class, size, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            pixels = rng.integers(0, 256, size=shape, dtype=np.uint8) // (c + 1)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


@pytest.fixture
def local_vit(tmp_path, tiny_vit):
    """A tiny 3-class ViT saved in timm's local folder format."""
    model = tiny_vit(num_classes=3)
    folder = tmp_path / "teacher"
    save_for_hf(model, str(folder), safe_serialization=True)
    return model, folder


def test_image_folder_with_train_and_val_through_local_dir(tmp_path, local_vit):
    model, folder = local_vit
    data = tmp_path / "images"
    _write_pngs(data / "train", ["cat", "dog", "emu"], per_class=4, size=20)
    _write_pngs(data / "val", ["cat", "dog", "emu"], per_class=2, size=20, seed=1)
    workload = load_workload(model=f"local-dir:{folder}", data=data, calib_size=5)
    assert (len(workload.train), len(workload.val), len(workload.calib)) == (12, 6, 5)
    assert workload.num_classes == 3 and workload.input_size == (3, 16, 16)
    image, label = workload.val[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < 3
    # timm normalization was applied (raw ToTensor output would lie in [0, 1])
    assert image.min() < 0
    # the checkpoint's weights were loaded, and its name + args rebuild it
    batch = torch.stack([workload.val[i][0] for i in range(3)])
    with torch.no_grad():
        torch.testing.assert_close(workload.model(batch), model(batch))
    assert workload.model_name == "vit_small_patch16_224"
    assert workload.model_args["embed_dim"] == 32


def test_single_image_folder_is_split_deterministically(tmp_path, local_vit):
    _, folder = local_vit
    data = tmp_path / "flat"
    _write_pngs(data, ["a", "b", "c"], per_class=10, size=16)
    first = load_workload(model=f"local-dir:{folder}", data=data, calib_size=4)
    second = load_workload(model=f"local-dir:{folder}", data=data, calib_size=4)
    assert len(first.train) + len(first.val) == 30
    assert len(first.val) == 6  # 20 % of each class
    assert first.val.indices == second.val.indices
    assert first.calib.indices == second.calib.indices


def test_digits_teacher_with_grayscale_folder(tmp_path):
    data = tmp_path / "digits"
    _write_pngs(data, [str(d) for d in range(10)], per_class=2, size=8, mode="L")
    workload = load_workload(data=data, calib_size=4)
    assert workload.input_size == (1, 8, 8)
    assert workload.val[0][0].shape == (1, 8, 8)


def test_named_model_sees_digits_through_its_own_transform(tiny_vit):
    workload = load_workload(model="vit_tiny_patch16_224", calib_size=8)
    image, label = workload.val[0]
    assert image.shape == (3, 224, 224)
    assert workload.model_name == "vit_tiny_patch16_224" and workload.num_classes == 1000


@pytest.mark.parametrize("layout", ["missing", "empty", "classes_without_images", "no_val"])
def test_bad_data_folder_names_the_path(tmp_path, local_vit, layout):
    _, folder = local_vit
    data = tmp_path / "data"
    if layout != "missing":
        data.mkdir()
    if layout == "classes_without_images":
        (data / "cat").mkdir()
    if layout == "no_val":
        _write_pngs(data / "train", ["a", "b"], per_class=2, size=8)
    with pytest.raises(FileNotFoundError, match="ImageFolder") as info:
        load_workload(model=f"local-dir:{folder}", data=data)
    assert str(data) in str(info.value)


def test_data_with_another_class_count_is_refused(tmp_path, local_vit):
    _, folder = local_vit
    _write_pngs(tmp_path / "d", ["a", "b"], per_class=3, size=16)
    with pytest.raises(ValueError, match="3 classes but the data has 2"):
        load_workload(model=f"local-dir:{folder}", data=tmp_path / "d")


def test_non_vit_is_refused_with_its_name():
    with pytest.raises(UnsupportedModelError, match="resnet18"):
        load_workload(model="resnet18")


def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match="vit_small_patch16_224"):
        load_workload(model="vit_smal_patch16_224")


def test_missing_local_dir_and_unknown_workload(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_workload(model=f"local-dir:{tmp_path}")
    with pytest.raises(ValueError, match="digits-vit"):
        load_workload("imagenet")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"model_args": {"checkpoint_path": "/elsewhere/weights.pth"}}, "'checkpoint_path'"),
        ({"model_args": {"pretrained_cfg_overlay": {"file": "/x"}}}, "'pretrained_cfg_overlay'"),
        ({"architecture": "hf-hub:timm/vit_small_patch16_224"}, "architecture must be a timm"),
    ],
)
def test_a_local_teacher_config_that_reaches_elsewhere_is_refused(
    tmp_path, local_vit, monkeypatch, change, named
):
    import json

    _, folder = local_vit
    config = json.loads((folder / "config.json").read_text())
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(timm, "create_model", None)  # refused before timm reads anything
    with pytest.raises(ValueError, match=named) as error:
        load_workload(model=f"local-dir:{folder}")
    assert str(folder / "config.json") in str(error.value)


def _local_folder(tmp_path, tiny_vit, name="teacher", change=None, **overrides):
    """A tiny ViT saved as a timm folder; `change(model)` edits its weights first."""
    model = tiny_vit(**{"num_classes": 3, **overrides})
    if change is not None:
        with torch.no_grad():
            change(model)
    folder = tmp_path / name
    save_for_hf(model, str(folder), safe_serialization=True)
    return folder


def _write(path, data):
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)


@pytest.mark.parametrize(
    ("file", "damage", "named"),
    [
        ("model.safetensors", "truncate", "model.safetensors cannot be loaded"),
        ("model.safetensors", b"", "model.safetensors cannot be loaded"),
        ("config.json", "{not json", "config.json is not valid JSON"),
        ("config.json", "", "config.json is not valid JSON"),
        ("config.json", "[1, 2]", "config.json must hold a JSON object"),
        ("config.json", '{"model_args": {}}', "config.json lacks `architecture`"),
        ("config.json", '{"architecture": "resnet18"}', "config.json names, is a ResNet"),
    ],
)
def test_a_damaged_local_teacher_names_the_file_and_the_fix(
    tmp_path, tiny_vit, capsys, file, damage, named
):
    from vitrank.cli import main

    folder = _local_folder(tmp_path, tiny_vit)
    path = folder / file
    _write(path, path.read_bytes()[: path.stat().st_size // 2] if damage == "truncate" else damage)
    with pytest.raises(ValueError, match="save_for_hf|ViT") as error:
        load_workload(model=f"local-dir:{folder}")
    assert named in str(error.value) and str(folder) in str(error.value)
    # The command line says the same in a line or two and exits 2 (a usage error).
    assert main(["space", "--model", f"local-dir:{folder}"]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and "--verbose" not in err


@pytest.mark.parametrize(
    ("key", "index"),
    [("head.weight", (1,)), ("blocks.1.attn.qkv.weight", (0, 0)), ("pos_embed", (0, 3, 5))],
)
def test_a_teacher_with_nan_is_refused_naming_the_weight(tmp_path, tiny_vit, key, index):
    """Calibration never sees the head: a NaN there ended as "no feasible trial"."""

    def poison(model):
        model.state_dict()[key][index] = float("nan")

    folder = _local_folder(tmp_path, tiny_vit, change=poison)
    with pytest.raises(ValueError, match=rf"but {key} holds \d+ NaN/Inf values"):
        load_workload(model=f"local-dir:{folder}")


@pytest.mark.parametrize(("classes", "rule"), [(0, "no classification head"), (1, "has one class")])
def test_headless_and_one_class_teachers_are_refused_with_the_rule(
    tmp_path, tiny_vit, classes, rule
):
    folder = _local_folder(tmp_path, tiny_vit, num_classes=classes)
    for data in (None, tmp_path / "images"):  # the rule comes before the class-count check
        if data is not None:
            _write_pngs(data, ["a", "b", "c"], per_class=2, size=16)
        with pytest.raises(UnsupportedModelError, match=rule) as error:
            load_workload(model=f"local-dir:{folder}", data=data)
        assert "`num_classes >= 2` must hold" in str(error.value)


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_a_truncated_image_is_refused_at_load_naming_the_file(tmp_path, local_vit, kind):
    _, folder = local_vit
    data = tmp_path / "images"
    _write_pngs(data / "train", ["a", "b", "c"], per_class=2, size=16)
    _write_pngs(data / "val", ["a", "b", "c"], per_class=2, size=16)
    bad = data / "val" / "b" / ("9.png" if kind == "png" else "9.jpg")
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(bad, format=kind.upper())
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(ValueError, match="replace or delete it") as error:
        load_workload(model=f"local-dir:{folder}", data=data)
    assert f"image {bad} is damaged" in str(error.value)


def test_an_image_too_large_to_decode_is_refused_naming_the_file(tmp_path, local_vit, monkeypatch):
    """PIL's decompression-bomb guard (an image of 20000 x 20000 pixels, say) names the
    image like any damaged one; the limit is lowered so that the test image stays small."""
    _, folder = local_vit
    data = tmp_path / "images"
    _write_pngs(data / "train", ["a", "b", "c"], per_class=2, size=16)
    _write_pngs(data / "val", ["a", "b", "c"], per_class=2, size=16)
    bad = data / "val" / "c" / "9.png"
    Image.new("RGB", (64, 64)).save(bad)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 > 2 x 1000: the error
    with pytest.raises(ValueError, match="replace or delete it") as error:
        load_workload(model=f"local-dir:{folder}", data=data)
    assert f"image {bad} is damaged" in str(error.value)


def test_a_symlink_loop_does_not_repeat_images(tmp_path, local_vit):
    """torchvision follows every link: `up -> ..` turned 12 images into thousands."""
    import os
    import warnings

    _, folder = local_vit
    data, shared = tmp_path / "images", tmp_path / "shared"
    _write_pngs(data, ["a", "b", "c"], per_class=4, size=16)
    _write_pngs(shared, ["more"], per_class=3, size=16)
    os.symlink("..", data / "a" / "up")  # a loop back into the tree
    os.symlink(data / "c", data / "b" / "other")  # another class's images
    os.symlink(shared / "more", data / "c" / "shared")  # leaves the tree: followed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        workload = load_workload(model=f"local-dir:{folder}", data=data, calib_size=4)
    assert len(workload.train) + len(workload.val) == 4 + 4 + 4 + 3
    warned = " ".join(str(w.message) for w in caught)
    assert f"{data / 'a' / 'up'} links back into" in warned
    assert f"{data / 'b' / 'other'} links back into" in warned


def test_data_that_is_a_file_is_named_as_a_file(tmp_path, local_vit):
    _, folder = local_vit
    (tmp_path / "images.zip").write_bytes(b"PK")
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        load_workload(model=f"local-dir:{folder}", data=tmp_path / "images.zip")


@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("eva02_tiny_patch14_224", "is a Eva, whose blocks apply rotary position embeddings"),
        ("vit_small_patch16_rope_224", "is a Eva, whose blocks apply rotary"),
        ("vit_relpos_small_patch16_224", "is a VisionTransformerRelPos, whose blocks add a rel"),
        ("resnet18", "is a ResNet, whose blocks are BasicBlocks"),
    ],
)
def test_a_refusal_names_the_class_and_the_block_kind_then_what_works(name, said) -> None:
    """No `vit_*` promise to a vit_* name vitrank refuses; the list of what works is the
    README's."""
    from pathlib import Path

    from vitrank.core.structure import SUPPORTED_MODELS

    with pytest.raises(UnsupportedModelError) as error:
        load_workload(model=name)
    text = str(error.value)
    assert said in text and SUPPORTED_MODELS in text and "vit_*" not in text
    readme = " ".join((Path(__file__).parents[2] / "README.md").read_text().split())
    assert SUPPORTED_MODELS in readme
