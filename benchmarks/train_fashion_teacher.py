"""Train the fashion-vit teacher and write it to workloads/assets/fashion_vit.

    python benchmarks/train_fashion_teacher.py [--epochs 15] [--out DIR] [--device auto]
        [--model-args JSON] [--name RESULT]

A timm ViT at 28x28 pixels with 4x4 patches (49 patch tokens + cls; see
`vitrank.workloads.FASHION_MODEL_ARGS`) trained from scratch on Fashion-MNIST's 60,000
training images (Debian's `dataset-fashion-mnist`). `--model-args` changes the shape (e.g. the
second teacher the benchmarks check the search on, never tuned on: see benchmarks/RESULTS.md). The 10,000 official test images are only
scored, never used to pick a checkpoint. Seeded; on the CPU single-threaded and deterministic.
Writes `benchmarks/results/train_fashion_teacher.json` with the time, machine and accuracy.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from _common import machine_info, write_result
from timm.models import save_for_hf
from torch.utils.data import TensorDataset
from train_digits_teacher import shift
from vitrank.evaluators import evaluate_accuracy
from vitrank.workloads import FASHION_DIR, FASHION_MODEL_ARGS, FASHION_MODEL_NAME, fashion_arrays


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random translation by up to 2 pixels, then a random horizontal flip."""
    out = shift(images, generator, max_shift=2)
    flip = torch.rand(len(out), generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    device = next(model.parameters()).device
    return evaluate_accuracy(model, TensorDataset(images, labels), 1000, device, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--drop-path", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto", help="auto (a CUDA GPU if any), cpu, cuda:N")
    parser.add_argument("--data", type=Path, default=None, help="folder of the four idx files")
    parser.add_argument("--out", type=Path, default=FASHION_DIR)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--warmup-epochs", type=float, default=1.0)
    parser.add_argument("--no-augment", action="store_true", help="train on the images as they are")
    parser.add_argument(
        "--init",
        type=Path,
        default=None,
        help="continue from the weights of a teacher folder this script wrote (a second stage)",
    )
    parser.add_argument(
        "--model-args",
        type=json.loads,
        default={},
        help="JSON over the shipped teacher's timm arguments, e.g. '{\"depth\": 3}'",
    )
    parser.add_argument("--name", default="train_fashion_teacher", help="result file name")
    args = parser.parse_args()
    model_args = {**FASHION_MODEL_ARGS, **args.model_args}

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    start = time.perf_counter()

    x_train_u8, y_train_np, x_test_u8, y_test_np = fashion_arrays(args.data)
    pixels = x_train_u8.astype(np.float32) / 255.0
    # normalization from the training images, stored in config.json for every later use
    mean, std = round(float(pixels.mean()), 4), round(float(pixels.std()), 4)
    x_train = ((torch.from_numpy(pixels) - mean) / std)[:, None]
    x_test = ((torch.from_numpy(x_test_u8.astype(np.float32) / 255.0) - mean) / std)[:, None]
    y_train, y_test = torch.from_numpy(y_train_np), torch.from_numpy(y_test_np)
    print(f"fashion-mnist: {len(x_train)} train, {len(x_test)} test; mean {mean}, std {std}")

    model = timm.create_model(FASHION_MODEL_NAME, drop_path_rate=args.drop_path, **model_args).to(
        device
    )
    if args.init is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(args.init / "model.safetensors")))
        print(f"continuing from {args.init}")
    params = sum(p.numel() for p in model.parameters())
    print(f"{FASHION_MODEL_NAME} {model_args}: {params:,} parameters on {device}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    total = args.epochs * steps_per_epoch
    warmup = max(1, round(args.warmup_epochs * steps_per_epoch))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * s / total)),
    )
    generator = torch.Generator().manual_seed(args.seed)
    history = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        losses = []
        epoch_start = time.perf_counter()
        for step, i in enumerate(range(0, len(order), args.batch_size)):
            batch = order[i : i + args.batch_size]
            images = x_train[batch] if args.no_augment else augment(x_train[batch], generator)
            images = images.to(device)
            logits = model(images)
            loss = F.cross_entropy(
                logits, y_train[batch].to(device), label_smoothing=args.label_smoothing
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if step % 50 == 0:
                done = (epoch - 1) * steps_per_epoch + step + 1
                rate = done * args.batch_size / (time.perf_counter() - start)
                left = (total - done) * args.batch_size / max(rate, 1e-9)
                print(
                    f"\repoch {epoch}/{args.epochs} step {step}/{steps_per_epoch} "
                    f"loss {np.mean(losses[-50:]):.4f}  {rate:.0f} img/s, ~{left / 60:.0f} min left",
                    end="",
                    flush=True,
                )
        test_acc = accuracy(model, x_test, y_test)
        seconds = time.perf_counter() - start
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "test_acc": test_acc})
        print(
            f"\repoch {epoch:2d}  loss {np.mean(losses):.4f}  test acc {test_acc:.4f}  "
            f"({time.perf_counter() - epoch_start:.0f} s/epoch, {seconds:.0f} s)",
            flush=True,
        )

    model.eval()
    test_acc = accuracy(model, x_test, y_test)
    model.cpu()
    save_for_hf(
        model,
        str(args.out),
        model_args=dict(model_args),
        model_config={"pretrained_cfg": {"tag": "vitrank_fashion"}},
        safe_serialization=True,
        data_config={"mean": (mean,), "std": (std,), "crop_pct": 1.0},
    )
    seconds = time.perf_counter() - start
    write_result(
        args.name,
        {
            "machine": machine_info(args.threads),
            "device": str(device),
            "settings": {k: str(v) for k, v in vars(args).items()},
            "parameters": params,
            "seconds": round(seconds, 1),
            "test_accuracy": test_acc,
            "history": history,
        },
    )
    print(f"final test acc {test_acc:.4f}; wrote {args.out} in {seconds:.0f} s")


if __name__ == "__main__":
    main()
