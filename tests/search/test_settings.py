from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from vitrank.search import SearchSettings, resolve_settings


def test_yaml_round_trip_is_identity(tmp_path: Path) -> None:
    settings = SearchSettings(budget_params="0.35", ops="lowrank,heads", trials=7, engine="optuna")
    path = tmp_path / "run.yaml"
    path.write_text(settings.to_yaml())
    again = SearchSettings.load(path)
    assert again == settings
    assert again.ops == ("lowrank", "heads")
    assert yaml.safe_load(path.read_text())["trials"] == 7


def test_cli_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"trials": 5, "proxy": "spectral", "seed": 3}))
    settings = resolve_settings(path, trials=9, seed=None)
    assert (settings.trials, settings.proxy, settings.seed) == (9, "spectral", 3)


def test_unknown_setting_is_refused_with_the_known_ones(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"trails": 5}))
    with pytest.raises(ValueError, match="trails.*known"):
        SearchSettings.load(path)


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("engine", "dask", "engine"),
        ("proxy", "flops", "proxy"),
        ("parametrization", "free", "parametrization"),
        ("trials", 0, "trials >= 1"),
        ("objectives", "proxy,accuracy", "objectives"),
        ("finetune_lr", 0.0, "finetune_lr > 0"),
        ("finetune_lr", float("nan"), "finetune_lr > 0"),
        ("finetune_alpha", 1.5, "finetune_alpha <= 1"),
        ("finetune_alpha", float("nan"), "finetune_alpha <= 1"),
    ],
)
def test_bad_values_name_the_rule_and_value(field: str, value: object, rule: str) -> None:
    with pytest.raises(ValueError, match=rule):
        SearchSettings(**{field: value})


def test_objectives_follow_the_budget() -> None:
    assert SearchSettings().objective_names == ("proxy", "params")
    assert SearchSettings(budget_latency=5.0).objective_names == ("proxy", "latency_ms")
    assert SearchSettings(objectives="proxy,flops").objective_names == ("proxy", "flops")


def test_run_dir_is_out_or_a_name_under_runs() -> None:
    assert SearchSettings(out="x/y").run_dir() == Path("x/y")
    assert SearchSettings(name="abc").run_dir() == Path("runs/abc")
    assert SearchSettings().run_dir().parent == Path("runs")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("trials", 5.7, "an integer"),
        ("trials", 5.0, "an integer"),
        ("trials", "five", "an integer"),
        ("granularity", True, "an integer"),
        ("refine", "0.5", "a number"),
        ("cpus_per_trial", False, "a number"),
        ("baselines", "yes", "true or false"),
        ("compensate", 1, "true or false"),
        ("device", 0, "a string"),
        ("engine", None, "a string"),
        ("budget_params", True, "a string, a number or null"),
        ("budget_latency", "20ms", "a number or null"),
        ("ops", ["lowrank", 3], "a list of strings, a string or null"),
    ],
)
def test_run_yaml_values_of_the_wrong_type_name_file_key_type_and_value(
    tmp_path: Path, key: str, value: object, expected: str
) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({key: value}))
    with pytest.raises(ValueError) as error:
        SearchSettings.load(path)
    assert str(error.value) == (
        f"{path}: `{key}` must be {expected}, but got {value!r} ({type(value).__name__})."
    )
    with pytest.raises(ValueError, match=rf"^search settings: `{key}` must be {expected}"):
        SearchSettings(**{key: value})


def test_values_of_the_right_type_are_kept_as_their_field_says(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {"cpus_per_trial": 2, "budget_params": 0.3, "ops": ["lowrank"], "ray_address": None}
        )
    )
    settings = SearchSettings.load(path)
    assert settings.cpus_per_trial == 2.0 and isinstance(settings.cpus_per_trial, float)
    assert (settings.budget_params, settings.ops) == ("0.3", ("lowrank",))
    assert SearchSettings(out=tmp_path / "x").out == str(tmp_path / "x")  # a path is a string
    assert SearchSettings.load(path, trials=9).trials == 9
