"""Run every benchmark script, then write benchmarks/RESULTS.md from benchmarks/results/*.json.

    python benchmarks/run_all.py --quick                 # the whole suite, small settings
    python benchmarks/run_all.py                         # the whole suite, full settings
    python benchmarks/run_all.py --only speed,quality    # some scripts (then RESULTS.md)
    python benchmarks/run_all.py --render-only           # RESULTS.md from the JSON there

Each script runs as its own process (a crash or a hang in one does not lose the others);
the commands, exit codes and wall times land in results/run_all.json, which RESULTS.md
quotes next to each table. The rendering functions below are pure (dict -> markdown).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"
QUICK_LIMIT_S = 20 * 60

# name -> (arguments of a full run, arguments of a --quick run). Budgets for --quick were
# set from timings on the 2-core machine (see RESULTS.md's suite table for the latest).
SCRIPTS: dict[str, tuple[list[str], list[str]]] = {
    "operators": ([], ["--steps", "10", "--threads", "1"]),
    "tokens": ([], ["--quick"]),
    "proxy": ([], ["--configs", "50", "--skip-deit"]),
    "latency_table": ([], []),  # the full run: the figure needs >= 20 configs
    "search_quality": ([], ["--trials", "30"]),
    "speed": ([], ["--quick"]),
    "quality": ([], ["--quick"]),
}
# --quick wall times measured one by one on the 2-core machine (load average 0.7-7, so
# upper bounds): tokens 150 s of CPU, operators 49 s, proxy 45 s, latency_table (full) ~120 s,
# search_quality 67 s, speed 182 s, quality 181 s -- about 14 minutes in all.


# ---- running ------------------------------------------------------------------------


def command_of(name: str, quick: bool) -> list[str]:
    """The argv that runs benchmark `name` (relative script path, from the repo root)."""
    if name not in SCRIPTS:
        raise ValueError(f"Unknown benchmark {name!r}; known: {', '.join(SCRIPTS)}.")
    full, fast = SCRIPTS[name]
    return ["python", f"benchmarks/{name}.py", *(fast if quick else full)]


def run_script(name: str, quick: bool, index: int, total: int) -> dict[str, Any]:
    """Run one benchmark script, streaming its output with a prefix; its record."""
    argv = command_of(name, quick)
    print(f"[{index}/{total}] {' '.join(argv)}", flush=True)
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, *argv[1:]],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    for line in process.stdout:
        print(f"  {name} | {line.rstrip()}", flush=True)
    code = process.wait()
    seconds = time.monotonic() - started
    state = "ok" if code == 0 else f"FAILED (exit {code})"
    print(f"[{index}/{total}] {name}: {state} in {seconds:.0f} s", flush=True)
    return {
        "command": " ".join(argv),
        "exit_code": code,
        "seconds": round(seconds, 1),
        "finished": now(),
        "quick": quick,
    }


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ---- rendering helpers (pure) -------------------------------------------------------


def fmt(value: Any, digits: int = 3) -> str:
    """A number in a table cell: ints with separators, floats to `digits` significant."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if abs(value) >= 10 ** (digits - 1):
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def pct(value: float | None, digits: int = 2) -> str:
    """A fraction as percent (0.9610 -> 96.10 %)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.{digits}f} %"


def times(value: float | None) -> str:
    return "–" if value is None else f"×{value:.2f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; cells are str()-ed, `|` escaped."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(h) for h in headers) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(machine: dict[str, Any] | None, date: str | None = None) -> str:
    """One line naming the machine and date, from any of the scripts' machine records."""
    machine = machine or {}
    cpu = machine.get("cpu") or machine.get("processor") or machine.get("platform") or "?"
    cores = machine.get("cores") or machine.get("cpus") or machine.get("cpu_count")
    threads = machine.get("torch_threads")
    parts = [str(cpu)]
    if cores:
        parts.append(f"{cores} cores")
    if threads:
        parts.append(f"{threads} torch thread{'s' if threads != 1 else ''}")
    if machine.get("torch"):
        parts.append(f"torch {machine['torch']}")
    parts.append(f"device {machine.get('device', 'cpu')}")
    load = machine.get("load_average_at_start") or machine.get("load_average")
    if isinstance(load, dict):
        load = load.get("start")
    if isinstance(load, list | tuple) and load:
        parts.append(f"load average {float(load[0]):.1f} at start")
    when = date or machine.get("date") or machine.get("date_utc") or "date not recorded"
    return f"*Machine:* {', '.join(parts)}. *Date:* {when}."


