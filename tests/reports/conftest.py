"""A synthetic run directory in the layout a search writes (see search's `RunDir`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import make_tiny_vit

TEACHER_DEPTH = 3


def _configs(count: int, seed: int) -> list:
    """`count` random but valid configs of a 3-block tiny ViT."""
    from vitrank.core.spec import AttentionSpec, BlockSpec, MlpSpec
    from vitrank.core.structure import inspect_vit
    from vitrank.spaces import CompressionConfig

    model = make_tiny_vit(depth=TEACHER_DEPTH)
    fingerprint = inspect_vit(model, "vit_small_patch16_224")
    rng = np.random.default_rng(seed)
    shape = fingerprint.blocks[0]
    attention = [
        AttentionSpec(),
        AttentionSpec("lowrank", qkv_rank=8, proj_rank=8),
        AttentionSpec("heads", qk_rank=4, vo_rank=8),
        AttentionSpec("prune", heads_kept=1),
    ]
    mlp = [MlpSpec(), MlpSpec("lowrank", fc1_rank=8, fc2_rank=16), MlpSpec("prune", hidden_kept=64)]
    configs = []
    for _ in range(count):
        blocks = tuple(
            BlockSpec(
                attention[rng.integers(len(attention))],
                mlp[rng.integers(len(mlp))],
                float(rng.choice([0.0, 0.25])),
            )
            for _ in fingerprint.blocks
        )
        configs.append(
            CompressionConfig(
                "vit_small_patch16_224", {"depth": TEACHER_DEPTH}, fingerprint, blocks
            )
        )
    assert shape.mlp_hidden == 128
    return configs


def write_run(root: Path, trials: int = 24, seed: int = 0, winners: int = 3) -> Path:
    """A run directory: run.yaml, trials.parquet, pareto.json, winners/<id>/."""
    from vitrank.spaces import count_flops, count_params, dense_params

    configs = _configs(trials, seed)
    dense = dense_params(configs[0].fingerprint)
    rng = np.random.default_rng(seed)
    rows = []
    for number, config in enumerate(configs):
        params = count_params(config)
        # A proxy that falls as parameters grow, with noise: a real-looking front.
        proxy = float((dense / params - 1.0) + 0.3 * rng.random())
        violation = (params - 0.8 * dense) / (0.8 * dense)
        # The columns of search's trials table (search/_table.py).
        rows.append(
            dict(
                number=number,
                state="COMPLETE",
                proxy=proxy,
                params=float(params),
                flops=float(count_flops(config)),
                latency_ms=float(0.1 + params / dense + 0.01 * rng.random()),
                cost=float(params),
                violation=violation,
                feasible=violation <= 0,
                baseline={0: "uniform_whitened", 1: "tome"}.get(number),
                interrupted=False,
                config=config.to_json(indent=None),
                sampled="{}",
                duration_s=0.1,
                **{"proxy.kl": proxy, "proxy.agreement": 0.9},
            )
        )
    table = pd.DataFrame(rows)
    root.mkdir(parents=True, exist_ok=True)
    (root / "run.yaml").write_text(
        yaml.safe_dump(
            {"workload": "digits-vit", "budget_params": "0.8", "trials": trials, "seed": seed}
        )
    )
    table.to_parquet(root / "trials.parquet", index=False)
    from vitrank.reports import pareto_front

    front = table[pareto_front(table, ("proxy", "params"))].sort_values("params")
    chosen = front["number"].tolist()[:winners]
    (root / "pareto.json").write_text(
        json.dumps(
            {
                "objectives": ["proxy", "params"],
                "front": front["number"].tolist(),
                "points": [],
                "budget": {"kind": "params", "text": "params=0.8", "limit": 0.8 * dense},
                "teacher": {"params": float(dense), "flops": 1.0e6, "accuracy": 0.95},
                "trials": trials,
                "feasible": int(table["feasible"].sum()),
            }
        )
    )
    for rank, number in enumerate(chosen):
        directory = root / "winners" / f"trial-{number:04d}"
        directory.mkdir(parents=True)
        config = configs[number].replace(provenance={"run": root.name, "trial": number})
        config.save(directory / "config.json")
        record = table.iloc[number]
        # The keys of search's winners' metrics.json (search/_winners.py).
        (directory / "metrics.json").write_text(
            json.dumps(
                {
                    "number": int(number),
                    "baseline": record["baseline"],
                    "proxy": float(record["proxy"]),
                    "compressed_accuracy": 0.7 - 0.05 * rank,
                    "initial_accuracy": 0.7 - 0.05 * rank,
                    "params": int(record["params"]),
                    "params_built": int(record["params"]),
                    "flops": int(record["flops"]),
                    "finetuned_accuracy": 0.9 - 0.05 * rank,
                    "finetune_history": [{"epoch": 0, "val_accuracy": 0.7}],
                    "finetune_epochs": 1,
                    "latency_ms": float(record["latency_ms"]) * 1.1,
                    "latency_batch": 1,
                    "latency_device": "cpu",
                }
            )
        )
    return root


@pytest.fixture
def synthetic_run(tmp_path: Path) -> Path:
    return write_run(tmp_path / "run-a")


@pytest.fixture
def make_run():
    """Factory: `make_run(root, trials=24, seed=0, winners=3)` -> a synthetic run directory."""
    return write_run
