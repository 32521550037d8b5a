"""End-to-end searches with the in-process optuna engine on a tiny random ViT."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest
import torch
from vitrank.search import SearchSettings, run_search

from tests.search.conftest import tiny_settings, tiny_workload


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("search") / "run"
    return run_search(tiny_settings(out, trials=10, finetune_epochs=1), tiny_workload())


def _study(run: Path) -> optuna.Study:
    return optuna.load_study(study_name="vitrank", storage=f"sqlite:///{run / 'study.db'}")


def test_run_directory_has_the_design_layout(finished: Path) -> None:
    for name in ("run.yaml", "study.db", "trials.parquet", "pareto.json"):
        assert (finished / name).is_file(), name
    winners = [p for p in (finished / "winners").iterdir() if p.is_dir()]
    assert winners
    for winner in winners:
        for name in ("config.json", "model.safetensors", "metrics.json"):
            assert (winner / name).is_file(), f"{winner.name}/{name}"


def test_trials_table_agrees_with_the_study(finished: Path) -> None:
    table = pd.read_parquet(finished / "trials.parquet")
    trials = _study(finished).trials
    assert len(table) == len(trials) == 10
    assert table["number"].tolist() == [t.number for t in trials]
    for row, trial in zip(table.to_dict("records"), trials, strict=True):
        assert row["state"] == trial.state.name
        assert row["proxy"] == pytest.approx(trial.values[0])
        assert row["params"] == pytest.approx(trial.values[1])
        assert row["feasible"] == (trial.user_attrs["violation"] <= 0)


def test_baselines_are_the_first_trials(finished: Path) -> None:
    table = pd.read_parquet(finished / "trials.parquet")
    expected = ["uniform-plain", "uniform-whitened", "greedy", "asvd", "flar"]
    first = table.head(len(expected))["baseline"].tolist()
    assert first == expected
    assert table["baseline"].iloc[len(expected) :].isna().all()
    skipped = json.loads((finished / "baselines" / "_skipped.json").read_text())
    assert "tome" in skipped


def test_pareto_set_is_feasible_and_non_dominated(finished: Path) -> None:
    table = pd.read_parquet(finished / "trials.parquet").set_index("number")
    pareto = json.loads((finished / "pareto.json").read_text())
    assert pareto["objectives"] == ["proxy", "params"]
    front = table.loc[pareto["front"]]
    assert front["feasible"].all()
    feasible = table[table["feasible"]]
    for _, p in front.iterrows():
        dominated = (feasible["proxy"] <= p["proxy"]) & (feasible["params"] <= p["params"])
        strictly = (feasible["proxy"] < p["proxy"]) | (feasible["params"] < p["params"])
        assert not (dominated & strictly).any()
    assert pareto["budget"]["limit"] == pytest.approx(0.5 * pareto["teacher"]["params"])


def test_winner_loads_and_matches_its_metrics(finished: Path) -> None:
    import vitrank

    pareto = json.loads((finished / "pareto.json").read_text())
    best = min(pareto["points"], key=lambda p: p["proxy"])
    directory = finished / "winners" / f"trial-{best['number']:04d}"
    metrics = json.loads((directory / "metrics.json").read_text())
    model = vitrank.load(directory)
    assert sum(p.numel() for p in model.parameters()) == metrics["params"]
    assert metrics["params"] <= pareto["budget"]["limit"]
    assert 0.0 <= metrics["finetuned_accuracy"] <= 1.0
    assert metrics["finetuned_accuracy"] >= metrics["initial_accuracy"]  # distillation helps here
    assert metrics["latency_ms"] > 0
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)


def test_run_yaml_restarts_the_same_run(finished: Path) -> None:
    settings = SearchSettings.load(finished / "run.yaml")
    assert settings.trials == 10 and settings.engine == "optuna"
    assert settings.run_dir() == finished


def test_an_existing_run_is_not_overwritten_without_resume(finished: Path) -> None:
    with pytest.raises(FileExistsError, match="--resume"):
        from vitrank.search import resolve_run

        resolve_run(SearchSettings.load(finished / "run.yaml"))


def test_resume_extends_a_finished_run_without_rerunning(tmp_path: Path, workload: Any) -> None:
    from vitrank.search import resolve_run

    torch.set_num_threads(1)
    run = run_search(tiny_settings(tmp_path / "run", trials=6, baselines=False), workload)
    before = pd.read_parquet(run / "trials.parquet")
    settings = resolve_run(SearchSettings(out=str(run), resume=True), {"trials": 9, "resume": True})
    assert settings.trials == 9
    run_search(settings, workload)
    after = pd.read_parquet(run / "trials.parquet")
    assert len(after) == 9 and after["number"].is_unique
    kept = after.head(6)[["number", "sampled", "proxy", "datetime_complete"]]
    pd.testing.assert_frame_equal(kept, before[["number", "sampled", "proxy", "datetime_complete"]])


def test_resume_refuses_to_change_the_search(tmp_path: Path, workload: Any) -> None:
    from vitrank.search import resolve_run

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.yaml").write_text(tiny_settings(run).to_yaml())
    with pytest.raises(ValueError, match="budget_params"):
        resolve_run(SearchSettings(out=str(run), resume=True), {"budget_params": "0.3"})


@pytest.mark.parametrize("sampler", ["baseline:greedy"])
def test_a_baseline_runs_alone_as_a_sampler(tmp_path: Path, workload: Any, sampler: str) -> None:
    torch.set_num_threads(1)
    run = run_search(tiny_settings(tmp_path / "run", sampler=sampler), workload)
    table = pd.read_parquet(run / "trials.parquet")
    assert table["baseline"].tolist() == ["greedy"]


def test_expensive_baselines_are_left_out_over_the_time_bound_saying_how_to_run_them(
    tmp_path: Path, workload: Any
) -> None:
    from vitrank.search import run_search
    from vitrank.search.baselines import forward_evaluations

    settings = tiny_settings(tmp_path / "run", trials=6, finetune_top=0, baseline_seconds=1e-9)
    messages: list[str] = []
    run_dir = run_search(settings, workload, log=messages.append)
    skipped = json.loads((run_dir / "baselines" / "_skipped.json").read_text())
    problem_space = pd.read_parquet(run_dir / "trials.parquet")
    assert len(problem_space) == 6
    for name in ("asvd", "flar"):
        assert name in skipped and "--baseline-seconds 0" in skipped[name]
    # the closed-form baselines cost no forward pass: never left out
    assert (run_dir / "baselines" / "uniform-whitened.json").exists()
    assert (run_dir / "baselines" / "greedy.json").exists()
    from vitrank.search._problem import problem

    space = problem(run_dir).space
    assert forward_evaluations("uniform-whitened", space) == 0
    assert forward_evaluations("asvd", space) > 0 and forward_evaluations("flar", space) > 0
    assert any(m.startswith("images: ") and "calibration" in m for m in messages)


def test_a_qk_norm_vit_is_searched_with_the_default_operators(tmp_path: Path) -> None:
    """Blocks that normalise q and k drop head-level ranks only: the space, the sensitivity
    and the search run with every other default operator."""
    import json

    import pandas as pd
    from vitrank.search import run_search
    from vitrank.spaces import CompressionConfig

    from tests.search.conftest import tiny_settings, tiny_workload

    settings = tiny_settings(tmp_path / "run", trials=8, ops=None)
    run = run_search(settings, tiny_workload(qk_norm=True))
    sensitivity = json.loads((run / "cache" / "sensitivity.json").read_text())
    assert not [k for k in sensitivity if k.endswith((".attn.qk", ".attn.vo"))]
    assert any(k.endswith(".attn.qkv") for k in sensitivity)
    assert any(k.endswith(".attn.heads") for k in sensitivity)
    table = pd.read_parquet(run / "trials.parquet")
    ops = {
        b.attn.op for c in table["config"].dropna() for b in CompressionConfig.from_json(c).blocks
    }
    assert "heads" not in ops and ops & {"lowrank", "prune"}
    assert table["feasible"].any()
