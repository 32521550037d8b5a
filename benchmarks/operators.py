"""Operators on the digits teacher: plain vs whitened SVD, matrix vs head level, compensation.

At matched parameter counts, no fine-tuning, validation accuracy and KL(teacher ‖ student):

1. every Linear of every block low rank at one uniform rank ratio (3 compression levels):
   plain SVD vs whitened (activation-aware) SVD, the same shapes for both;
2. attention only (COMCAT Table 1's setting), 20 / 40 / 60 / 80 % of the attention parameters
   removed: matrix level (qkv and proj low rank) vs head level (W_qᵀW_k and W_vᵀW_oᵀ per
   head), both whitened, each the largest ranks within the same parameter budget;
3. every whitened configuration again after block-wise error compensation.

    python benchmarks/operators.py          # writes benchmarks/results/operators.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
from _common import command_line, machine_info
from torch import nn
from vitrank.core.apply import apply_specs
from vitrank.core.compensate import compensate
from vitrank.core.factorize import FactorCache
from vitrank.core.spec import AttentionSpec, BlockSpec, MlpSpec
from vitrank.core.structure import BlockShape, inspect_vit
from vitrank.evaluators.calibration import calibrate

import vitrank

RESULTS = Path(__file__).parent / "results" / "operators.json"
SVD_LEVELS = (0.4, 0.6, 0.8)  # fraction of every block Linear's weights removed
ATTENTION_LEVELS = (0.2, 0.4, 0.6, 0.8)  # fraction of the attention parameters removed
# KL differences below this (nats) are numerical noise for "not worse" (a start that is
# already within it of the teacher cannot be improved measurably).
KL_NOISE = 1e-6


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def logits(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(chunk) for chunk in images.split(batch_size)])


def quality(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
) -> dict:
    """Top-1 accuracy and mean KL(teacher ‖ student) over the validation images."""
    teacher_log = teacher_logits.double().log_softmax(-1)
    student_log = student_logits.double().log_softmax(-1)
    kl = (teacher_log.exp() * (teacher_log - student_log)).sum(-1).mean()
    accuracy = (student_logits.argmax(-1) == labels).double().mean()
    return {"accuracy": round(float(accuracy), 4), "kl": float(kl)}


def not_worse(after: dict, before: dict) -> bool:
    return after["accuracy"] >= before["accuracy"] and after["kl"] <= before["kl"] + KL_NOISE


def uniform_rank(rows: int, cols: int, removed: float) -> int:
    """Largest rank whose two factors keep at most (1 - removed) of the rows × cols weights."""
    return max(1, int((1 - removed) * rows * cols / (rows + cols)))


def svd_spec(shape: BlockShape, removed: float) -> BlockSpec:
    d, hidden, inner = shape.dim, shape.mlp_hidden, shape.attn_inner
    attn = AttentionSpec(
        "lowrank",
        qkv_rank=uniform_rank(3 * inner, d, removed),
        proj_rank=uniform_rank(d, inner, removed),
    )
    mlp = MlpSpec(
        "lowrank",
        fc1_rank=uniform_rank(hidden, d, removed),
        fc2_rank=uniform_rank(d, hidden, removed),
    )
    return BlockSpec(attn, mlp)


def attention_params(shape: BlockShape, spec: AttentionSpec) -> int:
    """Parameters of one block's attention under `spec` (weights and biases)."""
    d, inner, H = shape.dim, shape.attn_inner, shape.num_heads
    qkv_bias = 3 * inner if shape.qkv_bias else 0
    proj_bias = d if shape.proj_bias else 0
    if spec.op == "dense":
        return 3 * inner * d + qkv_bias + inner * d + proj_bias
    if spec.op == "lowrank":
        return spec.qkv_rank * (d + 3 * inner) + qkv_bias + spec.proj_rank * (inner + d) + proj_bias
    if spec.op == "heads":
        out_bias = d if (shape.qkv_bias or shape.proj_bias) else 0
        return 2 * H * spec.qk_rank * (d + 1) + 2 * H * spec.vo_rank * d + out_bias
    raise ValueError(f"unknown attention op {spec.op!r}")