def provenance(
    data: dict[str, Any], name: str, suite: dict[str, Any] | None, date: str | None = None
) -> str:
    """The machine/date line and the exact command that produced `data`."""
    record = (suite or {}).get("scripts", {}).get(name, {})
    command = data.get("command") or record.get("command") or f"python benchmarks/{name}.py"
    line = machine_line(data.get("machine"), date or data.get("date"))
    # The suite's record speaks for this file only when the file came from that command.
    from_suite = record.get("quick") and record.get("command") == command
    quick = " (a `--quick` run: small settings, not for citing)" if from_suite else ""
    # Blank lines keep machine, command and the text below apart in rendered markdown.
    return f"{line}\n\n*Command:* `{command}`{quick}\n"


# ---- one renderer per benchmark (pure: dict -> markdown) ---------------------------------


def render_operators(data: dict[str, Any], suite: dict[str, Any] | None = None) -> str:
    teacher = data.get("teacher", {})
    out = [
        provenance(data, "operators", suite),
        f"Teacher {data.get('workload', 'digits-vit')}: {fmt(teacher.get('params'))} params, "
        f"accuracy {pct(teacher.get('accuracy'))}. No fine-tuning. Cells: accuracy / "
        "KL(teacher ‖ student).",
        "",
        "Every Linear low rank at one uniform rank ratio:",
        "",
    ]

    def cell(entry: dict[str, Any] | None) -> str:
        entry = entry or {}
        return f"{pct(entry.get('accuracy'))} / {fmt(entry.get('kl'))}"

    out.append(
        table(
            ["removed", "params", "plain SVD", "whitened SVD", "whitened + compensation"],
            [
                [
                    pct(r["removed"], 0),
                    fmt(r.get("whitened", {}).get("params")),
                    cell(r.get("plain")),
                    cell(r.get("whitened")),
                    cell(r.get("whitened+compensation")),
                ]
                for r in data.get("svd", [])
            ],
        )
    )
    out += ["", "Attention only, whitened, equal parameter budget (COMCAT Table 1's setting):", ""]
    out.append(
        table(
            ["attention removed", "params matrix / heads", "matrix", "heads", "heads + comp."],
            [
                [
                    pct(r["removed"], 0),
                    f"{fmt(r.get('matrix_attention_params'))} / "
                    f"{fmt(r.get('head_attention_params'))}",
                    cell(r.get("matrix")),
                    cell(r.get("heads")),
                    cell(r.get("heads+compensation")),
                ]
                for r in data.get("attention", [])
            ],
        )
    )
    checks = {k: v for k, v in data.get("checks", {}).items() if isinstance(v, bool)}
    if checks:
        out += ["", "Checks: " + ", ".join(f"{k}: {fmt(v)}" for k, v in checks.items()) + "."]
    return "\n".join(out)


def render_tokens(data: dict[str, Any], suite: dict[str, Any] | None = None) -> str:
    out = []
    for name, model in data.get("models", {}).items():
        machine = model.get("machine", {})
        out.append(f"**{model.get('model', name)}** ({model.get('tokens', '?')} tokens)")
        out.append(provenance({"machine": machine}, "tokens", suite, machine.get("date_utc")))
        if "teacher_accuracy" in model:
            out.append(f"Teacher accuracy {pct(model['teacher_accuracy'])}.")
        out.append("")
        has_accuracy = any("accuracy" in r for r in model.get("schedules", {}).values())
        headers = ["schedule", "FLOPs ratio", "1 / FLOPs", "speed-up b1", "speed-up b32"]
        headers += ["accuracy"] if has_accuracy else []
        rows = []
        for schedule, row in model.get("schedules", {}).items():
            b1, b32 = row.get("throughput_batch1", {}), row.get("throughput_batch32", {})
            cells = [
                schedule,
                fmt(row.get("flops_ratio")),
                times(1 / row["flops_ratio"]) if row.get("flops_ratio") else "–",
                f"{times(b1.get('ratio'))} (CPU time {times(b1.get('cpu_time_ratio'))})",
                f"{times(b32.get('ratio'))} (CPU time {times(b32.get('cpu_time_ratio'))})",
            ]
            if has_accuracy:
                cells.append(pct(row.get("accuracy")))
            rows.append(cells)
        out += [table(headers, rows), ""]
    out.append("Speed-ups are merged / teacher throughput, timed alternately, one torch thread.")
    return "\n".join(out)


