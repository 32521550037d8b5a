"""Does the proxy rank configs alike in bfloat16 and float32? (`--dtype auto` picks bf16 on GPUs.)

Per seed, the same search twice on the fashion workload, once per `--dtype`, with the
random sampler (seeded, so both draw the same configs whatever the proxy says), no rungs
and no fine-tuning; then, over the configs both scored, the Spearman correlation of their
proxy values, Kendall's τ, and how many of the float32 top 5 are in the other's top 5.
It runs on a CPU too (slower there: bf16 has no fast CPU kernels).

    python benchmarks/proxy_dtype.py [--seeds 0,1,2] [--trials 40] [--dtypes bfloat16]
                                     # results/proxy_dtype_fashion-vit.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import comma_list, machine_info, write_result


def proxies(dtype: str, seed: int, args: argparse.Namespace, out: Path) -> dict[str, float]:
    """config -> proxy value of one search in `dtype` (the baselines search by the proxy,
    so theirs may differ between dtypes: only configs both runs scored are compared)."""
    import pandas as pd

    import vitrank

    run = vitrank.search(
        workload="fashion-vit",
        out=str(out),
        budget_params=args.budget,
        sampler="random",
        refine=0.0,  # no local refinement, which follows the proxy: the same draws
        engine="optuna",
        trials=args.trials,
        promote=0,
        finetune_top=0,
        seed=seed,
        dtype=dtype,
        device=args.device,
        report=False,
    )
    table = pd.read_parquet(Path(run) / "trials.parquet")
    table = table[table["state"] == "COMPLETE"]
    return {str(c): float(p) for c, p in zip(table["config"], table["proxy"], strict=True)}


def compare(reference: dict[str, float], other: dict[str, float]) -> dict[str, Any]:
    from scipy import stats

    common = sorted(set(reference) & set(other))
    a = [reference[n] for n in common]
    b = [other[n] for n in common]
    rho = stats.spearmanr(a, b)
    tau = stats.kendalltau(a, b)

    def top(values: dict[str, float]) -> set[str]:
        return set(sorted(common, key=lambda n: values[n])[:5])

    return {
        "trials": len(common),
        "spearman": float(rho.statistic),
        "spearman_p": float(rho.pvalue),
        "kendall_tau": float(tau.statistic),
        "top5_shared": len(top(reference) & top(other)),
        "median_relative_difference": statistics.median(
            abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b, strict=True)
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--budget", type=float, default=0.25, help="params fraction")
    parser.add_argument("--dtypes", default="bfloat16", help="compared with float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="proxy_dtype_fashion-vit")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    runs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in comma_list(args.seeds, int):
            began = time.perf_counter()
            reference = proxies("float32", seed, args, Path(tmp) / f"seed{seed}-float32")
            seconds = {"float32": round(time.perf_counter() - began, 1)}
            entry: dict[str, Any] = {}
            for dtype in comma_list(args.dtypes, str):
                began = time.perf_counter()
                other = proxies(dtype, seed, args, Path(tmp) / f"seed{seed}-{dtype}")
                seconds[dtype] = round(time.perf_counter() - began, 1)
                entry[dtype] = compare(reference, other)
                print(f"seed {seed}, {dtype} vs float32: {entry[dtype]}", flush=True)
            runs[f"seed{seed}"] = {**entry, "seconds": seconds}
    dtypes = comma_list(args.dtypes, str)
    result = {
        "machine": machine_info(args.threads),
        "settings": vars(args),
        "runs": runs,
        "mean_spearman": {
            d: statistics.mean(r[d]["spearman"] for r in runs.values()) for d in dtypes
        },
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(f"wrote {write_result(args.name, result)}")


if __name__ == "__main__":
    main()
