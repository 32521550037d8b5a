"""Self-distillation: how far the fine-tuning recipe moves the teacher itself.

A copy of the workload's teacher is distilled from the teacher with `evaluators.finetune`
(the loss, optimizer and schedule of rungs 1 and 2) for `--epochs` on a seeded subset of
the training images, for each learning rate, soft-target weight `alpha` and number of
images of the grid, and measured on the validation split. The student starts at the
teacher's optimum of that very loss (alpha = 1) or near it, so whatever it loses is the
recipe's noise: the size of the random walk of too few, too large AdamW steps, which a
short fine-tuning adds to every compressed model it is given.

    python benchmarks/self_distillation.py --workload fashion-vit
        # results/self_distillation_fashion-vit.json
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import os
import time
from typing import Any

import torch
from _common import comma_list, machine_info, write_result


def _floats(text: str) -> list[float]:
    return comma_list(text, float)


def _ints(text: str) -> list[int]:
    return comma_list(text, int)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="fashion-vit", choices=("digits-vit", "fashion-vit"))
    parser.add_argument("--lrs", type=_floats, default=[5e-4, 2e-4, 1e-4])
    parser.add_argument("--alphas", type=_floats, default=[0.7, 1.0])
    parser.add_argument("--images", type=_ints, default=[2000, 8000])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from vitrank.evaluators import correct_predictions, finetune, mcnemar
    from vitrank.search._fidelity import limited
    from vitrank.workloads import load_workload

    workload = load_workload(args.workload)
    teacher = workload.model
    teacher_hits = correct_predictions(teacher, workload.val, progress=False)
    teacher_accuracy = float(teacher_hits.double().mean())
    print(f"{args.workload} teacher: {teacher_accuracy:.4f} on {len(teacher_hits)} images")
    result: dict[str, Any] = {
        "machine": {**machine_info(args.threads), "load_average_at_start": os.getloadavg()},
        "workload": args.workload,
        "settings": {k: v for k, v in vars(args).items() if k != "threads"},
        "teacher_accuracy": teacher_accuracy,
        "val_images": len(teacher_hits),
        "runs": [],
    }
    started = time.perf_counter()
    for lr, alpha, images in itertools.product(args.lrs, args.alphas, args.images):
        student = copy.deepcopy(teacher)
        train = limited(workload.train, images, args.seed)
        began = time.perf_counter()
        finetune(
            student, teacher, train, None, epochs=args.epochs, lr=lr, alpha=alpha,
            batch_size=args.batch_size, seed=args.seed, progress=False, keep="last",
            score=lambda model: torch.zeros(1, dtype=torch.bool),  # the last epoch stays
        )  # fmt: skip
        hits = correct_predictions(student, workload.val, progress=False)
        accuracy = float(hits.double().mean())
        test = mcnemar(teacher_hits, hits)
        row = {
            "lr": lr,
            "alpha": alpha,
            "images": images,
            "steps": args.epochs * math.ceil(images / args.batch_size),
            "accuracy": accuracy,
            "change_points": round(100 * (accuracy - teacher_accuracy), 2),
            "teacher_only_right": test.a_only,
            "student_only_right": test.b_only,
            "mcnemar_p": test.p_value,
            "seconds": round(time.perf_counter() - began, 1),
        }
        result["runs"].append(row)
        print(
            f"lr {lr:g} alpha {alpha:g} images {images}: {row['accuracy']:.4f} "
            f"({row['change_points']:+.2f} points, McNemar p {test.p_value:.3g})",
            flush=True,
        )
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    print(f"wrote {write_result(f'self_distillation_{args.workload}', result)}")


if __name__ == "__main__":
    main()
