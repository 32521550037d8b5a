"""The seeds' own methods as operators, each against its nearest existing one at equal cost.

On the fashion workload (its teacher; the 10,000 test images), per seed:

- `cdcp` (CAIT-like head-consistent channel pruning): every block's attention keeps `w`
  query/key and `w` value channels per head (MLPs dense), against whole-head pruning
  (`prune`, heads_kept = w·H/head_dim: the same parameters) and head-level factorization
  (`heads`, qk_rank = vo_rank = w: the same parameters and FLOPs), at three widths;
  training-free (as built, no compensation) and after the same fine-tuning (the search's
  rung 2: its images, seed, epochs and learning rate), McNemar's exact p of each against
  `cdcp`.
- `search`: one search with every operator family in the space (`--ops` with
  `channels`) against the same search with the default families, at each `--budgets`,
  winners handed out training-free (`--finetune-top 0`, compensated as by default), with
  McNemar's exact p.

    python benchmarks/seeds.py [--seeds 0,1,2] [--epochs 1] [--train-images 8000]
        [--budgets 0.25,flops:0.5] [--threads 1]   # results/seeds.json

Token merging with spatial neighbours (`atme`) and the fitted two-term sum (`two_term`)
are not operators yet; the file holds what is measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import comma_list, machine_info, write_result

WIDTH_HEADS = (1, 2, 3)  # whole heads kept by `prune`; cdcp and heads match its parameters


def _problem_run(workload: Any, seed: int, out: Path) -> Path:
    """A search run that made every operator's calibration statistics and factors."""
    from vitrank.spaces import search_families

    import vitrank

    return Path(
        vitrank.search(
            workload=workload,
            out=str(out),
            budget_params=0.5,
            ops=tuple(f for f in search_families() if f != "tokens"),
            trials=2,
            promote=0,
            finetune_top=0,
            seed=seed,
            report=False,
        )
    )


def _hits(model: Any, workload: Any) -> torch.Tensor:
    from vitrank.evaluators import correct_predictions

    return correct_predictions(model, workload.val, progress=False)


def _versus(reference: torch.Tensor, other: torch.Tensor) -> dict[str, Any]:
    from vitrank.evaluators import mcnemar

    test = mcnemar(reference, other)
    return {"cdcp_only_right": test.a_only, "other_only_right": test.b_only, "p": test.p_value}


def cdcp_comparison(run: Path, workload: Any, args: argparse.Namespace) -> dict[str, Any]:
    """cdcp vs prune vs heads at equal parameters, as built and fine-tuned alike."""
    from vitrank.core.model import compress
    from vitrank.core.operators import operator
    from vitrank.core.spec import BlockSpec
    from vitrank.search import finetune_candidate
    from vitrank.search._problem import problem
    from vitrank.spaces import count_params

    current = problem(run)
    space = current.space
    shape = space.fingerprint.blocks[0]
    out: dict[str, Any] = {}
    for kept_heads in WIDTH_HEADS:
        if kept_heads >= shape.num_heads:
            continue
        width = kept_heads * shape.head_dim // shape.num_heads
        parts = {
            "cdcp": operator("attn", "cdcp").spec(qk_kept=width, v_kept=width),
            "prune": operator("attn", "prune").spec(heads_kept=kept_heads),
            "heads": operator("attn", "heads").spec(qk_rank=width, vo_rank=width),
        }
        level: dict[str, Any] = {"width": width, "heads_kept": kept_heads}
        hits: dict[str, dict[str, torch.Tensor]] = {}
        for name, spec in parts.items():
            config = space.config([BlockSpec(attn=spec) for _ in space.blocks])
            model = compress(
                current.teacher, config, current.stats, current.factor_cache(config.svd)
            )
            before = _hits(model, workload)
            began = time.perf_counter()
            finetune_candidate(
                current, workload, model, args.epochs, train_images=args.train_images,
                progress=False,
            )  # fmt: skip
            after = _hits(model, workload)
            hits[name] = {"built": before, "finetuned": after}
            level[name] = {
                "params": count_params(config),
                "params_fraction": count_params(config) / space.dense_params,
                "accuracy_built": float(before.double().mean()),
                "accuracy_finetuned": float(after.double().mean()),
                "finetune_s": round(time.perf_counter() - began, 1),
            }
            print(
                f"  width {width}: {name:>6} params {level[name]['params']}, accuracy "
                f"{level[name]['accuracy_built']:.4f} -> {level[name]['accuracy_finetuned']:.4f}",
                flush=True,
            )
        for name in ("prune", "heads"):
            level[name]["vs_cdcp"] = {
                stage: _versus(hits["cdcp"][stage], hits[name][stage])
                for stage in ("built", "finetuned")
            }
        out[f"width{width}"] = level
    return out


