"""`finetune_trainable` inside a real Ray Tune trial reports every epoch (slow, starts Ray)."""

from __future__ import annotations

import os

import pytest


@pytest.mark.slow
@pytest.mark.ray
def test_finetune_trainable_reports_each_epoch_to_tune(digits, tmp_path):
    ray = pytest.importorskip("ray")
    from ray import tune
    from vitrank.evaluators import finetune_trainable
    from vitrank.evaluators.calibration import calibrate
    from vitrank.spaces import allocate, build_space, parse_budget

    import vitrank

    teacher = digits.model
    stats = calibrate(teacher, digits.calib, progress=False)
    space = build_space(teacher, model_name=digits.model_name, model_args=digits.model_args)
    ops = {(i, "mlp"): "prune" for i in range(len(space.blocks))}
    config = allocate(space, parse_budget(0.7), ops, dict.fromkeys(ops, 1.0), [0.0] * len(ops))
    vitrank.save(vitrank.compress(teacher, config, stats), tmp_path / "student")

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tuner = tune.Tuner(
            finetune_trainable,
            param_space={"student_dir": str(tmp_path / "student"), "epochs": 2, "device": "cpu"},
            run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), verbose=0),
        )
        result = tuner.fit().get_best_result(metric="val_accuracy", mode="max")
    finally:
        ray.shutdown()
    assert result.error is None
    history = result.metrics_dataframe
    assert history["epoch"].tolist() == [1, 2]
    assert (history["best_accuracy"] >= history["val_accuracy"]).all()
