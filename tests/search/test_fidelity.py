"""The fidelity ladder: promotion, successive halving, resumable distillation, rung 2."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from torch.utils.data import TensorDataset
from vitrank.evaluators.signals import SIGNALS, Measured, measure_signals
from vitrank.search import (
    SearchSettings,
    milestones,
    promotion_pool,
    rank_agreement,
    resolve_run,
    run_search,
)
from vitrank.search._fidelity import Distillation, by_evidence

from tests.conftest import make_tiny_vit
from tests.search.conftest import TINY_ARCH, TINY_ARGS, tiny_settings, tiny_workload

ROOT = Path(__file__).resolve().parents[2]


def _row(number: int, proxy: float, cost: float, baseline: str | None = None, config=None):
    return {
        "number": number,
        "proxy": proxy,
        "cost": cost,
        "feasible": True,
        "baseline": baseline,
        "config": config or f"config-{number}",
    }


def test_milestones_halve_up_to_the_last_report():
    assert milestones(4, 2) == [1, 2, 4]
    assert milestones(6, 2) == [1, 2, 4, 6]
    assert milestones(1, 2) == [1]


def test_promotion_pool_takes_the_best_the_front_and_every_feasible_baseline():
    rows = [_row(i, proxy=1.0 / (i + 1), cost=100.0 + i) for i in range(10)]
    rows += [_row(10, 5.0, 50.0, baseline="asvd"), _row(11, 9.0, 40.0, baseline="greedy")]
    rows.append({**_row(12, 0.01, 99.0, baseline="flar"), "feasible": False})
    rows.append(_row(13, 0.05, 109.0, config="config-9"))  # a repeat of trial 9's config
    pool = promotion_pool(rows, 4)
    numbers = [r["number"] for r in pool]
    assert numbers[:2] == [9, 8]  # half of the four: the best proxies
    assert {10, 11} <= set(numbers)  # every feasible baseline
    assert 12 not in numbers and 13 not in numbers  # infeasible; a repeated config
    assert len(numbers) == len(set(numbers))
    assert promotion_pool(rows, 0) == []


def test_rank_agreement_is_kendall_tau_of_each_rung_against_the_final_accuracy():
    rows = [
        {"proxy": 0.1, "rung1_kl": -0.1, "final_accuracy": 0.95},
        {"proxy": 0.2, "rung1_kl": -0.2, "final_accuracy": 0.90},
        {"proxy": 0.3, "rung1_kl": -0.15, "final_accuracy": 0.80},
        {"proxy": 0.4, "rung1_kl": -0.3, "final_accuracy": None},
    ]
    agreement = rank_agreement(rows)
    assert agreement["proxy"]["tau"] == pytest.approx(1.0)  # lower proxy: better
    assert agreement["proxy"]["count"] == 3 and 0 < agreement["proxy"]["p"] <= 1
    assert agreement["rung1 kl"]["tau"] == pytest.approx(1 / 3)
    # every registered signal at both rungs has its entry (none measured here)
    assert {f"rung{k} {n}" for k in (1, 2) for n in SIGNALS.names()} <= set(agreement)
    assert agreement["rung2 accuracy"]["count"] == 0
    assert math.isnan(rank_agreement(rows[:2])["proxy"]["tau"])
    # Any other signal, e.g. the accuracy as built (higher is better).
    built = rank_agreement(
        [{**r, "built": r["rung1_kl"]} for r in rows], signals=[("built", "built", 1.0)]
    )
    assert set(built) == {"built"} and built["built"]["tau"] == pytest.approx(1 / 3)


def test_signals_within_their_noise_are_ranked_by_the_proxy():
    def rows(images: int) -> list[dict]:
        out = []
        for number, proxy, accuracy in ((1, 0.3, 1.0), (2, 0.1, 0.99), (3, 0.2, 0.9)):
            correct = torch.zeros(images)
            correct[: round(accuracy * images)] = 1
            labels = torch.zeros(images, dtype=torch.long)
            logits = torch.stack([correct, 1 - correct], 1)  # right where `correct`
            m = SIGNALS.get("accuracy").measure(logits, logits, labels)
            out.append({"number": number, "proxy": proxy, "score": m.value, "se": m.se})
        return out

    # one image of 100 below a perfect score is within its noise: the proxy's order stands
    assert [r["number"] for r in by_evidence(rows(100), "score", "se")] == [2, 1, 3]
    # with 10,000 images one point of accuracy is far beyond the noise
    assert [r["number"] for r in by_evidence(rows(10_000), "score", "se")] == [1, 2, 3]


def test_signals_measure_kl_agreement_and_accuracy_per_image():
    teacher = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 1.0]])
    student = torch.tensor([[2.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 0, 1])
    got = measure_signals(student, teacher, labels)
    assert list(got) == list(SIGNALS.names())
    assert got["agreement"].value == pytest.approx(0.75)
    assert got["accuracy"].value == pytest.approx(1.0)
    p = torch.softmax(teacher, -1)
    kl = (p * (p.log() - torch.log_softmax(student, -1))).sum(-1)
    assert got["kl"].value == pytest.approx(-float(kl.mean()))
    assert got["kl"].se == pytest.approx(float(kl.std(unbiased=False)) / 2)
    # a perfect binary score keeps one image's worth of noise
    assert got["accuracy"].se == pytest.approx(0.25)
    assert Measured(0.9, 0.01, 100).beats(Measured(0.8, 0.01, 100))
    assert not Measured(0.81, 0.01, 100).beats(Measured(0.8, 0.01, 100))


def _distillation(seed: int = 0) -> tuple[Distillation, torch.nn.Module]:
    teacher = make_tiny_vit(TINY_ARCH, seed=1, **TINY_ARGS).eval()
    student = make_tiny_vit(TINY_ARCH, seed=2, **TINY_ARGS)
    size = TINY_ARGS["img_size"]
    images = torch.randn(40, 3, size, size, generator=torch.Generator().manual_seed(3))
    train = TensorDataset(images, torch.randint(0, TINY_ARGS["num_classes"], (40,)))
    return Distillation(student, teacher, train, epochs=1.0, batch_size=8, seed=seed), student


def test_a_distillation_stopped_and_resumed_at_a_milestone_is_the_same_run():
    whole, student = _distillation()
    whole.run_to(4)
    first, _ = _distillation()
    first.run_to(2)
    state = first.state_dict()
    resumed, resumed_student = _distillation()
    resumed.load_state_dict(state)
    assert resumed.step == first.boundary(2) > 0
    resumed.run_to(4)
    assert resumed.step == whole.step == whole.total_steps
    for (name, a), (_, b) in zip(
        student.state_dict().items(), resumed_student.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def _ladder_settings(out: Path, **overrides):
    values = dict(trials=10, baselines=True, promote=3, finetune_top=2, finetune_epochs=1)
    return tiny_settings(out, **{**values, **overrides})


def test_every_distillation_of_the_ladder_uses_the_runs_learning_rate_and_alpha(
    tmp_path, monkeypatch
):
    distillation = importlib.import_module("vitrank.evaluators.finetune")  # the function shadows it
    rates: list[float] = []
    alphas: list[float] = []

    class Recording(torch.optim.AdamW):
        def __init__(self, params, lr, **kwargs):
            rates.append(lr)
            super().__init__(params, lr=lr, **kwargs)

    loss = distillation.distillation_loss

    def recording_loss(student, teacher, labels, temperature, alpha):
        alphas.append(alpha)
        return loss(student, teacher, labels, temperature, alpha)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    monkeypatch.setattr(distillation, "distillation_loss", recording_loss)
    settings = _ladder_settings(
        tmp_path / "run", trials=6, promote=1, finetune_top=1, finetune_lr=1e-3,
        finetune_alpha=0.9,
    )  # fmt: skip
    run_search(settings, tiny_workload())
    assert len(rates) >= 2 and set(rates) == {1e-3}  # rung 1's candidates and rung 2's winner
    assert len(alphas) >= 2 and set(alphas) == {0.9}  # every step of both rungs


def test_a_search_records_every_rung_and_ranks_its_winners(tmp_path: Path):
    run = run_search(
        _ladder_settings(tmp_path / "run", finetune_baselines=True, compensate=True),
        tiny_workload(),
    )
    table = pd.read_parquet(run / "trials.parquet")
    promoted = table[table["rung1_score"].notna()]
    feasible_baselines = table[table["feasible"] & table["baseline"].notna()]
    assert set(feasible_baselines["config"]) <= set(promoted["config"])
    assert len(promoted) >= 3
    # successive halving: 1 in 2 go past milestone 1, 1 in 4 past milestone 2
    units = promoted["rung1_units"].astype(int)
    assert (units == 4).sum() == math.ceil(len(promoted) / 4)
    assert (units >= 2).sum() == math.ceil(len(promoted) / 2)
    tuned = table[table["final_accuracy"].notna()]
    assert len(tuned) == 2 and set(tuned["number"]) <= set(promoted["number"])
    ranks = {}
    for metrics_file in (run / "winners").glob("*/metrics.json"):
        metrics = json.loads(metrics_file.read_text())
        ranks[metrics["rank"]] = metrics
        assert metrics["rung1_accuracy"] == pytest.approx(
            float(table.loc[table["number"] == metrics["number"], "rung1_accuracy"].iloc[0])
        )
        signal = metrics["selection_signal"]
        assert signal == "kl" and metrics["selection_score"] == metrics["selection_signals"][signal]
        assert metrics["selection_accuracy"] == metrics["selection_signals"]["accuracy"]
        # the model handed out is never worse by the ladder's signal than the model as
        # built beyond its noise (else it is the model as built)
        history = metrics["finetune_history"]
        built = Measured(history[0]["val_accuracy"], 0.0, 0)
        handed = Measured(metrics["selection_score"], metrics["selection_se"], 0)
        assert not built.beats(handed)
        if metrics["best_epoch"] == 0:
            assert metrics["selection_score"] == pytest.approx(history[0]["val_accuracy"])
    assert sorted(ranks) == [1, 2]
    # rank 1: better by the ladder's signal beyond its noise, else the better proxy
    first, second = ranks[1], ranks[2]
    a = Measured(first["selection_score"], first["selection_se"], 0)
    b = Measured(second["selection_score"], second["selection_se"], 0)
    if a.beats(b) or b.beats(a):
        assert a.beats(b)
    else:
        assert first["proxy"] <= second["proxy"]
    # every registered signal is a column of the trials table, at both rungs
    for name in SIGNALS.names():
        assert promoted[f"rung1_{name}"].notna().all()
        assert table[f"rung2_{name}"].notna().sum() == 2
    rungs = json.loads((run / "rungs.json").read_text())
    assert {"proxy", *(f"rung{k} {n}" for k in (1, 2) for n in SIGNALS.names())} == set(
        rungs["agreement"]
    )
    seconds = rungs["seconds"]
    assert seconds["multi_fidelity_selection"] == pytest.approx(
        seconds["proxy_selection"] + seconds["rung1"] + seconds["rung2"], abs=0.01
    )
    assert not list((run / "cache" / "rungs").glob("*.pt"))  # done candidates leave nothing
    # Every feasible baseline measured against the winner: uncompensated, compensated and
    # fine-tuned alike.
    pareto = json.loads((run / "pareto.json").read_text())
    compared = {e["baseline"]: e for e in pareto["baselines"]}
    assert set(compared) == set(feasible_baselines["baseline"]) and compared
    for entry in compared.values():
        for stage in ("built", "compensated", "finetuned"):
            assert 0.0 <= entry[f"accuracy_{stage}"] <= 1.0
            assert 0.0 < entry[f"vs_winner_{stage}"]["mcnemar_p"] <= 1.0
    assert pareto["winner_accuracy"]["handed_out"] == pytest.approx(ranks[1]["finetuned_accuracy"])
    assert 0.0 <= pareto["winner_accuracy"]["compensated"] <= 1.0
    _check_report(run, compared)
    # Resumed once everything is done, no rung runs again.
    models = {p: p.stat().st_mtime_ns for p in (run / "winners").glob("*/model.safetensors")}
    records = json.loads((run / "rungs.json").read_text())["candidates"]
    lines: list[str] = []
    settings = resolve_run(SearchSettings(out=str(run), resume=True), {"resume": True})
    run_search(settings, tiny_workload(), log=lambda *a: lines.append(" ".join(map(str, a))))
    assert {p: p.stat().st_mtime_ns for p in models} == models
    assert json.loads((run / "rungs.json").read_text())["candidates"] == records
    assert not any(line.startswith("rung") for line in lines), lines


def _check_report(run: Path, compared: dict | None = None) -> None:
    """The report shows the rungs side by side with τ and times, the accuracy front, and
    the teacher's measured latency with each winner's measured speed-up, in HTML tables."""
    from vitrank import reports

    teacher = json.loads((run / "pareto.json").read_text())["teacher"]
    assert teacher["measured_latency_ms"] > 0
    paths = reports.build(run)
    page = paths.html.read_text()
    assert "<pre>" not in page and page.count("<table>") >= 2
    assert "Fidelity ladder" in page and "Kendall τ of the rung1 kl" in page
    assert "selection by the proxy alone took" in page
    assert "Accuracy vs params" in page
    summary = paths.summary.read_text()
    winner_line = next(line for line in summary.splitlines() if line.startswith("| W1 "))
    speedup = winner_line.split("|")[8].strip()  # speed-up (measured)
    assert speedup.endswith("×"), winner_line
    for name, entry in (compared or {}).items():  # each baseline's accuracies and p, both files
        line = next(line for line in summary.splitlines() if f"baseline {name} (" in line)
        cells = [c.strip() for c in line.split("|")]
        assert cells[2] == f"{entry['accuracy_finetuned']:.2%}", line
        assert cells[3] == f"{entry['accuracy_compensated']:.2%}", line
        assert cells[4] == f"{entry['accuracy_built']:.2%}", line
        assert cells[-2].startswith("built "), line
        assert "compensated " in cells[-2], line
        assert f"baseline {name} (" in page


SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from tests.search.conftest import tiny_settings, tiny_workload
from vitrank.api import search
values = dict(trials=10, baselines=True, promote=3, finetune_top=2, finetune_epochs=1,
              rung_epochs=float(sys.argv[2]))
settings = tiny_settings(sys.argv[1], **values)
values = settings.to_dict(); values.pop("workload")
search(workload=tiny_workload(), report=False, **values)
"""