def render_proxy(data: dict[str, Any], suite: dict[str, Any] | None = None) -> str:
    digits = data.get("digits", {})
    out = [provenance(data, "proxy", suite), ""]
    rows = []
    for where, section in (("digits-vit", digits), ("deit_small (random)", data.get("deit_small"))):
        for proxy, speed in (section or {}).get("speed", {}).items():
            cpu = max(
                (v["cpu_candidates_per_s"] for v in speed.values() if isinstance(v, dict)),
                default=None,
            )
            rows.append([where, proxy, fmt(speed.get("candidates_per_s")), fmt(cpu)])
    out.append(
        table(["teacher", "proxy", "candidates / s (wall)", "candidates / s (per CPU s)"], rows)
    )
    fidelity = digits.get("fidelity_vs_val_accuracy", {})
    if fidelity:
        out += [
            "",
            f"Rank fidelity against validation accuracy (no fine-tuning) over "
            f"{digits.get('configs', '?')} random configs:",
            "",
            table(
                ["proxy", "Kendall τ", "Spearman ρ"],
                [
                    [k, fmt(v.get("kendall_tau")), fmt(v.get("spearman_rho"))]
                    for k, v in fidelity.items()
                ],
            ),
        ]
    tuned = digits.get("finetune")
    if tuned:
        out += [
            "",
            f"Distillation fine-tune ({tuned.get('epochs')} epochs) of a "
            f"{pct(tuned.get('params_fraction'), 1)}-parameter config: accuracy "
            f"{pct(tuned.get('val_accuracy_before'))} → {pct(tuned.get('val_accuracy_after'))} "
            f"(teacher {pct(tuned.get('teacher_val_accuracy'))}).",
        ]
    if data.get("must_show"):
        out += ["", "Goals: " + ", ".join(f"{k}: {fmt(v)}" for k, v in data["must_show"].items())]
    return "\n".join(out)


def render_latency_table(data: dict[str, Any], suite: dict[str, Any] | None = None) -> str:
    table_info = data.get("table", {})
    rows = [
        [
            data.get("model", "?"),
            f"{data.get('batch', '?')} / {data.get('threads', '?')} / {data.get('clock', '?')}",
            data.get("configs", "?"),
            pct(data.get("median_relative_error"), 1),
            pct(data.get("median_relative_error_drift_corrected"), 1),
            pct(data.get("max_relative_error"), 1),
            pct(data.get("goal"), 0),
        ]
    ]
    return "\n".join(
        [
            provenance(data, "latency_table", suite),
            "",
            table(
                [
                    "model",
                    "batch / threads / clock",
                    "configs",
                    "median rel. error",
                    "drift-corrected",
                    "max",
                    "goal",
                ],
                rows,
            ),
            "",
            f"Table: {table_info.get('operators', '?')} operators measured in "
            f"{fmt(table_info.get('seconds_to_measure'))} s; dense model "
            f"{fmt(table_info.get('dense_ms'))} ms.",
        ]
    )


def render_search_quality(data: dict[str, Any], suite: dict[str, Any] | None = None) -> str:
    settings = data.get("settings", {})
    out = [
        provenance(data, "search_quality", suite),
        f"Teacher accuracy {pct(data.get('teacher_val_accuracy'))}; "
        f"{settings.get('trials', '?')} trials, {settings.get('parametrization', '?')} "
        f"parametrization (refine {settings.get('refine', '?')}), "
        f"{settings.get('proxy', '?')} proxy, no fine-tuning. The searched config is the "
        "feasible non-baseline trial with the lowest proxy.",
        "",
    ]
    rows = []
    for budget, entry in data.get("budgets", {}).items():
        for label, config in entry.get("configs", {}).items():
            if "skipped" in config:
                rows.append([budget, label, "skipped", "–", "–"])
                continue
            rows.append(
                [
                    budget,
                    label,
                    pct(config.get("val_accuracy")),
                    fmt(config.get("params_fraction")),
                    fmt(config.get("proxy")),
                ]
            )
    out.append(table(["budget", "config", "accuracy", "params fraction", "proxy"], rows))
    by_seed = [
        [
            budget,
            seed,
            pct(v.get("searched_val_accuracy")),
            f"{v.get('best_baseline')} {pct(v.get('best_baseline_val_accuracy'))}",
            "yes" if v.get("searched_beats_every_baseline") else "no",
        ]
        for budget, entry in data.get("budgets", {}).items()
        for seed, v in entry.get("seeds", {}).items()
    ]
    if by_seed:
        out += [
            "",
            "Per seed (calibration subset, held-out batch and sampler):",
            "",
            table(["budget", "seed", "searched", "best baseline", "searched beats all"], by_seed),
        ]
    engines = data.get("engines")
    if engines:
        out += [
            "",
            table(
                ["budget", "trials", "optuna engine", "ray engine", "ray / optuna"],
                [
                    [
                        engines.get("budget"),
                        engines.get("trials"),
                        f"{fmt(engines.get('optuna_s'))} s",
                        f"{fmt(engines.get('ray_s'))} s",
                        fmt(engines.get("ray_over_optuna")),
                    ]
                ],
            ),
        ]
    return "\n".join(out)


