"""Tiny workloads for search tests: a random-weight ViT labelled by itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from tests.conftest import TINY_VIT_ARGS, make_tiny_vit

TINY_ARCH = "vit_small_patch16_224"
TINY_ARGS: dict[str, Any] = {**TINY_VIT_ARGS, "depth": 2}


def tiny_workload(seed: int = 0, images: int = 160, **model_args: Any) -> Any:
    """A `Workload` whose labels are the teacher's own predictions (accuracy 1.0);
    `model_args` change the tiny ViT (e.g. ``qk_norm=True``)."""
    from vitrank.workloads import Workload

    args = {**TINY_ARGS, **model_args}
    teacher = make_tiny_vit(TINY_ARCH, seed=seed, **args)
    generator = torch.Generator().manual_seed(seed)
    size = TINY_ARGS["img_size"]
    x = torch.randn(images, 3, size, size, generator=generator)
    with torch.no_grad():
        y = teacher(x).argmax(-1)
    train = TensorDataset(x[: images // 2 + 32], y[: images // 2 + 32])
    val = TensorDataset(x[images // 2 + 32 :], y[images // 2 + 32 :])
    return Workload(
        name="tiny",
        model=teacher,
        model_name=TINY_ARCH,
        model_args=dict(args),
        train=train,
        calib=Subset(train, list(range(32))),
        val=val,
        num_classes=TINY_ARGS["num_classes"],
        input_size=(3, size, size),
    )


@pytest.fixture
def workload() -> Any:
    return tiny_workload()


def tiny_settings(out: Path, **overrides: Any) -> Any:
    """Search settings for a fast in-process run on the tiny workload."""
    from vitrank.search import SearchSettings

    values: dict[str, Any] = dict(
        workload="tiny",
        out=str(out),
        engine="optuna",
        trials=8,
        finetune_top=1,
        finetune_epochs=0,
        promote=0,  # the fidelity ladder has its own tests (test_fidelity.py)
        compensate=False,
        granularity=4,
        calib_size=32,
    )
    values.update(overrides)
    return SearchSettings(**values)


@pytest.fixture(scope="module")
def tiny_problem(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A prepared run directory (cache written) on the tiny workload, and its `Problem`."""
    import torch
    from vitrank.search._problem import prepare, problem
    from vitrank.search._rundir import RunDir, atomic_write_text

    torch.set_num_threads(1)
    settings = tiny_settings(tmp_path_factory.mktemp("prepared") / "run")
    run = RunDir(settings.run_dir())
    run.root.mkdir(parents=True)
    atomic_write_text(run.settings, settings.to_yaml())
    prepare(run, settings, tiny_workload(), log=lambda message: None)
    return problem(run.root)
