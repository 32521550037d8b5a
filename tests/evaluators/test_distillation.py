from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import TensorDataset
from vitrank.evaluators import FinetuneResult, finetune
from vitrank.evaluators.finetune import distillation_loss, warmup_cosine


def _teacher_labelled_data(teacher, n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 16, 16, generator=generator)
    with torch.no_grad():
        labels = teacher(images).argmax(-1)
    return TensorDataset(images, labels)


def _damaged_copy(teacher, scale: float = 0.6):
    student = copy.deepcopy(teacher)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in student.blocks:
            w = block.mlp.fc1.weight
            w.add_(scale * w.std() * torch.randn(w.shape, generator=generator))
    return student


def test_distillation_loss_terms():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    labels = torch.tensor([0])
    # Same logits: the soft term vanishes, only alpha's complement of CE is left.
    ce = torch.nn.functional.cross_entropy(logits, labels)
    loss = distillation_loss(logits, logits, labels, temperature=4.0, alpha=0.25)
    assert loss.item() == pytest.approx(0.75 * ce.item(), rel=1e-6)
    other = torch.tensor([[0.0, 2.0, -1.0]])
    assert distillation_loss(other, logits, labels, 4.0, 1.0).item() > 0


def test_warmup_then_cosine_schedule():
    factor = warmup_cosine(total_steps=10, warmup_steps=2)
    assert [factor(0), factor(1)] == [0.5, 1.0]
    assert factor(2) == pytest.approx(1.0)
    assert factor(6) == pytest.approx(0.5)
    assert factor(10) == pytest.approx(0.0)


def test_finetune_is_deterministic_reports_each_epoch_and_keeps_the_best(tiny_vit):
    teacher = tiny_vit()
    train = _teacher_labelled_data(teacher, 96, seed=0)
    val = _teacher_labelled_data(teacher, 64, seed=1)
    reports = []
    runs = []
    for _ in range(2):
        student = _damaged_copy(teacher)
        result = finetune(
            student,
            teacher,
            train,
            val,
            epochs=2,
            lr=2e-3,
            batch_size=32,
            progress=False,
            report=reports.append,
        )
        runs.append((student, result))
    (student_a, result_a), (student_b, result_b) = runs
    assert isinstance(result_a, FinetuneResult)
    assert [h["epoch"] for h in result_a.history] == [0, 1, 2]
    assert [r["epoch"] for r in reports] == [1, 2, 1, 2]
    assert {"val_accuracy", "train_loss", "lr", "best_accuracy"} <= set(reports[0])
    for a, b in zip(student_a.state_dict().values(), student_b.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    best = max(h["val_accuracy"] for h in result_a.history)
    assert result_a.best_accuracy == best
    assert result_a.history[result_a.best_epoch]["val_accuracy"] == best
    # The weights left in the model are the best epoch's.
    from vitrank.evaluators import evaluate_accuracy

    assert evaluate_accuracy(student_a, val) == pytest.approx(result_a.best_accuracy)
    assert not teacher.training


def test_finetune_validates_arguments(tiny_vit):
    teacher = tiny_vit()
    data = _teacher_labelled_data(teacher, 8, seed=0)
    with pytest.raises(ValueError, match="alpha"):
        finetune(copy.deepcopy(teacher), teacher, data, data, alpha=1.5, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        finetune(copy.deepcopy(teacher), teacher, data, data, epochs=0, progress=False)


def _scripted_score(correct_counts: list[int], images: int = 40):
    """A `score` that returns, call after call, correctness vectors with these counts (the
    first `count` images right), and remembers the student's weights at each call."""
    calls: list[dict[str, torch.Tensor]] = []

    def score(student):
        calls.append({k: v.clone() for k, v in student.state_dict().items()})
        correct = torch.zeros(images, dtype=torch.bool)
        correct[: correct_counts[len(calls) - 1]] = True
        return correct

    return score, calls


@pytest.mark.parametrize(
    ("counts", "kept"),
    [
        ([40, 38, 37], 2),  # the last is 3 images below the start: chance, the last stays
        ([40, 25, 20], 0),  # 20 images below: the start is kept
        ([30, 39, 38], 2),  # the best epoch is 1 image above the last: the last stays
        ([30, 31, 36], 2),  # the last is the best anyway
    ],
)
def test_last_unless_worse_goes_back_only_on_significant_evidence(tiny_vit, counts, kept):
    teacher = tiny_vit()
    train = _teacher_labelled_data(teacher, 32, seed=0)
    student = _damaged_copy(teacher)
    score, calls = _scripted_score(counts)
    result = finetune(
        student, teacher, train, None, epochs=2, lr=2e-3, batch_size=16, progress=False,
        keep="last-unless-worse", score=score,
    )  # fmt: skip
    assert result.best_epoch == kept
    assert result.best_accuracy == counts[kept] / 40
    assert [h["val_accuracy"] for h in result.history] == [c / 40 for c in counts]
    for name, value in student.state_dict().items():
        assert torch.equal(value, calls[kept][name]), name


def test_last_unless_worse_needs_per_image_correctness(tiny_vit):
    teacher = tiny_vit()
    data = _teacher_labelled_data(teacher, 8, seed=0)
    with pytest.raises(ValueError, match="per-image correctness"):
        finetune(
            copy.deepcopy(teacher), teacher, data, None, epochs=1, progress=False,
            keep="last-unless-worse", score=lambda student: 0.5,
        )  # fmt: skip
    # with validation images the correctness comes from them
    result = finetune(
        copy.deepcopy(teacher), teacher, data, data, epochs=1, progress=False,
        keep="last-unless-worse",
    )  # fmt: skip
    assert result.best_epoch in (0, 1)


def test_the_recipes_numbers_are_written_once():
    """No default, keyword or assignment outside `Recipe` restates a number of the recipe
    (lr, weight decay, temperature, alpha, warm-up): every distillation reads them there."""
    import ast
    import dataclasses

    from vitrank.evaluators import RECIPE, Recipe

    from tests.test_layers import MODULES

    names = {f.name for f in dataclasses.fields(Recipe)} - {"batch_size"}
    names |= {f"finetune_{n}" for n in names}
    found = []
    for path in MODULES.values():
        tree = ast.parse(path.read_text())
        recipe_lines = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name == "Recipe":
                recipe_lines = set(range(node.lineno, (node.end_lineno or node.lineno) + 1))
        for node in ast.walk(tree):
            pairs = []
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                pairs.append((node.target.id, node.value))
            elif isinstance(node, ast.keyword) and node.arg:
                pairs.append((node.arg, node.value))
            elif isinstance(node, ast.arguments):
                positional = node.posonlyargs + node.args
                defaults = [None] * (len(positional) - len(node.defaults)) + node.defaults
                pairs += [(a.arg, d) for a, d in zip(positional, defaults, strict=True)]
                pairs += [
                    (a.arg, d) for a, d in zip(node.kwonlyargs, node.kw_defaults, strict=True)
                ]
            for name, value in pairs:
                if (
                    name in names
                    and isinstance(value, ast.Constant)
                    and isinstance(value.value, (int, float))
                    and not isinstance(value.value, bool)
                    and value.value == getattr(RECIPE, name.removeprefix("finetune_"))
                    and value.lineno not in recipe_lines
                ):
                    found.append(f"{path.name}:{value.lineno} {name}={value.value}")
    assert not found, found
    assert (RECIPE.lr, RECIPE.alpha) == (5e-4, 0.7)  # the numbers the README quotes
