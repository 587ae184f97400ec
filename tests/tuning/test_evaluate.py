"""evaluate(): accuracy and MSE against hand computations, modes and gradients."""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from torch import Tensor, nn

from kcompress.errors import KCompressError
from kcompress.tuning.data import SequenceData
from kcompress.tuning.evaluate import evaluate, higher_is_better


class LastStep(nn.Module):
    """Logits = the input at each sequence's last valid step times ``scale``; records how it was called."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.calls: list[tuple[bool, bool, bool]] = []  # (training, grad enabled, lengths given)

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        self.calls.append((self.training, torch.is_grad_enabled(), lengths is not None))
        steps = torch.full((x.shape[0],), x.shape[1]) if lengths is None else lengths
        return x[torch.arange(x.shape[0]), steps - 1] * self.scale


def classification_data() -> SequenceData:
    """Last valid steps' argmax: 2, 1, 0, 2, 1; targets 2, 1, 1, 0, 1 -> 3 of 5 right.

    Sample 0 has length 1: without lengths the model would read its zero padding and predict class 0.
    """
    inputs = torch.zeros(5, 3, 3)
    inputs[0, 0] = torch.tensor([0.0, 1.0, 5.0])
    inputs[1, :3] = torch.tensor([[9.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 3.0, 1.0]])
    inputs[2, :2] = torch.tensor([[0.0, 7.0, 0.0], [4.0, 1.0, 0.0]])
    inputs[3, :3] = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 2.0]])
    inputs[4, :2] = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 1.0]])
    return SequenceData(inputs, torch.tensor([2, 1, 1, 0, 1]), torch.tensor([1, 3, 2, 3, 2]))


@pytest.mark.parametrize("batch_size", [1, 2, 256])
def test_accuracy_matches_hand_count(batch_size: int) -> None:
    model = LastStep()
    assert evaluate(model, classification_data(), "classification", batch_size) == pytest.approx(3 / 5)
    assert all(lengths_given for _, _, lengths_given in model.calls)


class Outer(nn.Module):
    """A parent around :class:`LastStep`, to check that submodules' modes come back individually."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = LastStep()

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        return self.inner(x, lengths)


def test_runs_in_eval_mode_without_gradients_and_restores_modes() -> None:
    model = Outer()
    model.train()
    model.inner.eval()  # a mixed state must come back exactly
    data = classification_data()
    evaluate(model, data)
    evaluate(model, [((data.inputs, data.lengths), data.targets)])
    assert len(model.inner.calls) == 2
    assert all(not training and not grad for training, grad, _ in model.inner.calls)
    assert model.training and not model.inner.training


def test_regression_mse_and_batches_without_lengths() -> None:
    inputs = torch.tensor([[[1.0], [2.0]], [[0.0], [4.0]], [[3.0], [-1.0]]])  # (3, 2, 1): last steps 2, 4, -1
    targets = torch.tensor([1.0, 4.0, 1.0])
    expected = ((2 - 1) ** 2 + 0**2 + (-1 - 1) ** 2) / 3
    model = LastStep()
    assert evaluate(model, SequenceData(inputs, targets), "regression") == pytest.approx(expected)
    assert not any(lengths_given for _, _, lengths_given in model.calls)
    loader = [(inputs[:2], targets[:2]), (inputs[2:], targets[2:])]  # (B, 1) outputs against (B,) targets
    assert evaluate(model, loader, "regression") == pytest.approx(expected)


def test_direction_and_errors() -> None:
    assert higher_is_better("classification") and not higher_is_better("regression")
    with pytest.raises(KCompressError, match="unknown task"):
        higher_is_better("ranking")
    with pytest.raises(KCompressError, match="unknown task"):
        evaluate(LastStep(), classification_data(), "ranking")
    with pytest.raises(KCompressError, match=r"\(batch, classes\)"):
        evaluate(nn.Flatten(0), [(torch.zeros(2, 3), torch.zeros(2).long())])
    with pytest.raises(KCompressError, match="do not match"):
        evaluate(LastStep(), SequenceData(torch.zeros(2, 1, 3), torch.zeros(2)), "regression")
    with pytest.raises(KCompressError, match="pair"):
        evaluate(LastStep(), [(torch.zeros(2, 1, 3), None, torch.zeros(2))])
    with pytest.raises(KCompressError, match="empty"):
        evaluate(LastStep(), [])
