"""Real-size cost of the whole search: DeiT-Ti/S/B at 224 px -> results/scale.json.

    python benchmarks/scale.py [--models deit_tiny_patch16_224,...] [--device cpu|cuda]
                               [--trials 50] [--images 300]

For each model (random weights, a 5-class head) and a generated ImageFolder of 256-px JPEGs,
one whole search runs as a user would run `vitrank search --model M --data DIR --trials 50
--promote 0 --finetune-top 0 --engine optuna --device D`, with every other setting at its
default. Each
model runs in its own process, so its peak memory is its own. Recorded per model: wall time
end to end, seconds per phase (the run's timings.json), the images each phase used, median
seconds per trial, peak RSS (and max CUDA memory allocated), and the run's cache size on
disk. With `--device cuda` the same on the GPU, whose name is recorded; results go to
scale.json (CPU) or scale_cuda.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import comma_list, machine_info, write_result

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224")
CLASSES = 5


def make_images(root: Path, count: int, size: int = 256, seed: int = 0) -> Path:
    """An ImageFolder of `count` seeded JPEGs in `CLASSES` classes (colour blobs on noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for index in range(count):
        label = index % CLASSES
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        y, x = np.mgrid[:size, :size]
        cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
        blob = (y - cy) ** 2 + (x - cx) ** 2 < (size // 6) ** 2
        pixels[blob] = np.array([60 * label % 255, 255 - 40 * label, 120], dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:04d}.jpg", quality=90)
    return root


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """One search in this process; its figures as a dict (printed as JSON by --one)."""
    import torch
    from vitrank.search import SearchSettings, run_search

    run = Path(args.run)
    # --defaults: every setting at its default (rung 1 included) but for rung 2's
    # fine-tuning; else no fine-tuning at all: neither rung 1 nor rung 2.
    chosen = {} if args.defaults else {"trials": args.trials, "promote": 0, "engine": args.engine}
    settings = SearchSettings(
        workload=None,
        model=args.one,
        data=str(args.data),
        finetune_top=0,
        device=args.device,
        out=str(run),
        **chosen,
    )
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    run_search(settings)
    wall = time.perf_counter() - began
    timings = json.loads((run / "timings.json").read_text())["sessions"][-1]
    result: dict[str, Any] = {
        "model": args.one,
        "end_to_end_seconds": round(wall, 1),
        "phases_seconds": timings["seconds"],
        "trial_median_seconds": timings["trial_median_seconds"],
        "device": timings["device"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cache_mb": round(_folder_bytes(run / "cache") / 2**20, 1),
        "cache_files_mb": {
            p.name: round(p.stat().st_size / 2**20, 1)
            for p in sorted((run / "cache").iterdir())
            if p.is_file()
        },
        "trials": settings.trials,
        "promote": settings.promote,
        "engine": settings.engine,
    }
    plan = run / "cache" / "rung1_plan.json"
    if plan.is_file():
        result["rung1_plan"] = json.loads(plan.read_text())
    if args.device.startswith("cuda"):
        result["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument(
        "--engine", default="optuna", help="optuna, or ray (each trial asks for the default "
        "share of the GPU on a GPU device)",
    )  # fmt: skip
    parser.add_argument(
        "--defaults", action="store_true", help="every search setting at its default (rung 1 "
        "included; --trials and --engine are ignored) but --finetune-top 0",
    )  # fmt: skip
    parser.add_argument("--results", type=Path, default=None, help="folder of the result file")
    parser.add_argument("--name", default=None, help="result file name (default: scale[_cuda])")
    parser.add_argument("--keep", default=None, help="keep the data and runs in this folder")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child's model
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("SCALE-RESULT " + json.dumps(run_one(args)), flush=True)
        return

    root = Path(args.keep or tempfile.mkdtemp(prefix="vitrank-scale-"))
    data = make_images(root / "images", args.images)
    rows = []
    for model in comma_list(args.models, str):
        run = root / f"run-{model}-{args.device.replace(':', '')}"
        command = [
            sys.executable, __file__, "--one", model, "--data", str(data), "--run", str(run),
            "--device", args.device, "--trials", str(args.trials), "--engine", args.engine,
            *(["--defaults"] if args.defaults else []),
        ]  # fmt: skip
        print(f"== {model} on {args.device}", flush=True)
        proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("SCALE-RESULT ")]
        if proc.returncode != 0 or not lines:
            rows.append({"model": model, "error": f"exit {proc.returncode}"})
            continue
        row = json.loads(lines[-1].removeprefix("SCALE-RESULT "))
        print(json.dumps(row, indent=1), flush=True)
        rows.append(row)
    name = args.name or ("scale" if args.device == "cpu" else "scale_cuda")
    path = write_result(
        name,
        {
            "machine": {**machine_info(), "load_average": os.getloadavg()},
            "device": args.device,
            "settings": {
                "defaults": args.defaults,
                "trials": "default" if args.defaults else args.trials,
                "images": args.images,
                "engine": "default" if args.defaults else args.engine,
                "finetune_top": 0,
                "promote": "default" if args.defaults else 0,
                "data": f"generated ImageFolder, {args.images} JPEGs at 256 px, {CLASSES} classes",
                "weights": "random (timm, pretrained=False)",
            },
            "models": rows,
        },
        args.results,
    )
    print(f"wrote {path}")
    failed = [row["model"] for row in rows if "error" in row]
    if failed:
        raise SystemExit(f"scale: the search failed for {', '.join(failed)}")


if __name__ == "__main__":
    main()
