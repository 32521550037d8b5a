from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from vitrank.evaluators import evaluate_accuracy


def _pick_channel_model() -> nn.Module:
    # Predicts the index of the largest of 3 pixel values: a classifier whose answers we know.
    return nn.Sequential(nn.Flatten(), nn.Identity())


def test_accuracy_counts_correct_top1_over_every_batch():
    images = torch.eye(3).repeat(4, 1).reshape(12, 1, 1, 3)  # argmax cycles 0, 1, 2
    labels = torch.tensor([0, 1, 2] * 4)
    labels[[1, 5, 10]] = 0  # three wrong labels out of twelve
    data = TensorDataset(images, labels)
    model = _pick_channel_model()
    assert evaluate_accuracy(model, data, batch_size=5) == pytest.approx(9 / 12)
    assert evaluate_accuracy(model, DataLoader(data, batch_size=4)) == pytest.approx(9 / 12)


def test_accuracy_restores_training_mode_and_rejects_empty_data():
    model = _pick_channel_model().train()
    data = TensorDataset(torch.eye(3).reshape(3, 1, 1, 3), torch.tensor([0, 1, 2]))
    assert evaluate_accuracy(model, data, progress=True) == 1.0
    assert model.training
    empty = TensorDataset(torch.empty(0, 1, 1, 3), torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one"):
        evaluate_accuracy(model, empty)
