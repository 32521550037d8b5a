"""Stopping, resuming and checking before work, as a user meets them: one row per case.

Every case runs the `vitrank` command line as a user would (the digits default on the Ray
engine, small), and records what the user saw: the exit status, whether the resume line
was printed, whether a traceback leaked, and the state the run directory was left in.

    python benchmarks/stop_cases.py                      # this checkout
    python benchmarks/stop_cases.py --source OLD --name stop_cases_before
        # another checkout's sources (its own top-level packages on PYTHONPATH), for a
        # before / after table of the same cases

Writes results/<name>.json (default stop_cases.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine_info, write_result  # noqa: E402

SMALL = [
    "--trials", "12", "--calib-size", "32", "--promote", "3", "--finetune-top", "1",
    "--finetune-epochs", "1", "--rung-images", "256", "--finetune-images", "256",
]  # fmt: skip
PHASES = {
    "trials": lambda run, err: _completed(run / "study.db") >= 8,
    "rung 1": lambda run, err: "rung 1 candidates:" in err or "rung 1 distillation parts:" in err,
    "rung 2": lambda run, err: "rung 2: fine-tuning" in err,
}


def _completed(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=5) as connection:
            query = "SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'"
            return int(connection.execute(query).fetchone()[0])
    except sqlite3.Error:
        return 0


def _states(db: Path) -> dict[str, int]:
    try:
        with sqlite3.connect(db, timeout=5) as connection:
            rows = connection.execute("SELECT state, COUNT(*) FROM trials GROUP BY state")
            return {state: int(count) for state, count in rows.fetchall()}
    except sqlite3.Error:
        return {}


class Runner:
    """`vitrank` of one checkout: this one (the installed command) or `source`'s."""

    def __init__(self, source: Path | None, work: Path) -> None:
        self.work = work
        self.env = dict(os.environ)
        if source is not None:
            self.env["PYTHONPATH"] = str(source)
        self.command = [sys.executable, "-m", "vitrank"]

    def run(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*self.command, *args], cwd=self.work, env=self.env, capture_output=True,
            text=True, timeout=timeout,
        )  # fmt: skip

    def stop_in(self, phase: str, signum: int, run: Path) -> dict[str, Any]:
        err_path = run.with_suffix(".stderr")
        with open(err_path, "w") as err:
            proc = subprocess.Popen(
                [*self.command, "search", *SMALL, "--out", str(run)], cwd=self.work,
                env=self.env, stdout=subprocess.DEVNULL, stderr=err, text=True,
            )  # fmt: skip
        deadline, reached = time.monotonic() + 600, False
        while proc.poll() is None and time.monotonic() < deadline:
            if PHASES[phase](run, err_path.read_text()):
                reached = True
                time.sleep(1.5 if phase == "rung 2" else 0.0)
                break
            time.sleep(0.1)
        if reached and proc.poll() is None:
            proc.send_signal(signum)
        try:
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err = err_path.read_text()
        return {
            "reached_phase": reached,
            "exit": proc.returncode,
            "resume_line": "--resume" in err,
            "traceback": "Traceback" in err,
            "states": _states(run / "study.db"),
        }


def _winners(run: Path) -> list[dict[str, Any]]:
    found = []
    for directory in sorted((run / "winners").glob("trial-*")):
        try:
            metrics = json.loads((directory / "metrics.json").read_text())
        except (OSError, ValueError):
            metrics = {}
        found.append({"dir": str(directory), **metrics})
    return found


def _nan_files(run: Path) -> list[str]:
    """vitrank's JSON files that hold a bare NaN/Infinity (tune/ is Ray Tune's own state)."""
    bad = []
    for path in sorted(run.rglob("*.json")):
        if path.relative_to(run).parts[0] == "tune":
            continue

        def refuse(name: str) -> None:
            raise ValueError(name)

        try:
            json.loads(path.read_text(), parse_constant=refuse)
        except ValueError:
            bad.append(str(path.relative_to(run)))
    return bad


def signal_case(runner: Runner, phase: str, signum: int, work: Path) -> dict[str, Any]:
    run = work / f"{phase.replace(' ', '')}-{signal.Signals(signum).name}"
    row = runner.stop_in(phase, signum, run)
    resumed = runner.run("search", "--out", str(run), "--resume")
    winners = _winners(run)
    first = [w for w in winners if w.get("rank") == 1]
    row.update(
        resume_exit=resumed.returncode,
        resume_fetch_warnings="Failed to fetch metrics" in resumed.stderr,
        states_after_resume=_states(run / "study.db"),
        rank1_winners=len(first),
        nan_json_files=_nan_files(run),
    )
    if len(first) == 1 and "finetuned_accuracy" in first[0]:
        measured = runner.run("eval", first[0]["dir"], "--json")
        if measured.returncode == 0:
            accuracy = json.loads(measured.stdout)["accuracy"]
            row["eval_matches_metrics"] = abs(accuracy - first[0]["finetuned_accuracy"]) < 1e-9
    return row


