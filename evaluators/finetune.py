"""Knowledge-distillation fine-tuning of a compressed model from its teacher.

The loss is alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) plus
(1 - alpha) * cross-entropy with the labels (Hinton et al. 2015; the T^2 keeps the soft
term's gradients on the scale of the hard one). AdamW, linear warm-up then cosine decay
per step, top-1 on the validation split after every epoch, the best epoch's weights
restored at the end. Runs plain or inside a Ray Tune trial (`finetune_trainable`).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from vitrank.core.files import atomic_write_json
from vitrank.evaluators._data import as_loader, images_and_labels, num_batches, progress_bar
from vitrank.evaluators.accuracy import correct_predictions, input_dtype
from vitrank.evaluators.significance import mcnemar

KEEP = ("best", "latest-best", "last", "last-unless-worse")  # which epoch's weights stay
# "last-unless-worse" goes back to an earlier epoch only when McNemar's test on the scoring
# images says it is more accurate than the last one at this level.
WORSE_P_VALUE = 0.05


@dataclass(frozen=True)
class Recipe:
    """The one distillation recipe: every distillation vitrank runs (rungs 1 and 2,
    `vitrank finetune`, the benchmarks) reads its numbers here."""

    lr: float = 5e-4  # AdamW's peak learning rate (linear warm-up, then cosine to 0)
    weight_decay: float = 0.05
    temperature: float = 4.0  # of the soft targets
    alpha: float = 0.7  # weight of the soft (distillation) term; 1 - alpha on the labels
    warmup: float = 0.1  # fraction of all steps spent warming the learning rate up
    batch_size: int = 64

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"`0 <= alpha <= 1` must hold, but got alpha={self.alpha}.")
        if self.temperature <= 0:
            raise ValueError(
                f"`temperature > 0` must hold, but got temperature={self.temperature}."
            )
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"`0 <= warmup < 1` must hold, but got warmup={self.warmup}.")
        if self.lr <= 0 or self.batch_size < 1:
            raise ValueError(
                f"`lr > 0` and `batch_size >= 1` must hold, but got lr={self.lr}, "
                f"batch_size={self.batch_size}."
            )

    def with_changes(self, **changes: Any) -> Recipe:
        """This recipe with the changes that are not None (a caller's explicit values)."""
        given = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **given) if given else self


RECIPE = Recipe()


