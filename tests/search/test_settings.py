from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from search import SearchSettings, resolve_settings


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