def _rung_records(run: Path) -> dict[str, dict]:
    import optuna

    study = optuna.load_study(study_name="vitrank", storage=f"sqlite:///{run / 'study.db'}")
    return {k: v for k, v in study.user_attrs.items() if k.startswith("rung1:")}


def test_sigkill_during_rung1_then_resume_loses_and_repeats_nothing(tmp_path: Path):
    """Killed while rung 1 distils, the resumed search scores no new trial, keeps every
    candidate finished before the kill as it was, resumes the others from their last
    milestone, and ends with the same rung-1 figures as a search never killed."""
    epochs = "40"  # long enough to be caught mid-way
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(run), epochs],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    checkpoints = run / "cache" / "rungs"
    while not (checkpoints.exists() and list(checkpoints.glob("*.pt"))):
        if proc.poll() is not None:
            raise AssertionError(f"search exited early: {proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, "rung 1 never started"
        time.sleep(0.1)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _rung_records(run)
    trials_before = pd.read_parquet(run / "trials.parquet")["number"].tolist()
    assert before or list(checkpoints.glob("*.pt")), "killed before rung 1 had done anything"
    torch.set_num_threads(1)
    settings = resolve_run(SearchSettings(out=str(run), resume=True), {"resume": True})
    resumed = run_search(settings, tiny_workload())
    after = _rung_records(resumed)
    assert pd.read_parquet(resumed / "trials.parquet")["number"].tolist() == trials_before
    for key, record in before.items():
        assert after[key] == record  # finished before the kill: not run again
    reference = run_search(
        _ladder_settings(tmp_path / "whole", rung_epochs=float(epochs)), tiny_workload()
    )
    whole = _rung_records(reference)
    assert set(after) == set(whole)
    for key in whole:
        assert after[key]["curve"] == pytest.approx(whole[key]["curve"], abs=0)
        assert after[key]["steps"] == whole[key]["steps"]


def test_rung1_keeps_to_its_time_bound_and_says_how_to_lift_it(tmp_path: Path):
    lines: list[str] = []
    settings = _ladder_settings(
        tmp_path / "run", promote=4, finetune_top=0, rung_epochs=20.0, rung_images=2048,
        rung_seconds=4.0,
    )  # fmt: skip
    run = run_search(settings, tiny_workload(), log=lambda *a: lines.append(" ".join(map(str, a))))
    said = next(line for line in lines if line.startswith("rung 1 bounded to 4 s"))
    assert "--rung-seconds 0 lifts the bound" in said
    plan = json.loads((run / "cache" / "rung1_plan.json").read_text())
    assert plan["images"] < 2048
    # Within the bound, or at the plan's floor (the fewest images; the proxy's best and
    # the baselines, which always stay), where the deadline ends rung 1 instead.
    table = pd.read_parquet(run / "trials.parquet")
    kept = table[table["number"].isin(plan["numbers"])]
    floor = plan["images"] == 32 and kept["baseline"].isna().sum() <= 1
    assert plan["seconds"] <= 4.0 or floor, plan
    timings = json.loads((run / "timings.json").read_text())
    assert timings["sessions"][-1]["seconds"]["rung1"] <= 4.0 * 2, timings


def test_rung1_stops_at_its_bound_even_where_the_plan_was_short(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan whose estimate was too low (here: a bound already spent once the first
    milestone is reached) still ends rung 1 at its bound: every candidate is recorded at
    the first milestone, and the run says so."""
    from vitrank.search import _fidelity

    planned = _fidelity.rung1_plan

    def short(*args: Any, **kwargs: Any) -> Any:
        plan = planned(*args, **kwargs)
        return dataclasses.replace(plan, bound=1e-6)

    monkeypatch.setattr(_fidelity, "rung1_plan", short)
    lines: list[str] = []
    settings = _ladder_settings(tmp_path / "run", promote=3, finetune_top=0, rung_seconds=0)
    run = run_search(settings, tiny_workload(), log=lambda *a: lines.append(" ".join(map(str, a))))
    assert any("rung 1 reached its time bound after milestone 1" in line for line in lines)
    table = pd.read_parquet(run / "trials.parquet")
    promoted = table[table["rung1_score"].notna()]
    assert len(promoted) >= 3 and (promoted["rung1_units"] == 1).all()
