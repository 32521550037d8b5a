"""On the shipped digits teacher: distillation recovers a half-size model (slow)."""

from __future__ import annotations

import json

import pytest


def _half_size(digits):
    from vitrank.core.factorize import FactorCache
    from vitrank.evaluators.calibration import calibrate
    from vitrank.spaces import allocate, build_space, count_params, parse_budget

    teacher = digits.model
    stats = calibrate(teacher, digits.calib, progress=False)
    space = build_space(teacher, model_name=digits.model_name, model_args=digits.model_args)
    # Pruned heads and hidden units: factorized configs at 50 % lose nothing on the digits
    # teacher, so they would leave fine-tuning nothing to recover.
    ops = {(i, kind): "prune" for i in range(len(space.blocks)) for kind in ("attn", "mlp")}
    config = allocate(
        space, parse_budget(0.5), ops, dict.fromkeys(ops, 1.0), [0.0] * len(space.blocks)
    )
    fraction = count_params(config) / space.dense_params
    return config, stats, FactorCache(teacher, stats), fraction


@pytest.mark.slow
def test_three_epochs_of_distillation_lift_a_half_size_digits_model(digits, tmp_path):
    from vitrank.evaluators import finetune, finetune_trainable

    import vitrank

    config, stats, factors, fraction = _half_size(digits)
    assert 0.4 <= fraction <= 0.5
    student = vitrank.compress(digits.model, config, stats, factors)
    vitrank.save(student, tmp_path / "student")
    result = finetune(student, digits.model, digits.train, digits.val, epochs=3, progress=False)
    # Pruning half the parameters costs the teacher's ~96 % about 16 points; 3 epochs win
    # most of them back.
    assert result.best_accuracy > result.initial_accuracy + 0.05
    assert result.best_epoch >= 1
    assert len(result.history) == 4

    # The Ray Tune trainable runs plain too: load, fine-tune, save, report.
    metrics = finetune_trainable(
        {
            "student_dir": str(tmp_path / "student"),
            "output_dir": str(tmp_path / "tuned"),
            "epochs": 1,
        }
    )
    assert metrics is not None  # run plain (no Tune session): the final metrics come back
    assert metrics["initial_accuracy"] == pytest.approx(result.initial_accuracy)
    assert metrics["best_accuracy"] >= metrics["initial_accuracy"]
    record = json.loads((tmp_path / "tuned" / "finetune.json").read_text())
    assert [h["epoch"] for h in record["history"]] == [0, 1]
    reloaded = vitrank.load(tmp_path / "tuned")
    from vitrank.evaluators import evaluate_accuracy

    assert evaluate_accuracy(reloaded, digits.val) == pytest.approx(metrics["best_accuracy"])