@dataclass
class FinetuneResult:
    best_accuracy: float  # validation top-1 of the weights left in the model
    best_epoch: int  # 0 when no epoch beat the model as it came in
    initial_accuracy: float  # validation top-1 before fine-tuning
    # One dict per epoch (epoch 0 = before training): epoch, train_loss, val_accuracy, lr, seconds.
    history: list[dict[str, float]] = field(default_factory=list)
    state_dict: dict[str, Tensor] = field(default_factory=dict)  # best weights, on the CPU


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: float,
    alpha: float,
) -> Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)."""
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=-1),
        F.log_softmax(teacher_logits / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    hard = F.cross_entropy(student_logits, labels)
    return alpha * temperature**2 * soft + (1.0 - alpha) * hard


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate factor per step: linear 0 -> 1 over the warm-up, then cosine 1 -> 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _device_of(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def finetune(
    student: nn.Module,
    teacher: nn.Module,
    train: Dataset | DataLoader | Iterable,
    val: Dataset | DataLoader | Iterable | None,
    epochs: int = 3,
    lr: float | None = None,
    weight_decay: float | None = None,
    temperature: float | None = None,
    alpha: float | None = None,
    batch_size: int | None = None,
    warmup: float | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    report: Callable[[dict[str, float]], None] | None = None,
    keep: str = "best",
    score: Callable[[nn.Module], float | Tensor] | None = None,
    recipe: Recipe = RECIPE,
) -> FinetuneResult:
    """Distil `teacher` into `student` in place; the best epoch's weights are left in it.

    The numbers are `recipe`'s; `lr`, `alpha`, ... given (not None) replace its own. `keep="latest-best"` breaks ties between epochs
    (an accuracy that saturates) in favour of the later one; `keep="last"` leaves the last
    epoch's weights (the end of the cosine schedule; `best_accuracy` is then theirs);
    `keep="last-unless-worse"` leaves them too unless the most accurate earlier epoch (the
    model as it came in included) beats them by McNemar's exact test at p < 0.05 on the
    scoring images: picking the top of a noisy accuracy curve favours chance, and on images
    the teacher knows by heart (a saturated score) it favours the untrained start.
    `score(student)` replaces `val`: a top-1 in [0, 1], or the per-image correctness (a
    bool tensor, which "last-unless-worse" needs). `report(metrics)` is called after
    every epoch (e.g. `ray.tune.report`). The run is seeded: on the CPU the same call
    gives the same weights. The global random state is left as it was.
    """
    if epochs < 1:
        raise ValueError(f"`epochs >= 1` must hold, but got {epochs=}.")
    recipe = recipe.with_changes(
        lr=lr, weight_decay=weight_decay, temperature=temperature, alpha=alpha,
        batch_size=batch_size, warmup=warmup,
    )  # fmt: skip
    lr, weight_decay, temperature = recipe.lr, recipe.weight_decay, recipe.temperature
    alpha, batch_size, warmup = recipe.alpha, recipe.batch_size, recipe.warmup
    if keep not in KEEP:
        raise ValueError(f"`keep` must be one of {KEEP}, but got {keep=}.")
    device = torch.device(device)
    student_home, teacher_home = _device_of(student), _device_of(teacher)
    teacher_was_training = teacher.training
    train_loader = as_loader(train, batch_size, shuffle=True, seed=seed)
    if val is None and score is None:
        raise ValueError("fine-tuning needs `val` images or a `score` to judge each epoch by.")
    val_loader = as_loader(val, batch_size) if val is not None else None
    steps_per_epoch = num_batches(train_loader)
    if steps_per_epoch is None:
        raise ValueError("fine-tuning needs a sized training set or loader (len() must work).")
    total_steps = epochs * steps_per_epoch

    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        # fp16 / bf16 students train as fp32 master weights (Adam on half-precision
        # parameters loses the updates) and go back to their dtype at the end.
        student_dtype = input_dtype(student)
        student.to(device=device, dtype=torch.float32)
        teacher.to(device).eval()
        teacher_dtype = input_dtype(teacher)
        parameters = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(total_steps, max(1, round(warmup * total_steps)))
        )

        def evaluate() -> tuple[float, Tensor | None]:
            """(top-1, per-image correctness when known) of the student now."""
            if score is not None:
                judged = score(student)
                if isinstance(judged, Tensor):
                    return float(judged.double().mean()), judged.bool().cpu()
                if keep == "last-unless-worse":
                    raise ValueError(
                        'keep="last-unless-worse" compares epochs image by image: `score` '
                        "must return the per-image correctness (a bool tensor), not a number."
                    )
                return float(judged), None
            assert val_loader is not None
            correct = correct_predictions(student, val_loader, batch_size, device, progress=False)
            return float(correct.double().mean()), correct

        initial, initial_correct = evaluate()
        best_accuracy, best_epoch, best_state = initial, 0, _cpu_state(student)
        best_correct = initial_correct
        history = [dict(epoch=0, train_loss=math.nan, val_accuracy=initial, lr=0.0, seconds=0.0)]
        try:
            with progress_bar("fine-tune", total_steps, progress) as advance:
                for epoch in range(1, epochs + 1):
                    start = time.perf_counter()
                    student.train()
                    loss_sum, seen = 0.0, 0
                    for batch in train_loader:
                        images, labels = images_and_labels(batch)
                        images, labels = images.to(device), labels.to(device)
                        with torch.no_grad():
                            teacher_logits = teacher(images.to(teacher_dtype)).float()
                        loss = distillation_loss(
                            student(images.float()), teacher_logits, labels, temperature, alpha
                        )
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        optimizer.step()
                        schedule.step()
                        value = loss.item()
                        loss_sum += value * labels.numel()
                        seen += labels.numel()
                        advance(description=f"fine-tune epoch {epoch}/{epochs} loss {value:.4f}")
                    accuracy, correct = evaluate()
                    better = accuracy > best_accuracy or (
                        keep in ("latest-best", "last-unless-worse") and accuracy == best_accuracy
                    )
                    last = epoch == epochs
                    if keep == "last-unless-worse" and last and not better:
                        assert correct is not None and best_correct is not None
                        test = mcnemar(best_correct, correct)
                        better = not (test.a_only > test.b_only and test.p_value < WORSE_P_VALUE)
                    if better or (keep == "last" and last):
                        best_accuracy, best_epoch = accuracy, epoch
                        best_state, best_correct = _cpu_state(student), correct
                    metrics = dict(
                        epoch=epoch,
                        train_loss=loss_sum / max(seen, 1),
                        val_accuracy=accuracy,
                        lr=optimizer.param_groups[0]["lr"],
                        seconds=time.perf_counter() - start,
                    )
                    history.append(metrics)
                    if report is not None:
                        report({**metrics, "best_accuracy": best_accuracy})
        finally:
            student.eval()
            teacher.to(teacher_home).train(teacher_was_training)
        student.load_state_dict(best_state)
        student.to(device=student_home, dtype=student_dtype)
    return FinetuneResult(
        best_accuracy=best_accuracy,
        best_epoch=best_epoch,
        initial_accuracy=initial,
        history=history,
        state_dict=best_state,
    )


def finetune_trainable(config: dict[str, Any]) -> dict[str, float] | None:
    """A Ray Tune function trainable: fine-tune one saved compressed model, report per epoch.

    Everything is loaded from plain values in `config`, so the function pickles by name:
    `student_dir` (a model saved by `vitrank.save`, required), `workload` / `model` /
    `data` / `pretrained` (the teacher and data, as `vitrank.load_workload` takes them),
    optional `output_dir` (the fine-tuned model is saved there by `vitrank.save`, with
    finetune.json holding the per-epoch history) and any `finetune` keyword (`epochs`,
    `lr`, `temperature`, `alpha`, `batch_size`, `seed`, `device`, ...). Inside a Tune
    trial every epoch is reported with `ray.tune.report` (with `best_accuracy`); run plain,
    the final metrics are returned.
    """
    from vitrank.core.model import load, save
    from vitrank.workloads import WorkloadSettings

    config = dict(config)
    student_dir = config.pop("student_dir", None)
    if student_dir is None:
        raise ValueError("`finetune_trainable` needs config['student_dir'], a saved model dir.")
    output_dir = config.pop("output_dir", None)
    # the teacher and its images; `seed` stays a fine-tuning keyword
    chosen = {key: config.pop(key, None) for key in ("workload", "model", "data", "pretrained")}
    workload = WorkloadSettings.of(chosen).load()
    student = load(student_dir)
    config.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
    config.setdefault("progress", False)
    report = _tune_report()
    result = finetune(
        student, workload.model, workload.train, workload.val, report=report, **config
    )
    final = {
        "best_accuracy": result.best_accuracy,
        "best_epoch": float(result.best_epoch),
        "initial_accuracy": result.initial_accuracy,
    }
    if output_dir is not None:
        directory = Path(output_dir)
        save(student, directory)
        record = {**final, "history": result.history, "settings": config}
        atomic_write_json(directory / "finetune.json", record)
    # Tune reports a returned dict as one more result; every epoch is reported already.
    return None if report is not None else final


def _tune_report() -> Callable[[dict[str, float]], None] | None:
    """`ray.tune.report` inside a Tune session, else None."""
    try:
        from ray import tune
        from ray.tune import get_context
    except ImportError:
        return None
    # Outside a session the trial id is None (with a warning that says so; not needed here).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if get_context().get_trial_id() is None:
                return None
        except RuntimeError:
            return None
    return lambda metrics: tune.report(dict(metrics))
