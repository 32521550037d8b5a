"""McNemar's exact test: the figures every fashion-vit "beats" claim carries."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import binomtest
from vitrank.evaluators import correct_predictions, evaluate_accuracy, mcnemar


@pytest.mark.parametrize(("a_only", "b_only"), [(30, 5), (7, 7), (0, 3), (120, 95), (0, 0)])
def test_counts_and_the_exact_p_value(a_only: int, b_only: int) -> None:
    both, neither = 50, 11
    a = torch.tensor([1] * a_only + [0] * b_only + [1] * both + [0] * neither, dtype=torch.bool)
    b = torch.tensor([0] * a_only + [1] * b_only + [1] * both + [0] * neither, dtype=torch.bool)
    result = mcnemar(a, b)
    assert (result.images, result.a_only, result.b_only) == (len(a), a_only, b_only)
    assert result.disagreements == a_only + b_only
    expected = binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    assert result.p_value == pytest.approx(expected, rel=1e-9)
    assert mcnemar(b, a).p_value == pytest.approx(result.p_value)  # symmetric


def test_vectors_over_other_images_are_refused() -> None:
    with pytest.raises(ValueError, match="same images"):
        mcnemar(torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool))


def test_correct_predictions_agree_with_accuracy(tiny_vit) -> None:
    model = tiny_vit()
    images = torch.randn(20, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        labels = model(images).argmax(-1)
    labels[:5] = (labels[:5] + 1) % 5
    data = torch.utils.data.TensorDataset(images, labels)
    hits = correct_predictions(model, data, batch_size=8, progress=False)
    assert hits.dtype == torch.bool and hits.tolist() == [False] * 5 + [True] * 15
    assert evaluate_accuracy(model, data, batch_size=8, progress=False) == 0.75
