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


def test_no_budget_is_the_default_params_budget_and_run_yaml_says_so() -> None:
    settings = SearchSettings()
    assert settings.budget_params == "0.5" and settings.budget_text == "0.5"
    by_flops = SearchSettings(budget_flops=0.4)
    assert by_flops.budget_params is None and by_flops.budget_text == "flops=0.4"
    recorded = yaml.safe_load(by_flops.to_yaml())
    assert recorded["budget_params"] is None and recorded["budget_flops"] == 0.4


@pytest.mark.parametrize(
    "given",
    [
        {"budget_params": "0.5", "budget_flops": 0.5},
        {"budget_params": "abc", "budget_flops": 0.5},  # the value no longer hides behind another
        {"budget_params": "0.5", "budget_latency": 3.0},
        {"budget_flops": 0.5, "budget_latency": 3.0},
    ],
)
def test_two_budgets_are_refused_with_the_fix(given: dict) -> None:
    with pytest.raises(ValueError, match="Give one budget, but got --budget-") as error:
        SearchSettings(**given)
    assert "Keep the one to meet" in str(error.value)


def test_a_given_budget_replaces_the_files_budget_of_another_kind(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("budget_params: '0.3'\ntrials: 5\n")
    settings = resolve_settings(path, budget_flops=0.4)
    assert (settings.budget_params, settings.budget_flops, settings.trials) == (None, 0.4, 5)
    # a run.yaml of a release that recorded the default params budget beside the given one
    path.write_text("budget_params: '0.5'\nbudget_flops: 0.4\n")
    assert SearchSettings.load(path).budget_text == "flops=0.4"


def test_the_cli_refuses_two_budgets_before_any_work(capsys: pytest.CaptureFixture[str]) -> None:
    from vitrank.cli import USAGE_ERROR, main

    code = main(["search", "--budget-params", "0.5", "--budget-flops", "0.5", "--trials", "1"])
    assert code == USAGE_ERROR
    err = capsys.readouterr().err
    assert "Give one budget, but got --budget-params 0.5 and --budget-flops 0.5" in err


def test_a_file_giving_two_budgets_itself_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("budget_params: '0.3'\nbudget_flops: 0.4\n")
    with pytest.raises(ValueError, match="Give one budget"):
        SearchSettings.load(path)
