"""`reports.build` and `reports.compare` on synthetic run directories, and `vitrank report`."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from vitrank import reports
from vitrank.cli import main


def test_build_writes_the_report_files(synthetic_run):
    before = (synthetic_run / "trials.parquet").stat().st_mtime_ns
    paths = reports.build(synthetic_run)
    assert paths.html == synthetic_run / "report.html"
    # The search's own trials.parquet is left as it was written.
    assert (synthetic_run / "trials.parquet").stat().st_mtime_ns == before
    trials = pd.read_csv(paths.csv)
    assert len(trials) == 24 and "hover" not in trials.columns
    assert {"number", "proxy", "params", "flops", "feasible"} <= set(trials.columns)


def test_report_html_is_self_contained_and_holds_the_plots_data(synthetic_run):
    run = reports.load_run(synthetic_run)
    text = reports.build(synthetic_run).html.read_text()
    # plotly.js is embedded once: the page needs no network.
    assert "<script src=" not in text
    assert text.count("Plotly.newPlot") >= 4
    for heading in (
        "Pareto front: proxy vs params",
        "Pareto front: proxy vs latency_ms",
        "Winners&#x27; choices per block",
        "Proxy vs fine-tuned accuracy",
        "Hypervolume of the front over trials",
    ):
        assert heading in text
    # Every front trial's hover text (its config summary) is in the page.
    front = run.trials[reports.pareto_front(run.trials, ("proxy", "params"))]
    for number in front["number"]:
        assert f"trial {number}" in text
    assert "b0: " in text  # per-block config summary in the hover
    # Winners with their fine-tuned accuracy, baselines by name, the budget line.
    for winner in reports.winners_table(run).itertuples():
        assert f"{winner.label}: {winner.finetuned_accuracy:.1%}" in text
    assert "uniform_whitened" in text and '"budget"' in text
    assert "Kendall τ" in text


def test_summary_lists_winners_teacher_baselines_and_reuse(synthetic_run):
    text = reports.build(synthetic_run).summary.read_text()
    assert "## Settings" in text and "budget_params: `0.8`" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    names = [line.split("|")[1].strip() for line in table[1:]]
    assert names[0] == "teacher"
    assert sum(name.startswith("W") for name in names) == 3
    assert any(name.startswith("baseline tome") for name in names)
    assert "vitrank apply " in text and "config.json" in text and "vitrank eval " in text


def test_budget_line_is_the_fraction_of_the_teacher(synthetic_run):
    from vitrank.spaces import dense_params

    run = reports.load_run(synthetic_run)
    dense = dense_params(run.winners[0].config.fingerprint)
    assert reports._build.budget_limit(run, "params") == pytest.approx(0.8 * dense)
    assert reports._build.budget_limit(run, "latency_ms") is None


def test_build_into_another_directory_writes_parquet_too(synthetic_run, tmp_path):
    paths = reports.build(synthetic_run, out=tmp_path / "elsewhere")
    table = pd.read_parquet(paths.parquet)
    assert len(table) == 24


def test_winner_metrics_are_read_from_the_run(synthetic_run):
    run = reports.load_run(synthetic_run)
    table = reports.winners_table(run)
    assert table["label"].tolist() == ["W1", "W2", "W3"]
    numbers = [
        json.loads((w.directory / "metrics.json").read_text())["number"] for w in run.winners
    ]
    assert table["number"].tolist() == numbers
    assert table["finetuned_accuracy"].notna().all()


def test_compare_puts_runs_on_one_front(synthetic_run, make_run, tmp_path):
    other = make_run(tmp_path / "run-b", seed=1)
    paths = reports.compare([synthetic_run, other], tmp_path / "cmp")
    text = paths.html.read_text()
    assert "run-a: front" in text and "run-b: front" in text
    # The runs' table is an HTML table, not markdown in a <pre>.
    assert "<pre>" not in text and "<td>run-a</td>" in text and "<td>run-b</td>" in text
    summary = paths.summary.read_text()
    assert "| run-a |" in summary and "| run-b |" in summary
    assert set(pd.read_parquet(paths.parquet)["run"]) == {"run-a", "run-b"}


def test_missing_run_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        reports.build(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no trials.parquet"):
        reports.build(tmp_path / "empty")


def test_cli_report_one_and_several_runs(synthetic_run, make_run, tmp_path, capsys):
    assert main(["report", str(synthetic_run)]) == 0
    assert (synthetic_run / "report.html").is_file()
    other = make_run(tmp_path / "run-b", seed=1)
    assert main(["report", str(synthetic_run), str(other), "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "report.html").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) <= 2 and "does not exist" in error[0]


def test_a_winner_knows_the_workload_of_its_run(synthetic_run):
    run = reports.load_run(synthetic_run)
    winner = run.winners[0]
    assert reports.recorded_workload(winner.config, winner.directory) == {
        "workload": "digits-vit",
        "seed": 0,
    }
    # Outside a run directory, and with no provenance, nothing is known.
    assert reports.recorded_workload(winner.config, synthetic_run) == {}
    applied = winner.config.replace(provenance={"workload": {"model": "local-dir:x", "data": None}})
    assert reports.recorded_workload(applied, synthetic_run) == {"model": "local-dir:x"}


def test_compare_refuses_runs_with_other_objectives(synthetic_run, make_run, tmp_path):
    other = make_run(tmp_path / "run-b", seed=1)
    pareto = json.loads((other / "pareto.json").read_text())
    (other / "pareto.json").write_text(
        json.dumps({**pareto, "objectives": ["proxy", "latency_ms"]})
    )
    with pytest.raises(ValueError, match="must share their objectives"):
        reports.compare([synthetic_run, other], tmp_path / "cmp")


def test_report_out_refuses_another_run_and_leaves_it_as_it_was(
    synthetic_run, make_run, tmp_path, capsys
):
    """`vitrank report A --out B` must not replace run B's trials with A's."""
    other = make_run(tmp_path / "run-b", seed=1)
    before = {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()}
    assert main(["report", str(synthetic_run), "--out", str(other)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "holds a run of its own (run.yaml)" in error[0]
    assert "Traceback" not in error[0]
    (other / "study.db").write_bytes(b"")
    with pytest.raises(FileExistsError, match=r"run.yaml, study.db"):
        reports.build(synthetic_run, out=other)
    # Comparing writes every run's trials into --out: never into a run, not even one compared.
    with pytest.raises(FileExistsError, match="holds a run of its own"):
        reports.compare([synthetic_run, other], synthetic_run)
    after = {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()}
    assert after == {**before, "study.db": b""}
    # The run itself, named as --out, is its own report's place.
    assert reports.build(synthetic_run, out=synthetic_run).html == synthetic_run / "report.html"