def wall_and_cpu(row: dict[str, Any], what: str) -> str:
    """`12.5 s (CPU 12.1 s)` from a row's `<what>_s` and `<what>_cpu_s`."""
    return f"{fmt(row.get(f'{what}_s'))} s (CPU {fmt(row.get(f'{what}_cpu_s'))} s)"


def render_speed(data: dict[str, Any], suite: dict[str, Any] | None = None) -> str:
    out = [provenance(data, "speed", suite), ""]
    setup = data.get("setup", {})
    if setup:
        out.append(
            table(
                [
                    "model",
                    "params",
                    "calibration images",
                    "calibration",
                    "factorization",
                    "total",
                    "measured",
                ],
                [
                    [
                        row.get("model", name),
                        fmt(row.get("params")),
                        row.get("calibration_images"),
                        wall_and_cpu(row, "calibration"),
                        wall_and_cpu(row, "factorization"),
                        f"{fmt(row.get('total_s'))} s",
                        row.get("date", "?"),
                    ]
                    for name, row in setup.items()
                ],
            )
        )
    speedups = data.get("speedups")
    if speedups:
        out += [
            "",
            f"Measured speed-ups on {speedups.get('model')} ({speedups.get('selection')}; "
            f"torch threads: {speedups.get('threads')}; teacher and compressed timed back to "
            "back):",
            "",
            table(
                [
                    "budget",
                    "params",
                    "FLOPs ratio",
                    "1 / FLOPs ratio",
                    "speed-up b1",
                    "speed-up b32",
                    "teacher b1 / b32",
                ],
                [
                    [
                        row.get("budget"),
                        pct(row.get("params_fraction"), 1),
                        fmt(row.get("flops_ratio")),
                        times(row.get("inverse_flops_ratio")),
                        times(row.get("batch1", {}).get("speedup")),
                        times(row.get("batch32", {}).get("speedup")),
                        f"{fmt(row.get('batch1', {}).get('teacher_ms'))} / "
                        f"{fmt(row.get('batch32', {}).get('teacher_ms'))} ms",
                    ]
                    for row in speedups.get("rows", [])
                ],
            ),
        ]
    return "\n".join(out)


def _verdict(met: bool | None) -> str:
    """yes / no, or – where there was no bar (no baseline to compare with)."""
    return "–" if met is None else "yes" if met else "no"