def attention_specs(shape: BlockShape, removed: float) -> tuple[AttentionSpec, AttentionSpec]:
    """Matrix- and head-level specs, each with the most parameters within the budget."""
    budget = (1 - removed) * attention_params(shape, AttentionSpec())
    d, inner, dh = shape.dim, shape.attn_inner, shape.head_dim
    matrix = max(
        (
            AttentionSpec("lowrank", qkv_rank=a, proj_rank=b)
            for a in range(1, min(d, 3 * inner) + 1)
            for b in range(1, min(d, inner) + 1)
            # the same fraction of each matrix, as the uniform baseline does
            if abs(a / min(d, 3 * inner) - b / min(d, inner)) <= 1.5 / min(d, inner)
        ),
        key=lambda s: (attention_params(shape, s) <= budget, attention_params(shape, s)),
    )
    heads = max(
        (AttentionSpec("heads", qk_rank=r, vo_rank=r) for r in range(1, dh + 1)),
        key=lambda s: (attention_params(shape, s) <= budget, attention_params(shape, s)),
    )
    return matrix, heads


def run(workload, steps: int, lr: float) -> dict:
    teacher = workload.model.eval()
    shapes = inspect_vit(teacher).blocks
    val_images = torch.stack([workload.val[i][0] for i in range(len(workload.val))])
    val_labels = torch.tensor([int(workload.val[i][1]) for i in range(len(workload.val))])
    calib_images = torch.stack([workload.calib[i][0] for i in range(len(workload.calib))])
    teacher_logits = logits(teacher, val_images)
    started = time.monotonic()
    stats = calibrate(teacher, workload.calib, progress=False)
    calibration_s = time.monotonic() - started
    started = time.monotonic()
    whitened = FactorCache(teacher, stats)
    factorize_s = time.monotonic() - started
    plain = FactorCache(teacher, None)

    def evaluate(specs: list[BlockSpec], factors: FactorCache, compensated: bool = False) -> dict:
        student = apply_specs(teacher, specs, factors, stats)
        if compensated:
            compensate(student, teacher, calib_images, steps=steps, lr=lr)
        return {
            "params": count_params(student),
            **quality(logits(student, val_images), teacher_logits, val_labels),
        }

    svd_rows = []
    for removed in SVD_LEVELS:
        specs = [svd_spec(s, removed) for s in shapes]
        svd_rows.append(
            {
                "removed": removed,
                "ranks": {k: v for k, v in vars(specs[0].attn).items() if k.endswith("rank") and v}
                | {k: v for k, v in vars(specs[0].mlp).items() if k.endswith("rank")},
                "plain": evaluate(specs, plain),
                "whitened": evaluate(specs, whitened),
                "whitened+compensation": evaluate(specs, whitened, compensated=True),
            }
        )
    attention_rows = []
    for removed in ATTENTION_LEVELS:
        pairs = [attention_specs(s, removed) for s in shapes]
        matrix = [BlockSpec(attn=m) for m, _ in pairs]
        heads = [BlockSpec(attn=h) for _, h in pairs]
        dense_attention = sum(attention_params(s, AttentionSpec()) for s in shapes)
        attention_rows.append(
            {
                "removed": removed,
                "attention_params_dense": dense_attention,
                "matrix_ranks": {
                    "qkv_rank": pairs[0][0].qkv_rank,
                    "proj_rank": pairs[0][0].proj_rank,
                },
                "head_ranks": {"qk_rank": pairs[0][1].qk_rank, "vo_rank": pairs[0][1].vo_rank},
                "matrix_attention_params": sum(
                    attention_params(s, m) for s, (m, _) in zip(shapes, pairs, strict=True)
                ),
                "head_attention_params": sum(
                    attention_params(s, h) for s, (_, h) in zip(shapes, pairs, strict=True)
                ),
                "matrix": evaluate(matrix, whitened),
                "heads": evaluate(heads, whitened),
                "matrix+compensation": evaluate(matrix, whitened, compensated=True),
                "heads+compensation": evaluate(heads, whitened, compensated=True),
            }
        )
    checks = {
        "whitened_beats_plain_kl": all(r["whitened"]["kl"] < r["plain"]["kl"] for r in svd_rows),
        "whitened_not_below_plain_accuracy": all(
            r["whitened"]["accuracy"] >= r["plain"]["accuracy"] for r in svd_rows
        ),
        "heads_beat_matrix_kl": all(r["heads"]["kl"] < r["matrix"]["kl"] for r in attention_rows),
        "heads_not_below_matrix_accuracy": all(
            r["heads"]["accuracy"] >= r["matrix"]["accuracy"] for r in attention_rows
        ),
        "heads_params_not_above_matrix": all(
            r["head_attention_params"] <= r["matrix_attention_params"] for r in attention_rows
        ),
        # Not worse: accuracy not lower and KL not higher beyond the noise floor.
        "compensation_not_worse": all(
            not_worse(r["whitened+compensation"], r["whitened"]) for r in svd_rows
        )
        and all(
            not_worse(r[f"{op}+compensation"], r[op])
            for r in attention_rows
            for op in ("matrix", "heads")
        ),
        "compensation_kl_noise_nats": KL_NOISE,
    }
    return {
        "workload": workload.name,
        "teacher": {
            "params": count_params(teacher),
            **quality(teacher_logits, teacher_logits, val_labels),
        },
        "settings": {
            "calibration_images": stats.num_images,
            "validation_images": len(val_labels),
            "compensation_steps": steps,
            "compensation_lr": lr,
            "calibration_s": round(calibration_s, 2),
            "factorization_s": round(factorize_s, 2),
        },
        "svd": svd_rows,
        "attention": attention_rows,
        "checks": checks,
    }