def search_comparison(
    workload: Any, seed: int, budget: str, root: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """The same search with every family and with the default ones, winners as built."""
    from vitrank.core.model import load
    from vitrank.search._settings import default_ops
    from vitrank.spaces import search_families

    import vitrank

    kind, _, value = budget.rpartition(":")
    kind = kind or "params"
    by_cost = kind != "params"
    every = [f for f in search_families() if by_cost or f != "tokens"]
    out: dict[str, Any] = {}
    hits: dict[str, torch.Tensor] = {}
    for label, ops in (("default", default_ops(by_cost)), ("every_operator", every)):
        began = time.perf_counter()
        run = Path(
            vitrank.search(
                workload=workload,
                out=str(root / f"seed{seed}-{kind}{value}-{label}"),
                **{f"budget_{kind}": float(value)},
                ops=tuple(ops),
                finetune_top=0,
                seed=seed,
                report=False,
            )
        )
        folders = [p.parent for p in run.glob("winners/*/metrics.json")]
        folder = min(
            folders, key=lambda f: json.loads((f / "metrics.json").read_text()).get("rank", 10**6)
        )
        winner = json.loads((folder / "metrics.json").read_text())
        hits[label] = _hits(load(folder), workload)
        ops_used = json.loads((folder / "config.json").read_text())
        out[label] = {
            "ops": list(ops),
            "trial": winner["number"],
            "params": winner["params"],
            "flops": winner["flops"],
            "accuracy": float(hits[label].double().mean()),
            "winner_operators": sorted(
                {f"{b['attn']['op']}/{b['mlp']['op']}" for b in ops_used["blocks"]}
            ),
            "seconds": round(time.perf_counter() - began, 1),
        }
    from vitrank.evaluators import mcnemar

    test = mcnemar(hits["every_operator"], hits["default"])
    out["every_vs_default"] = {
        "every_only_right": test.a_only,
        "default_only_right": test.b_only,
        "p": test.p_value,
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=1, help="the same fine-tuning for all")
    parser.add_argument("--train-images", type=int, default=8000)
    parser.add_argument("--budgets", default="0.25,flops:0.5", help="of the search comparison")
    parser.add_argument("--parts", default="cdcp,search")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="seeds")
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import vitrank

    parts = comma_list(args.parts, str)
    started = time.perf_counter()
    result: dict[str, Any] = {"machine": machine_info(args.threads), "workload": "fashion-vit"}
    result["settings"] = {k: str(v) for k, v in vars(args).items() if k != "keep"}
    cdcp: dict[str, Any] = {}
    search: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        for seed in comma_list(args.seeds, int):
            workload = vitrank.load_workload("fashion-vit", seed=seed)
            if "cdcp" in parts:
                print(f"seed {seed}: cdcp vs prune vs heads", flush=True)
                run = _problem_run(workload, seed, root / f"seed{seed}-problem")
                cdcp[f"seed{seed}"] = cdcp_comparison(run, workload, args)
            if "search" in parts:
                for budget in comma_list(args.budgets, str):
                    print(f"seed {seed}: search at {budget}, every operator vs default", flush=True)
                    search[f"seed{seed}/{budget}"] = search_comparison(
                        workload, seed, budget, root, args
                    )
    if cdcp:
        levels = sorted({w for runs in cdcp.values() for w in runs})
        summary = {}
        for level in levels:
            entries = [runs[level] for runs in cdcp.values() if level in runs]
            summary[level] = {
                name: {
                    stage: statistics.mean(e[name][f"accuracy_{stage}"] for e in entries)
                    for stage in ("built", "finetuned")
                }
                for name in ("cdcp", "prune", "heads")
            }
        result["cdcp"] = {"runs": cdcp, "mean": summary}
    if search:
        result["search"] = {
            "runs": search,
            "every_operator_minus_default_mean_points": 100
            * statistics.mean(
                e["every_operator"]["accuracy"] - e["default"]["accuracy"] for e in search.values()
            ),
        }
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(f"wrote {write_result(args.name, result)}")


if __name__ == "__main__":
    main()