def render_quality(data: dict[str, Any], suite: dict[str, Any] | None = None) -> str:
    settings = data.get("settings", {})
    teacher = data.get("teacher_accuracy")
    images = data.get("val_images")
    teacher_text = f"Teacher accuracy {pct(teacher)}"
    if images:
        teacher_text += f" on {images} validation images (one image = {100 / images:.2f} points)"
    out = [
        provenance(data, "quality", suite),
        f"{teacher_text}. "
        f"Search: {settings.get('trials', '?')} trials per seed and budget ({settings.get('engine', 'optuna')} "
        f"engine, {settings.get('parametrization', '?')} parametrization, {settings.get('proxy', '?')} "
        f"proxy, fidelity ladder over {settings.get('promote', '?')} candidates and the baselines); "
        f"fine-tune: {settings.get('epochs', '?')} epochs of the search's rung 2 for every config alike.",
        "",
    ]
    rows: list[list[str]] = []
    verdicts: list[str] = []
    floor: list[str] = []  # the dense teacher, fine-tuned alike, against the same bar
    wide: list[str] = []  # every pick fully fine-tuned, ranked as rung 2 ranks
    significant: list[str] = []  # baselines ahead of the winner by McNemar's test
    for key, entry in data.get("runs", {}).items():
        for label, config in entry.get("configs", {}).items():
            if "skipped" in config:
                rows.append([key, label, "skipped", "–", "–", "–"])
                continue
            after = config.get("accuracy_after")
            drop = None if teacher is None or after is None else 100 * (teacher - after)
            baseline = config.get("baseline")
            name = label
            if isinstance(baseline, str) and "baseline" not in label:
                name = f"{label} (= {baseline})"
            rows.append(
                [
                    key,
                    name,
                    fmt(config.get("params_fraction")),
                    pct(config.get("accuracy_before")),
                    pct(after),
                    "–" if drop is None else f"{drop:.2f}",
                ]
            )
        reference = entry.get("teacher_finetuned")
        if reference:
            after = reference.get("accuracy_after")
            drop = None if teacher is None or after is None else 100 * (teacher - after)
            rows.append(
                [
                    key,
                    "teacher (dense), same fine-tuning",
                    fmt(1.0),
                    pct(reference.get("accuracy_before")),
                    pct(after),
                    "–" if drop is None else f"{drop:.2f}",
                ]
            )
            floor.append(f"{key}: {_verdict(reference.get('meets_bar'))}")
        ladder = entry.get("ladder", {})
        met = ladder.get("winner_beats_every_baseline")
        if met is not None:
            verdicts.append(f"{key}: {'yes' if met else 'NO'}")
        better = ladder.get("baselines_significantly_better")
        if better is not None:
            significant.append(f"{key}: {', '.join(better) if better else 'none'}")
        widest = ladder.get("full_rung2")
        if widest:
            wide.append(f"{key}: {_verdict(widest.get('meets_bar'))}")
    out.append(
        table(
            [
                "seed/budget",
                "config",
                "params",
                "before fine-tune",
                "after",
                "points below teacher (− above)",
            ],
            rows,
        )
    )
    if verdicts:
        out += ["", "Winner at least as accurate as every baseline: " + "; ".join(verdicts) + "."]
    if significant:
        out += [
            "",
            "Baselines more accurate than the winner after fine-tuning by McNemar's exact test "
            "at 5 %: " + "; ".join(significant) + ".",
        ]
    if floor:
        out += [
            "",
            "The noise floor: the dense teacher, fine-tuned the same way, at least as accurate "
            "as every baseline: " + "; ".join(floor) + ".",
        ]
    if wide:
        out += [
            "",
            "Every pick fully fine-tuned and ranked as rung 2 ranks (by the selection images' "
            "evidence), the first at least as accurate as every baseline: " + "; ".join(wide) + ".",
        ]
    return "\n".join(out)


RENDERERS: dict[str, tuple[str, Callable[..., str]]] = {
    "quality": ("Quality: vitrank's winner vs the baselines (digits)", render_quality),
    "speed": ("Speed: calibration, factorization, measured speed-ups", render_speed),
    "search_quality": ("Search quality and engine overhead (digits)", render_search_quality),
    "proxy": ("Proxies: speed and fidelity", render_proxy),
    "operators": ("Operators: plain vs whitened SVD, matrix vs head level", render_operators),
    "tokens": ("Token merging: FLOPs, throughput, accuracy", render_tokens),
    "latency_table": ("Latency table: predicted vs measured", render_latency_table),
}

NOT_SHOWN = """\
## What these figures do not show

- **No ImageNet.** Nothing here was measured on ImageNet or with pretrained weights: the
  quality figures are on the embedded digits teacher (8×8 images, a 4-block ViT), and the
  deit_small/deit_base figures use random weights, so they say how fast, not how accurate.
- **Single shared CPU.** Timings come from a small CPU machine that may be shared with
  other jobs (the load average is recorded); GPU figures are not part of this file.
- **Published ImageNet figures, for orientation only — theirs, not ours:**

| method (paper) | model | result reported by its authors |
|---|---|---|
| COMCAT (Xiao et al., ICML 2023) | DeiT-S | 79.8 → 79.58 % top-1 at −43.8 % params |
| COMCAT (Xiao et al., ICML 2023) | DeiT-B | 81.8 → 82.26 % top-1 at −61 % params |
| Azizi, Nazemi, Pedram 2024 (arXiv 2402.06004) | DeiT-B | −60 % params with < 1 % top-1 drop |
| ToMe (Bolya et al., ICLR 2023) | ViT-L | 2× throughput for −0.2 … 0.3 % top-1 |
"""