def cell(row: dict) -> str:
    return f"{row['accuracy']:.4f}/{row['kl']:.3g}"


def print_table(result: dict) -> None:
    teacher = result["teacher"]
    print(
        f"{result['workload']}: teacher {teacher['params']:,} params, accuracy {teacher['accuracy']:.4f}"
    )
    print("\nuniform low rank on every Linear (no fine-tuning)")
    print(
        f"{'removed':>8} {'params':>8}  {'plain acc/KL':>18}  {'whitened acc/KL':>18}  {'+compensation':>18}"
    )
    for r in result["svd"]:
        cells = [cell(r[k]) for k in ("plain", "whitened", "whitened+compensation")]
        print(
            f"{r['removed']:>8.0%} {r['whitened']['params']:>8,}  {cells[0]:>18}  {cells[1]:>18}  {cells[2]:>18}"
        )
    print("\nattention only, whitened (COMCAT Table 1 setting, no fine-tuning)")
    print(
        f"{'removed':>8} {'attn params m/h':>16}  {'matrix acc/KL':>18}  {'heads acc/KL':>18}"
        f"  {'matrix+comp':>18}  {'heads+comp':>18}"
    )
    for r in result["attention"]:
        keys = ("matrix", "heads", "matrix+compensation", "heads+compensation")
        cells = [cell(r[k]) for k in keys]
        params = f"{r['matrix_attention_params']:,}/{r['head_attention_params']:,}"
        print(f"{r['removed']:>8.0%} {params:>16}  " + "  ".join(f"{c:>18}" for c in cells))
    print("\nchecks:", ", ".join(f"{k}={v}" for k, v in result["checks"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="compensation Adam steps per block")
    parser.add_argument("--lr", type=float, default=1e-4, help="compensation learning rate")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    workload = vitrank.load_workload("digits-vit")
    started = time.monotonic()
    result = run(workload, args.steps, args.lr)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "wall_s": round(time.monotonic() - started, 1),
        **result,
    }
    print_table(result)
    result["command"] = command_line()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
