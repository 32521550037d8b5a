from __future__ import annotations

import json

import pytest
import torch
from _compress_cases import VARIANTS, build, calibration, count_params, images, model_args
from vitrank.core.factorize import FactorCache
from vitrank.core.spec import AttentionSpec, BlockSpec, MlpSpec
from vitrank.core.structure import inspect_vit
from vitrank.spaces import CompressionConfig
from vitrank.spaces import count_params as config_params

import vitrank

SPECS = (
    BlockSpec(
        AttentionSpec("heads", qk_rank=4, vo_rank=6),
        MlpSpec("lowrank", fc1_rank=10, fc2_rank=12),
        0.25,
    ),
    BlockSpec(AttentionSpec("prune", heads_kept=2), MlpSpec("prune", hidden_kept=48)),
)


def _config(name: str = "vit", **kwargs) -> CompressionConfig:
    arch = VARIANTS[name][0]
    fp = inspect_vit(build(name), arch)
    return CompressionConfig(arch, model_args(name), fp, kwargs.pop("blocks", SPECS), **kwargs)


@pytest.fixture(scope="module")
def teacher_and_stats():
    teacher = build("vit")
    return teacher, calibration(teacher)


def test_compress_save_load_round_trip(tmp_path, teacher_and_stats):
    teacher, stats = teacher_and_stats
    config = _config()
    model = vitrank.compress(teacher, config, stats)
    assert model.vitrank_config is config
    assert count_params(model) == config_params(config) < count_params(teacher)
    vitrank.save(model, tmp_path)
    # config.json is the full CompressionConfig, loadable on its own.
    assert CompressionConfig.load(tmp_path / "config.json") == config
    loaded = vitrank.load(tmp_path)
    assert loaded.vitrank_config == config
    assert torch.equal(loaded(images()), model(images()))
    # A loaded model saves again (the config travels with it).
    vitrank.save(loaded, tmp_path / "again")
    assert torch.equal(vitrank.load(tmp_path / "again")(images()), model(images()))


def test_full_rank_config_reproduces_the_teacher(teacher_and_stats):
    teacher, stats = teacher_and_stats
    fp = inspect_vit(teacher)
    s = fp.blocks[0]
    blocks = (
        BlockSpec(AttentionSpec("heads", qk_rank=s.head_dim, vo_rank=s.head_dim)),
        BlockSpec(AttentionSpec("lowrank", qkv_rank=s.dim, proj_rank=s.dim)),
    )
    for svd in ("whitened", "plain"):
        model = vitrank.compress(teacher, _config(blocks=blocks, svd=svd), stats)
        ref = teacher(images())
        assert (model(images()) - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_reusing_a_factor_cache(teacher_and_stats):
    teacher, stats = teacher_and_stats
    whitened = FactorCache(teacher, stats)
    first = vitrank.compress(teacher, _config(), stats, factors=whitened)
    second = vitrank.compress(teacher, _config(), stats)
    assert torch.equal(first(images()), second(images()))
    with pytest.raises(ValueError, match=r"svd='plain'.*whitened SVD factors"):
        vitrank.compress(teacher, _config(svd="plain"), stats, factors=whitened)


def test_whitened_factors_need_statistics(teacher_and_stats):
    teacher, _ = teacher_and_stats
    blocks = (BlockSpec(mlp=MlpSpec("lowrank", fc1_rank=8, fc2_rank=8)), BlockSpec())
    with pytest.raises(ValueError, match=r"svd='whitened'.*`stats` must be given"):
        vitrank.compress(teacher, _config(blocks=blocks))
    plain = vitrank.compress(teacher, _config(blocks=blocks, svd="plain"))
    assert torch.isfinite(plain(images())).all()


def test_config_for_another_architecture_is_refused(teacher_and_stats):
    _, stats = teacher_and_stats
    other = build("registers")
    with pytest.raises(ValueError, match=r"first difference .*num_tokens: 17 != 20"):
        vitrank.compress(other, _config("vit"), stats)
    with pytest.raises(TypeError, match="CompressionConfig"):
        vitrank.compress(other, {"blocks": []}, stats)


def test_compensation_needs_images_and_runs_with_them(teacher_and_stats):
    teacher, stats = teacher_and_stats
    config = _config(compensate=True)
    with pytest.raises(ValueError, match="images=None"):
        vitrank.compress(teacher, config, stats)
    plain = vitrank.compress(teacher, _config(), stats)
    refined = vitrank.compress(
        teacher, config, stats, images=images(8, seed=2), compensation_steps=5
    )
    assert refined.vitrank_config is config
    x = images(8, seed=2)
    ref = teacher(x)
    # Compensation keeps the best parameters, so it does not end worse on its own data.
    assert (refined(x) - ref).square().mean() <= (plain(x) - ref).square().mean() * 1.001


def test_save_needs_a_compressed_model(tmp_path, teacher_and_stats):
    teacher, _ = teacher_and_stats
    with pytest.raises(ValueError, match="vitrank_config"):
        vitrank.save(teacher, tmp_path)


def test_load_refuses_a_config_that_does_not_fit_its_architecture(tmp_path, teacher_and_stats):
    teacher, stats = teacher_and_stats
    vitrank.save(vitrank.compress(teacher, _config(), stats), tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["model_args"]["img_size"] = 20
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"config.json: .*num_tokens: 17 != 26"):
        vitrank.load(tmp_path)


def test_vitrank_search_is_the_search_even_once_the_package_is_imported(monkeypatch):
    """`vitrank.search` names the package `vitrank.search` too: called, it is the API's
    search, however it was reached."""
    import vitrank.search as package

    import vitrank
    import vitrank.api

    calls = []
    monkeypatch.setattr(vitrank.api, "search", lambda *a, **k: calls.append((a, k)) or "run")
    assert vitrank.search is package and package.SearchSettings is not None
    assert vitrank.search("run.yaml", trials=3) == "run"
    assert calls == [(("run.yaml",), {"trials": 3})]