def refusal(result: subprocess.CompletedProcess, **extra: Any) -> dict[str, Any]:
    err = result.stderr.strip().splitlines()
    return {
        "exit": result.returncode,
        "traceback": "Traceback" in result.stderr,
        "message": err[-1][:300] if err else "",
        **extra,
    }


def check_cases(runner: Runner, work: Path) -> dict[str, Any]:
    cases: dict[str, Any] = {}
    base = work / "base"
    finished = runner.run("search", *SMALL, "--out", str(base))
    cases["finished_run_strict_json"] = {
        "exit": finished.returncode,
        "nan_json_files": _nan_files(base),
    }
    both = runner.run("search", *SMALL, "--budget-params", "0.5", "--budget-flops", "0.5",
                      "--out", str(work / "two"), timeout=600)  # fmt: skip
    pareto = work / "two" / "pareto.json"
    budget = json.loads(pareto.read_text()).get("budget") if pareto.is_file() else None
    cases["two_budgets"] = refusal(both, pareto_budget=budget)
    cases["two_budgets_params_unparsable"] = refusal(
        runner.run(
            "search",
            "--budget-params",
            "abc",
            "--budget-flops",
            "0.5",
            "--trials",
            "1",
            "--out",
            str(work / "abc"),
            timeout=600,
        )  # fmt: skip
    )
    winner = next(iter(sorted((base / "winners").glob("trial-*"))), None)
    if winner is None:
        return cases
    data = json.loads((winner / "config.json").read_text())
    data["model_args"]["embed_dim"] = 2 * data["model_args"]["embed_dim"]
    edited = work / "edited.json"
    edited.write_text(json.dumps(data))
    applied = runner.run("apply", str(edited), "--out", str(work / "applied"))
    loads = None
    if applied.returncode == 0:
        loads = runner.run("eval", str(work / "applied")).returncode == 0
    cases["apply_edited_model_args"] = refusal(applied, result_loads=loads)
    copy = work / "export"
    shutil.copytree(winner, copy)
    exported = runner.run("export", str(copy), "--onnx", str(copy / "model.safetensors"))
    cases["export_onto_own_weights"] = refusal(
        exported, model_still_loads=runner.run("eval", str(copy)).returncode == 0
    )
    cases["export_onto_a_directory"] = refusal(
        runner.run("export", str(winner), "--onnx", str(work))
    )
    deep = work / "deep"
    shutil.copytree(winner, deep)
    (deep / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    cases["config_nested_100000_deep"] = refusal(runner.run("eval", str(deep)))
    cases["device_empty"] = refusal(
        runner.run("search", "--device", "", "--trials", "1", "--out", str(work / "dev"))
    )
    cases["decompression_bomb"] = refusal(
        runner.run("eval", str(winner), "--data", str(_bomb(work)))
    )
    return cases


def _bomb(work: Path) -> Path:
    """An ImageFolder for the digits teacher (ten classes) with one 20000 x 20000 PNG."""
    from PIL import Image

    root = work / "bomb"
    for split in ("train", "val"):
        for label in map(str, range(10)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("L", (8, 8), color=40 * i).save(folder / f"{i}.png")
    Image.new("1", (20000, 20000)).save(root / "val" / "9" / "big.png")
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=None, help="another checkout to run")
    parser.add_argument("--name", default="stop_cases", help="result file name")
    parser.add_argument("--skip-signals", action="store_true", help="only the checks")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vitrank-stop-"))
    runner = Runner(args.source.resolve() if args.source else None, work)
    rows: dict[str, Any] = {}
    if not args.skip_signals:
        for phase in PHASES:
            for signum in (signal.SIGINT, signal.SIGTERM):
                key = f"{signal.Signals(signum).name} during {phase}"
                print(f"{key} ...", flush=True)
                rows[key] = signal_case(runner, phase, signum, work)
                print(f"  {rows[key]}", flush=True)
    print("checks before work ...", flush=True)
    rows.update(check_cases(runner, work))
    for key, row in rows.items():
        print(f"{key}: {row}")
    source = str(args.source) if args.source else "this checkout"
    write_result(
        args.name,
        {"command": command_line(), "machine": machine_info(), "source": source, "cases": rows},
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
