"""Train the embedded digits teacher and write it to workloads/assets/digits_vit.

    python benchmarks/train_digits_teacher.py [--epochs 200] [--out DIR]

A timm ViT (8x8 pixels, 2x2 patches, see `vitrank.workloads.DIGITS_MODEL_ARGS`) trained
from scratch on sklearn's digits with the workload's fixed train split; the validation
split is only scored, never used to pick a checkpoint. Seeded and single-process, so a
rerun on the same machine writes the same weights. Takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.models import save_for_hf
from vitrank.workloads import (
    DIGITS_DIR,
    DIGITS_MODEL_ARGS,
    DIGITS_MODEL_NAME,
    digits_arrays,
    stratified_split,
)


def shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Random translation by up to `max_shift` pixels (zero padded): the only augmentation."""
    n, _, h, w = images.shape
    padded = F.pad(images, [max_shift] * 4, value=float(images.min()))
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    batch = torch.arange(n)[:, None, None, None]
    return padded[batch, torch.arange(images.shape[1])[None, :, None, None], rows, cols]


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return (model(images).argmax(-1) == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--drop-path", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DIGITS_DIR)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()

    pixels, labels_np = digits_arrays()
    train_idx, val_idx = stratified_split(labels_np)
    # normalization from the training split, stored in config.json for every later use
    mean = round(float(pixels[train_idx].mean()), 4)
    std = round(float(pixels[train_idx].std()), 4)
    images = (torch.from_numpy(pixels) - mean) / std
    labels = torch.from_numpy(labels_np)
    x_train, y_train = images[train_idx], labels[train_idx]
    x_val, y_val = images[val_idx], labels[val_idx]
    print(f"digits: {len(x_train)} train, {len(x_val)} val; mean {mean}, std {std}")

    model = timm.create_model(DIGITS_MODEL_NAME, drop_path_rate=args.drop_path, **DIGITS_MODEL_ARGS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total, warmup = args.epochs * steps_per_epoch, 3 * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * s / total)),
    )
    generator = torch.Generator().manual_seed(args.seed)
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        losses = []
        for i in range(0, len(order), args.batch_size):
            batch = order[i : i + args.batch_size]
            logits = model(shift(x_train[batch], generator))
            loss = F.cross_entropy(logits, y_train[batch], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        if epoch % 10 == 0 or epoch == args.epochs:
            print(
                f"epoch {epoch:3d}  loss {np.mean(losses):.4f}  "
                f"train acc {accuracy(model, x_train, y_train):.4f}  "
                f"val acc {accuracy(model, x_val, y_val):.4f}  "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )

    model.eval()
    val_acc = accuracy(model, x_val, y_val)
    save_for_hf(
        model,
        str(args.out),
        model_args=dict(DIGITS_MODEL_ARGS),
        model_config={"pretrained_cfg": {"tag": "vitrank_digits"}},
        safe_serialization=True,
        data_config={"mean": (mean,), "std": (std,), "crop_pct": 1.0},
    )
    print(f"final val acc {val_acc:.4f}; wrote {args.out} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
