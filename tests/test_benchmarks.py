"""benchmarks/run_all.py: RESULTS.md rendering from sample results (no benchmark is run)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

RUN_ALL = Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py"


def _load_script(name: str, path: Path) -> ModuleType:
    """A benchmark script as a module (its folder on sys.path: the scripts import _common)."""
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_all() -> ModuleType:
    return _load_script("vitrank_bench_run_all", RUN_ALL)


MACHINE = {
    "cpu": "Test CPU 9000",
    "cores": 2,
    "torch_threads": 1,
    "torch": "2.14.1",
    "device": "cpu",
    "date": "2026-11-22 03:00 UTC",
}


def quality_sample() -> dict:
    def config(before: float, after: float, baseline: str | float | None = None) -> dict:
        return {
            "trial": 3,
            "baseline": baseline,
            "params_fraction": 0.4987,
            "accuracy_before": before,
            "accuracy_after": after,
        }

    return {
        "machine": MACHINE,
        "command": "python benchmarks/quality.py --quick",
        "teacher_accuracy": 0.9610,
        "val_images": 359,
        "settings": {
            "trials": 30,
            "parametrization": "raw",
            "proxy": "logits",
            "epochs": 3,
            "promote": 6,
        },
        "runs": {
            "seed0/0.5": {
                "configs": {
                    "vitrank winner": config(0.9443, 0.9582, "asvd"),
                    "vitrank best sampled": config(0.9123, 0.9415, float("nan")),
                    "baseline uniform-plain": config(0.8711, 0.9305, "uniform-plain"),
                    "baseline tome": {"skipped": "token merging removes no parameters"},
                },
                "ladder": {
                    "winner_beats_every_baseline": True,
                    "baselines_significantly_better": [],
                    "full_rung2": {"trial": 0, "meets_bar": False},
                },
                "teacher_finetuned": {
                    "accuracy_before": 0.9610,
                    "accuracy_after": 0.9638,
                    "meets_bar": True,
                },
            },
            "seed0/0.35": {
                "configs": {"vitrank winner": config(0.80, 0.90)},
                "ladder": {
                    "winner_beats_every_baseline": False,
                    "baselines_significantly_better": ["baseline asvd"],
                },
            },
        },
    }


def speed_sample() -> dict:
    return {
        "machine": MACHINE,
        "command": "python benchmarks/speed.py --quick",
        "setup": {
            "deit_small": {
                "model": "deit_small_patch16_224 (random weights)",
                "params": 22050664,
                "calibration_images": 8,
                "calibration_s": 12.5,
                "factorization_s": 61.25,
                "total_s": 73.75,
                "date": "2026-11-22 03:30 UTC",
            }
        },
        "speedups": {
            "model": "deit_small_patch16_224 (random weights)",
            "selection": "best spectral proxy of 6 budgeted random-sampler draws",
            "threads": 2,
            "rows": [
                {
                    "budget": "flops=0.5",
                    "params_fraction": 0.61,
                    "flops_ratio": 0.5,
                    "inverse_flops_ratio": 2.0,
                    "batch1": {"teacher_ms": 80.0, "compressed_ms": 50.0, "speedup": 1.6},
                    "batch32": {"teacher_ms": 2000.0, "compressed_ms": 1100.0, "speedup": 1.818},
                }
            ],
        },
    }


def assert_tables_well_formed(markdown: str) -> int:
    """Every markdown table has the same number of cells on each of its rows."""
    tables, current = 0, []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            current.append(len(re.findall(r"(?<!\\)\|", line)))
            continue
        if current:
            assert len(set(current)) == 1, f"ragged table: cell counts {current}"
            assert len(current) >= 3  # header, rule, at least one row
            tables += 1
            current = []
    return tables


def test_quality_section_shows_every_config_and_the_verdicts(run_all: ModuleType) -> None:
    text = run_all.render_quality(quality_sample())
    assert assert_tables_well_formed(text) == 1
    assert "Test CPU 9000" in text and "2026-11-22 03:00 UTC" in text
    assert "`python benchmarks/quality.py --quick`" in text
    assert "96.10 % on 359 validation images (one image = 0.28 points). Search: 30 trials" in text
    assert "| seed0/0.5 | vitrank winner (= asvd) | 0.499 | 94.43 % | 95.82 % | 0.28 |" in text
    assert "| seed0/0.5 | baseline tome | skipped |" in text
    assert "every baseline: seed0/0.5: yes; seed0/0.35: NO." in text
    assert "vitrank best sampled |" in text  # no baseline: no "(= ...)"
    # The noise floor: the dense teacher after the same fine-tuning, against the same bar.
    assert (
        "| seed0/0.5 | teacher (dense), same fine-tuning | 1 | 96.10 % | 96.38 % | -0.28 |" in text
    )
    assert (
        "fine-tuned the same way, at least as accurate as every baseline: seed0/0.5: yes." in text
    )
    assert "ranked as rung 2 ranks (by the selection images' evidence), the first" in text
    assert "at least as accurate as every baseline: seed0/0.5: no." in text
    assert "by McNemar's exact test at 5 %: seed0/0.5: none; seed0/0.35: baseline asvd." in text


def test_speed_section_puts_speedups_next_to_the_flops_ratio(run_all: ModuleType) -> None:
    text = run_all.render_speed(speed_sample())
    assert assert_tables_well_formed(text) == 2
    assert "| flops=0.5 | 61.0 % | 0.5 | ×2.00 | ×1.60 | ×1.82 |" in text
    assert "61.2 s" in text and "73.8 s" in text


def test_full_document_has_every_section_and_what_it_does_not_show(
    run_all: ModuleType,
) -> None:
    suite = {
        "quick": True,
        "scripts": {
            "quality": {
                "command": "python benchmarks/quality.py --quick",
                "exit_code": 0,
                "seconds": 250.0,
                "finished": "2026-11-22 03:40 UTC",
                "quick": True,
            },
            "speed": {
                "command": "python benchmarks/speed.py --quick",
                "exit_code": 1,
                "seconds": 12.0,
                "finished": "2026-11-22 03:41 UTC",
                "quick": True,
            },
        },
    }
    text = run_all.render_results({"quality": quality_sample(), "speed": speed_sample()}, suite)
    assert_tables_well_formed(text)
    for _, (title, _) in run_all.RENDERERS.items():
        assert f"## {title}" in text
    assert "*Not run yet: `python benchmarks/operators.py`.*" in text
    assert "exit 1" in text and "4.37 min" in text  # the suite table: 262 s in all
    assert "a `--quick` run" in text
    not_shown = text.split("## What these figures do not show", 1)[1]
    assert "No ImageNet" in not_shown
    for figure in ("79.8 → 79.58 %", "−43.8 %", "81.8 → 82.26 %", "−61 %", "< 1 %", "2×"):
        assert figure in not_shown
    assert "theirs, not ours" in not_shown


def test_a_result_of_unexpected_shape_does_not_hide_the_others(run_all: ModuleType) -> None:
    text = run_all.render_results({"speed": {"setup": {"x": 3}}, "quality": quality_sample()})
    assert "speed.json could not be rendered" in text
    assert "vitrank winner" in text


def test_search_quality_shows_every_seeds_verdict(run_all: ModuleType) -> None:
    def verdict(searched: float, best: float) -> dict:
        return {
            "searched_val_accuracy": searched,
            "best_baseline": "baseline:asvd",
            "best_baseline_val_accuracy": best,
            "searched_beats_every_baseline": searched > best,
        }

    data = {
        "machine": MACHINE,
        "settings": {"trials": 200, "parametrization": "raw", "refine": 0.75},
        "budgets": {
            "0.5": {
                "configs": {"searched": {"val_accuracy": 0.97, "params_fraction": 0.49}},
                "seeds": {"0": verdict(0.97, 0.96), "1": verdict(0.95, 0.96)},
            }
        },
    }
    text = run_all.render_search_quality(data)
    assert_tables_well_formed(text)
    assert "| 0.5 | 0 | 97.00 % | baseline:asvd 96.00 % | yes |" in text
    assert "| 0.5 | 1 | 95.00 % | baseline:asvd 96.00 % | no |" in text
    assert "refine 0.75" in text


def test_machine_line_reads_each_scripts_machine_record(run_all: ModuleType) -> None:
    # latency_table.py and search_quality.py record their machine differently.
    line = run_all.machine_line(
        {"platform": "Linux-x86_64", "cpus": 2, "torch": "2.14"}, "2026-01-01"
    )
    assert line == ("*Machine:* Linux-x86_64, 2 cores, torch 2.14, device cpu. *Date:* 2026-01-01.")
    assert "date not recorded" in run_all.machine_line({})


def test_commands_use_each_scripts_quick_settings(run_all: ModuleType) -> None:
    assert run_all.command_of("speed", quick=True) == ["python", "benchmarks/speed.py", "--quick"]
    assert run_all.command_of("quality", quick=False) == ["python", "benchmarks/quality.py"]
    assert "--skip-deit" in run_all.command_of("proxy", quick=True)
    for name in run_all.SCRIPTS:
        assert (RUN_ALL.parent / f"{name}.py").exists()
    with pytest.raises(ValueError, match="known: operators"):
        run_all.command_of("nope", quick=True)


def test_render_writes_results_md_from_a_directory(run_all: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "quality.json").write_text(json.dumps(quality_sample()))
    (tmp_path / "broken.json").write_text("{not json")
    output = run_all.render(tmp_path, tmp_path / "RESULTS.md")
    text = output.read_text()
    assert "vitrank winner (= asvd)" in text
    assert "*Not run yet: `python benchmarks/speed.py`.*" in text


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0.0001234, "0.000123"), (54054.5, "54,054"), (8.64, "8.64"), (250.0, "250"), (7, "7")],
)
def test_numbers_are_compact(run_all: ModuleType, value: float, expected: str) -> None:
    assert run_all.fmt(value) == expected


QUALITY = RUN_ALL.parent / "quality.py"


@pytest.fixture(scope="module")
def quality() -> ModuleType:
    return _load_script("vitrank_bench_quality", QUALITY)


def quality_part(seed: int, budget: str, winner: float, teacher: float, **settings) -> dict:
    """A result file of quality.py with one run: the winner and one baseline at 0.89."""
    baseline = {"trial": 0, "baseline": "asvd", "accuracy_after": 0.89}
    return {
        "workload": "fashion-vit",
        "command": f"python benchmarks/quality.py --seeds {seed} --budgets {budget}",
        "machine": MACHINE,
        "wall_s": 100.0 + seed,
        "teacher_accuracy": 0.8882,
        "val_images": 10000,
        "settings": {"seeds": str(seed), "budgets": budget, "lr": 5e-4, "epochs": 1, **settings},
        "runs": {
            f"seed{seed}/{budget}": {
                "seed": seed,
                "budget": budget,
                "ladder": {
                    "winner_beats_every_baseline": winner >= 0.89,
                    "full_rung2": {"meets_bar": False},
                },
                "teacher_finetuned": {
                    "accuracy_after": teacher,
                    "meets_bar": teacher >= 0.89,
                    "best_baseline_after": 0.89,
                },
                "configs": {
                    "vitrank winner": {"trial": 5, "accuracy_after": winner},
                    "baseline asvd": baseline,
                },
            }
        },
    }


def test_quality_merges_runs_split_over_processes(quality: ModuleType, tmp_path: Path) -> None:
    parts = []
    for seed, budget, winner, teacher in ((0, "0.5", 0.891, 0.8899), (1, "0.35", 0.889, 0.8905)):
        path = tmp_path / f"part{seed}.json"
        path.write_text(json.dumps(quality_part(seed, budget, winner, teacher)))
        parts.append(path)
    written = quality.merge(parts, tmp_path / "out")
    assert written.name == "quality_fashion-vit.json"  # the default budgets: the plain name
    merged = json.loads(written.read_text())
    assert list(merged["runs"]) == ["seed0/0.5", "seed1/0.35"]
    assert merged["all_met"] is False and merged["wall_s"] == 101.0
    assert [p["command"] for p in merged["parts"]] == [
        "python benchmarks/quality.py --seeds 0 --budgets 0.5",
        "python benchmarks/quality.py --seeds 1 --budgets 0.35",
    ]
    floor = merged["noise_floor"]
    assert floor["runs"] == 2 and floor["winner_meets_bar"] == 1
    assert floor["teacher_meets_bar"] == 1 and floor["full_rung2_meets_bar"] == 0
    assert floor["best_baseline_minus_teacher_points"] == [0.01, -0.05]


def test_quality_refuses_to_merge_other_settings_or_the_same_run_twice(
    quality: ModuleType, tmp_path: Path
) -> None:
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps(quality_part(0, "0.5", 0.89, 0.89)))
    b.write_text(json.dumps(quality_part(1, "0.5", 0.89, 0.89, epochs=3)))
    c.write_text(json.dumps(quality_part(0, "0.5", 0.88, 0.89)))
    with pytest.raises(SystemExit, match="ran other settings"):
        quality.merge([a, b], tmp_path / "out")
    with pytest.raises(SystemExit, match=r"repeat the runs \['seed0/0.5'\]"):
        quality.merge([a, c], tmp_path / "out")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit, match="is not JSON"):
        quality.merge([a, tmp_path / "bad.json"], tmp_path / "out")
    with pytest.raises(SystemExit, match="cannot read"):
        quality.merge([a, tmp_path / "missing.json"], tmp_path / "out")
    (tmp_path / "other.json").write_text('{"runs": {}}')
    with pytest.raises(SystemExit, match="not a result file of benchmarks/quality.py"):
        quality.merge([a, tmp_path / "other.json"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_quality_result_names_say_what_differs_from_the_defaults(quality: ModuleType) -> None:
    lr = quality.DEFAULT_LR
    assert quality.result_name("digits-vit", lr, {"0.35", "0.5"}) == "quality"
    assert quality.result_name("fashion-vit", 6.25e-5, {"0.5", "0.35"}) == (
        "quality_fashion-vit_lr6.25e-05"
    )
    assert quality.result_name("digits-vit", lr, {"0.2", "0.25"}) == "quality_budgets0.25-0.2"
    assert quality.result_name("fashion-vit", lr, {"0.5"}, every=True) == (
        "quality_fashion-vit_budgets0.5_every"
    )


def test_quality_names_only_baselines_significantly_ahead_of_the_winner(
    quality: ModuleType,
) -> None:
    def pick(winner_only: int, pick_only: int, p: float) -> dict:
        after = {"winner_only_right": winner_only, "pick_only_right": pick_only, "mcnemar_p": p}
        return {"accuracy_after": 0.9, "vs_winner": {"after": after}}

    configs = {
        "vitrank winner": {"trial": 1, "accuracy_after": 0.9},
        "baseline asvd": pick(10, 30, 0.002),  # ahead, significantly
        "baseline flar": pick(10, 14, 0.54),  # ahead, within chance
        "baseline greedy": pick(30, 10, 0.002),  # behind, significantly
        "proxy selection": pick(0, 40, 0.0001),  # not a baseline
    }
    assert quality.significantly_better(configs) == ["baseline asvd"]
    assert quality.significantly_better({"baseline asvd": pick(1, 9, 0.02)}) is None


def test_quality_picks_every_feasible_config_once_when_asked(
    quality: ModuleType, tmp_path: Path
) -> None:
    import pandas as pd

    from tests.reports.conftest import write_run

    run = write_run(tmp_path / "run", trials=24)
    table = pd.read_parquet(run / "trials.parquet")
    feasible = table[table["feasible"]]
    usual = quality.picks(run)
    assert {"vitrank winner", "proxy selection", "vitrank best sampled"} <= set(usual)
    assert not any(label.startswith("trial ") for label in usual)
    every = quality.picks(run, every=True)
    assert set(usual) <= set(every)
    configs = [row["config"] for label, row in every.items() if label not in usual]
    assert len(configs) == len(set(configs))  # each config once, under one label
    chosen = {row["config"] for row in every.values()}
    assert chosen == set(feasible["config"]) | {r["config"] for r in usual.values()}


def test_quality_widest_rung2_ranks_as_the_search_does(quality: ModuleType) -> None:
    """Every pick fine-tuned, ranked by `by_evidence` on the ladder's signal: within its noise
    the better proxy comes first, beyond it the better signal."""

    def pick(trial: int, proxy: float, selected: float, after: float, baseline=None) -> dict:
        return {
            "trial": trial,
            "baseline": baseline,
            "proxy": proxy,
            "selection_accuracy_after": selected,
            "selection_score_after": -1 + selected,  # the ladder's signal (a minus KL)
            "selection_se_after": 0.005,
            "accuracy_after": after,
        }

    configs = {
        "vitrank winner": pick(7, 0.001, 0.900, 0.889),
        "baseline asvd": pick(3, 0.002, 0.905, 0.890, "asvd"),  # within two standard errors
    }
    widest = quality.full_rung2(configs, images=2000)
    assert widest["trial"] == 7 and widest["meets_bar"] is False  # the better proxy first
    configs["baseline asvd"]["selection_score_after"] = -0.05  # far beyond the noise
    assert quality.full_rung2(configs, images=2000)["trial"] == 3
    assert (
        quality.full_rung2({"vitrank winner": configs["vitrank winner"]}, 2000)["meets_bar"] is None
    )


def test_quality_noise_floor_counts_only_runs_with_a_bar(quality: ModuleType) -> None:
    def run(winner: bool | None, teacher: bool | None, lead: float | None) -> dict:
        return {
            "ladder": {
                "winner_beats_every_baseline": winner,
                "baselines_significantly_better": None if winner is None else [],
                "full_rung2": {"meets_bar": winner},
            },
            "teacher_finetuned": {
                "meets_bar": teacher,
                "accuracy_after": 0.9,
                "best_baseline_after": None if lead is None else 0.9 + lead,
            },
        }

    runs = {"a": run(True, True, -0.001), "b": run(False, False, 0.002), "c": run(None, None, None)}
    floor = quality.noise_floor(runs)
    assert floor == {
        "runs": 2,
        "winner_meets_bar": 1,
        "teacher_meets_bar": 1,
        "full_rung2_meets_bar": 1,
        "no_baseline_significantly_better": 2,
        "best_baseline_minus_teacher_points": [-0.1, 0.2],
    }
    assert quality.all_met({"a": runs["a"]}) and not quality.all_met(runs)
    assert not quality.all_met({"c": runs["c"]}) and not quality.all_met({})


def test_the_device_check_runs_its_steps_on_the_cpu(tmp_path):
    """`benchmarks/device_check.sh --device cpu --quick`: the GPU check's every step, tiny,
    so that the script a GPU session runs cannot rot before a GPU comes."""
    import json
    import subprocess

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        ["bash", "benchmarks/device_check.sh", "--device", "cpu", "--quick",
         "--results", str(tmp_path)],
        cwd=root, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check = json.loads((tmp_path / "device_check_cpu_quick.json").read_text())
    assert set(check["steps"]) == {"cuda tests", "scale", "search in 3 dtypes"}
    assert all(step["status"] == "passed" for step in check["steps"].values())
    assert {"cpu", "torch", "date"} <= set(check["machine"])
    search = json.loads((tmp_path / "device_search_cpu_quick.json").read_text())
    assert [row["dtype"] for row in search["runs"]] == ["float32", "bfloat16", "float16"]
    assert all(row["speedup_batch1"] > 0 for row in search["runs"])
    scale = json.loads((tmp_path / "scale_cpu_quick.json").read_text())
    assert scale["models"][0]["model"] == "test_vit" and "error" not in scale["models"][0]
    assert "search float32" in result.stdout  # the summary table
