"""The GPU check: one command that proves vitrank's GPU path and writes what it measured.

    bash benchmarks/device_check.sh                        # on a machine with a CUDA GPU
    bash benchmarks/device_check.sh --device cpu --quick   # the same steps, tiny, on a CPU

Steps, each bounded by what is left of `--limit` (default 480 s) and each writing its own
result file as soon as it ends, so a run stopped at its limit keeps what it measured:

1. the `cuda`-marked tests (pytest -m cuda);
2. `benchmarks/scale.py --device D` for deit_small and deit_base, 50 trials, with the GPU's
   share per Ray trial at its default (results/scale_cuda.json);
3. a fashion-vit search on D with the fidelity ladder, in float32, bfloat16 and float16,
   and the teacher's and the winner's latency at batch 1 and 64
   (results/device_search_cuda.json);
4. the machine: GPU name, driver, torch and CUDA versions (results/device_check_cuda.json,
   which also holds every step's status and seconds), then one summary table.

`--quick` shrinks every step (a tiny timm ViT for scale, the digits workload and a few
trials for the search) so that the default test suite runs the script on a CPU; its files
get the suffix `_quick` and go to `--results` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, machine_info, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16", "float16")


def gpu_info() -> dict[str, Any]:
    """The GPU's name, memory and driver, torch's CUDA; empty on a machine without one."""
    import torch

    if not torch.cuda.is_available():
        return {}
    properties = torch.cuda.get_device_properties(0)
    info: dict[str, Any] = {
        "gpu": properties.name,
        "gpu_memory_gb": round(properties.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "bf16_supported": torch.cuda.is_bf16_supported(),
    }
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        info["driver"] = subprocess.run(
            query, capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
    return info


class Steps:
    """Each step under the time left; its status, seconds and output tail recorded."""

    def __init__(self, limit: float) -> None:
        self.deadline = time.monotonic() + limit
        self.record: dict[str, dict[str, Any]] = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, command: list[str], share: float = 1.0) -> bool:
        """`command` with at most `share` of the time left; True when it passed."""
        budget = self.left() * share
        if budget < 5:
            self.record[name] = {"status": "skipped: no time left", "seconds": 0.0}
            print(f"[{name}] skipped: no time left", flush=True)
            return False
        print(f"[{name}] {' '.join(command)}  (at most {budget:.0f} s)", flush=True)
        began = time.monotonic()
        try:
            proc = subprocess.run(
                command, cwd=ROOT, capture_output=True, text=True, timeout=budget,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
            status = "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            tail = (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired as stopped:
            status = "stopped at the time limit"
            out = stopped.stdout or b""
            tail = (out.decode() if isinstance(out, bytes) else out)[-3000:]
        seconds = round(time.monotonic() - began, 1)
        self.record[name] = {"status": status, "seconds": seconds, "output_tail": tail}
        print(f"[{name}] {status} in {seconds} s", flush=True)
        return status == "passed"


def search_step(args: argparse.Namespace) -> dict[str, Any]:
    """The search in each dtype, and teacher vs winner latency at batch 1 and 64."""
    import torch
    from vitrank.core.model import load
    from vitrank.evaluators import measure_latency
    from vitrank.search import SearchSettings, run_search
    from vitrank.workloads import load_workload

    workload_name = "digits-vit" if args.quick else "fashion-vit"
    workload = load_workload(workload_name)
    rows = []
    batches = (1, 8) if args.quick else (1, 64)
    for dtype in DTYPES:
        out = Path(tempfile.mkdtemp(prefix=f"vitrank-device-{dtype}-"))
        settings = SearchSettings(
            workload=workload_name,
            trials=4 if args.quick else 40,
            promote=1 if args.quick else 6,
            baselines=not args.quick,
            heldout_size=32 if args.quick else None,
            finetune_top=1,
            finetune_epochs=1,
            rung_images=64 if args.quick else None,
            finetune_images=64 if args.quick else None,
            calib_size=32 if args.quick else None,
            engine="optuna" if args.quick else "ray",
            device=args.device,
            dtype=dtype,
            out=str(out / "run"),
        )
        began = time.perf_counter()
        run = run_search(settings, workload if args.quick else None, log=lambda line: None)
        wall = time.perf_counter() - began
        winners = sorted((run / "winners").iterdir())
        metrics = json.loads((winners[0] / "metrics.json").read_text()) if winners else {}
        row: dict[str, Any] = {
            "dtype": dtype,
            "end_to_end_seconds": round(wall, 1),
            "phases_seconds": json.loads((run / "timings.json").read_text())["sessions"][-1][
                "seconds"
            ],
            "winner_params": metrics.get("params"),
            "winner_finetuned_accuracy": metrics.get("finetuned_accuracy"),
            "winner_initial_accuracy": metrics.get("initial_accuracy"),
        }
        if winners:
            winner = load(winners[0])
            for batch in batches:
                for label, model in (("teacher", workload.model), ("winner", winner)):
                    result = measure_latency(
                        model, workload.input_size, batch=batch, device=args.device,
                        warmup=5, repeats=20,
                    )  # fmt: skip
                    row[f"{label}_latency_ms_batch{batch}"] = round(float(result.median_ms), 4)
                ratio = (
                    row[f"teacher_latency_ms_batch{batch}"] / row[f"winner_latency_ms_batch{batch}"]
                )
                row[f"speedup_batch{batch}"] = round(ratio, 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return {"workload": workload_name, "runs": rows}


def summary(record: dict[str, Any], search: dict[str, Any] | None) -> str:
    lines = ["step                 status                         seconds"]
    for name, step in record.items():
        lines.append(f"{name:<20} {step['status']:<30} {step['seconds']:>7}")
    for row in (search or {}).get("runs", []):
        speedups = ", ".join(f"{k.removeprefix('speedup_')} x{v}" for k, v in row.items()
                             if k.startswith("speedup_"))  # fmt: skip
        lines.append(
            f"search {row['dtype']:<9} {row['end_to_end_seconds']:>7} s, winner "
            f"{row.get('winner_finetuned_accuracy')}, speed-up {speedups}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the CPU dry run)")
    parser.add_argument("--limit", type=float, default=480.0, help="seconds for everything")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the files go")
    parser.add_argument("--search-step", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    suffix = ("_cuda" if args.device.startswith("cuda") else "_cpu") + (
        "_quick" if args.quick else ""
    )
    if args.search_step:  # the child of step 3: its own process, its own memory
        data = search_step(args)
        write_result(f"device_search{suffix}", {"command": command_line(), **data}, args.results)
        return
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("device_check: no CUDA GPU here; run it with --device cpu --quick.")
    steps = Steps(args.limit)
    python = sys.executable
    steps.run("cuda tests", [python, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"],
              share=0.15)  # fmt: skip
    scale = [python, "benchmarks/scale.py", "--device", args.device]
    if args.quick:
        scale += ["--models", "test_vit", "--trials", "3", "--images", "20"]
    else:
        scale += ["--models", "deit_small_patch16_224,deit_base_patch16_224", "--trials", "50"]
    scale += ["--results", str(args.results), "--name", f"scale{suffix}"]
    steps.run("scale", scale, share=0.5)
    search = [python, __file__, "--search-step", "--device", args.device, "--results",
              str(args.results)] + (["--quick"] if args.quick else [])  # fmt: skip
    steps.run("search in 3 dtypes", search, share=1.0)
    found = args.results / f"device_search{suffix}.json"
    searched = json.loads(found.read_text()) if found.is_file() else None
    write_result(
        f"device_check{suffix}",
        {
            "command": command_line(),
            "machine": {**machine_info(), **gpu_info()},
            "limit_seconds": args.limit,
            "steps": steps.record,
        },
        args.results,
    )
    print(summary(steps.record, searched))
    failed = [n for n, s in steps.record.items() if s["status"] != "passed"]
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
