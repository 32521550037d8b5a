"""CompressionConfig: validation, lossless JSON/YAML round trips, fingerprint checks."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from _spaces_cases import make_tiny_vit, random_specs, variant_model, variant_space
from vitrank.core.spec import AttentionSpec, BlockSpec, MlpSpec
from vitrank.core.structure import inspect_vit
from vitrank.spaces import CompressionConfig

from tests.conftest import TINY_VIT_ARGS


def sample_config(variant: str = "vit", seed: int = 0) -> CompressionConfig:
    space = variant_space(variant)
    config = space.config(random_specs(space, random.Random(seed)))
    provenance = {"run": "r1", "trial": 7, "metrics": {"kl": 0.25, "top1": [0.5, 0.75]}}
    return dataclasses.replace(
        config, provenance=provenance, svd="plain", compensate=True, shrinkage=0.25
    )


def test_round_trips_are_identities(variant: str, tmp_path: Path) -> None:
    for seed in range(5):
        config = sample_config(variant, seed)
        for loaded in (
            CompressionConfig.from_json(config.to_json()),
            CompressionConfig.from_yaml(config.to_yaml()),
            CompressionConfig.from_dict(json.loads(json.dumps(config.to_dict()))),
            CompressionConfig.load(config.save(tmp_path / "c.json")),
            CompressionConfig.load(config.save(tmp_path / "c.yaml")),
        ):
            assert loaded == config
            assert loaded.provenance == config.provenance
            assert loaded.to_dict() == config.to_dict()


def test_model_args_with_tuples_round_trip() -> None:
    config = sample_config()
    config = dataclasses.replace(config, model_args={"img_size": (16, 16), "depth": 3})
    assert CompressionConfig.from_yaml(config.to_yaml()) == config


def test_provenance_is_not_part_of_equality() -> None:
    config = sample_config()
    other = dataclasses.replace(config, provenance={"run": "another"})
    assert other == config
    assert dataclasses.replace(config, svd="whitened") != config


def test_dense_and_replace() -> None:
    space = variant_space("vit")
    dense = CompressionConfig.dense(space.model, space.model_args, space.fingerprint)
    assert all(block.is_dense for block in dense.blocks)
    assert dense == space.dense()
    assert dense.token_schedule == [space.fingerprint.num_tokens] * (len(space.blocks) + 1)


def test_config_for_another_architecture_is_refused() -> None:
    config = sample_config("vit")
    config.check_compatible(config.fingerprint)
    other = variant_space("deit_distilled").fingerprint
    with pytest.raises(ValueError, match="first difference") as error:
        config.check_compatible(other)
    assert "architecture: 'VisionTransformer' != 'VisionTransformerDistilled'" in str(error.value)
    narrower = inspect_vit(make_tiny_vit("vit_small_patch16_224", depth=3, mlp_ratio=3.0))
    with pytest.raises(ValueError, match="blocks.0.mlp_hidden: 128 != 96"):
        config.check_compatible(narrower)


def test_wrong_number_of_blocks_is_refused() -> None:
    config = sample_config()
    with pytest.raises(ValueError, match=r"len\(blocks\) == 3.*len\(blocks\)=2"):
        config.replace(blocks=config.blocks[:2])


BAD = [
    (BlockSpec(AttentionSpec("lowrank", qkv_rank=33, proj_rank=8)), "qkv_rank <= 32", "33"),
    (BlockSpec(AttentionSpec("lowrank", qkv_rank=-1)), "qkv_rank", "-1"),
    (BlockSpec(AttentionSpec("heads", qk_rank=17, vo_rank=4)), "qk_rank <= 16", "17"),
    (BlockSpec(AttentionSpec("heads", qk_rank=0, vo_rank=4)), "1 <= attn.qk_rank", "0"),
    (BlockSpec(AttentionSpec("prune", heads_kept=0)), "heads_kept <= 2", "0"),
    (BlockSpec(AttentionSpec("prune", heads_kept=3)), "heads_kept <= 2", "3"),
    (BlockSpec(mlp=MlpSpec("prune", hidden_kept=129)), "hidden_kept <= 128", "129"),
    (BlockSpec(mlp=MlpSpec("lowrank", fc1_rank=40, fc2_rank=8)), "fc1_rank <= 32", "40"),
    (BlockSpec(merge_ratio=1.0), "merge_ratio < 1", "1.0"),
    (BlockSpec(AttentionSpec("sparse")), "attention op must be one of", "sparse"),
    (BlockSpec(mlp=MlpSpec("moe")), "mlp op must be one of", "moe"),
]


@pytest.mark.parametrize(("spec", "rule", "value"), BAD)
def test_invalid_blocks_are_refused_with_rule_block_and_value(
    spec: BlockSpec, rule: str, value: str
) -> None:
    config = sample_config()
    blocks = (config.blocks[0], spec, config.blocks[2])
    with pytest.raises(ValueError) as error:
        config.replace(blocks=blocks)
    message = str(error.value)
    assert message.startswith("blocks.1:")
    assert rule in message and value in message


def test_heads_refused_with_qk_norm() -> None:
    space = variant_space("qknorm_ls")
    blocks = [BlockSpec(AttentionSpec("heads", qk_rank=4, vo_rank=4))] * len(space.blocks)
    with pytest.raises(ValueError, match="qk_norm=True"):
        space.config(blocks)


def test_bad_settings_are_refused() -> None:
    config = sample_config()
    with pytest.raises(ValueError, match="svd"):
        config.replace(svd="randomized")
    with pytest.raises(ValueError, match="schema_version"):
        config.replace(schema_version=99)
    for bad in (1.0, -0.1, "0.5", True):
        with pytest.raises(ValueError, match="shrinkage"):
            config.replace(shrinkage=bad)


def test_shrinkage_travels_with_the_config_and_must_match_the_factors() -> None:
    """A config records the whitening's shrinkage (a file without it takes the default),
    and `compress` refuses factors whitened with another."""
    from vitrank.core.config import DEFAULT_SHRINKAGE
    from vitrank.core.factorize import FactorCache
    from vitrank.core.model import compress
    from vitrank.evaluators.calibration import calibrate

    config = sample_config().replace(svd="whitened", compensate=False)
    data = config.to_dict()
    assert data["shrinkage"] == 0.25
    del data["shrinkage"]
    assert CompressionConfig.from_dict(data).shrinkage == DEFAULT_SHRINKAGE
    model = variant_model("vit")
    size = TINY_VIT_ARGS["img_size"]
    stats = calibrate(model, torch.randn(8, 3, size, size).split(4), progress=False)
    config = sample_config().replace(svd="whitened", compensate=False, shrinkage=0.25)
    same = FactorCache(model, stats, shrinkage=0.25)
    assert compress(model, config, stats, same).vitrank_config.shrinkage == 0.25
    with pytest.raises(ValueError, match="shrinkage 0.25.*shrinkage 0.5"):
        compress(model, config, stats, FactorCache(model, stats, shrinkage=0.5))


def test_unknown_schema_version_and_damaged_files(tmp_path: Path) -> None:
    config = sample_config()
    data = config.to_dict()
    with pytest.raises(ValueError, match=r"schema_version == 1.*schema_version=2"):
        CompressionConfig.from_dict({**data, "schema_version": 2})
    with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
        CompressionConfig.from_dict({**data, "colour": "red"})
    with pytest.raises(ValueError, match="missing keys \\['blocks'\\]"):
        CompressionConfig.from_dict({k: v for k, v in data.items() if k != "blocks"})
    broken = dict(data, blocks=[{"attn": {"op": "dense", "rank": 3}, "mlp": {}, "merge_ratio": 0}])
    with pytest.raises(ValueError, match="Damaged"):
        CompressionConfig.from_dict(broken)
    path = tmp_path / "c.json"
    path.write_text(config.to_json()[:-40])
    with pytest.raises(ValueError, match=r"c\.json: Damaged compression config \(not valid JSON\)"):
        CompressionConfig.load(path)
    path = tmp_path / "c.yaml"
    path.write_text("blocks: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        CompressionConfig.load(path)
    path.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        CompressionConfig.load(path)
    with pytest.raises(ValueError, match=r"\.json, \.yaml or \.yml"):
        config.save(tmp_path / "c.txt")