def render_suite(suite: dict[str, Any] | None) -> str:
    """The table of the last run_all invocation: each script's command, time and state."""
    if not suite or not suite.get("scripts"):
        return ""
    rows = [
        [
            name,
            f"`{r['command']}`",
            f"{fmt(r['seconds'])} s",
            "ok" if r["exit_code"] == 0 else f"exit {r['exit_code']}",
            r["finished"],
        ]
        for name, r in suite["scripts"].items()
    ]
    total = sum(r["seconds"] for r in suite["scripts"].values())
    mode = "--quick" if suite.get("quick") else "full"
    return "\n".join(
        [
            f"Last `run_all.py` ({mode}): {fmt(total / 60)} min in all.",
            "",
            table(["benchmark", "command", "wall time", "state", "finished"], rows),
        ]
    )


def render_results(results: dict[str, dict[str, Any]], suite: dict[str, Any] | None = None) -> str:
    """All of RESULTS.md from the benchmarks' JSON (by script name) and run_all's record."""
    parts = [
        "# vitrank benchmark results",
        "",
        "Generated by `python benchmarks/run_all.py` from `benchmarks/results/*.json` — do not "
        "edit by hand. Every table names the machine and date it ran on and the command that "
        "produced it; rerun that command to reproduce it.",
        "",
    ]
    suite_md = render_suite(suite)
    if suite_md:
        parts += [suite_md, ""]
    for name, (title, render) in RENDERERS.items():
        parts.append(f"## {title}")
        parts.append("")
        if name in results:
            try:
                parts.append(render(results[name], suite))
            except (AttributeError, KeyError, TypeError, ValueError, ZeroDivisionError) as error:
                # A script whose JSON changed shape must not hide every other table.
                parts.append(f"*results/{name}.json could not be rendered: {error!r}.*")
        else:
            parts.append(f"*Not run yet: `python benchmarks/{name}.py`.*")
        parts.append("")
    parts.append(NOT_SHOWN)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(parts))


def load_results(directory: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """Every results/<name>.json by name, and run_all's own record (or None)."""
    results: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("*.json")):
        if path.stem == "run_all":
            continue
        try:
            results[path.stem] = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            print(f"skipping {path}: not valid JSON ({error})", file=sys.stderr)
    suite_path = directory / "run_all.json"
    suite = json.loads(suite_path.read_text()) if suite_path.exists() else None
    return results, suite


def render(directory: Path = RESULTS, output: Path = RESULTS_MD) -> Path:
    results, suite = load_results(directory)
    tmp = output.with_suffix(".md.tmp")
    tmp.write_text(render_results(results, suite))
    os.replace(tmp, output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="each script's small settings")
    parser.add_argument("--only", default=None, help=f"comma list of {','.join(SCRIPTS)}")
    parser.add_argument("--render-only", action="store_true", help="only rewrite RESULTS.md")
    args = parser.parse_args(argv)
    failed: list[str] = []
    if not args.render_only:
        names = list(SCRIPTS)
        if args.only:
            names = [n.strip() for n in args.only.split(",") if n.strip()]
            unknown = [n for n in names if n not in SCRIPTS]
            if unknown:
                parser.error(f"unknown --only {unknown}; known: {', '.join(SCRIPTS)}")
        suite_path = RESULTS / "run_all.json"
        suite = json.loads(suite_path.read_text()) if suite_path.exists() else {}
        if not args.only:
            suite = {}  # a whole-suite run replaces the record
        suite.setdefault("scripts", {})
        suite["quick"] = args.quick
        started = time.monotonic()
        for index, name in enumerate(names, 1):
            record = run_script(name, args.quick, index, len(names))
            suite["scripts"][name] = record
            suite["finished"] = now()
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / "run_all.json").write_text(json.dumps(suite, indent=2) + "\n")
            if record["exit_code"] != 0:
                failed.append(name)
        elapsed = time.monotonic() - started
        print(f"suite: {len(names)} scripts in {elapsed / 60:.1f} min", flush=True)
        if args.quick and not args.only and elapsed > QUICK_LIMIT_S:
            print(f"warning: --quick took longer than {QUICK_LIMIT_S / 60:.0f} min", flush=True)
        if failed:
            print(f"failed: {', '.join(failed)}", flush=True)
    print(f"wrote {render()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
