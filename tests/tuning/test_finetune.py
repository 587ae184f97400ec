"""finetune(): distillation without labels, early stopping, seeding, DataLoaders, progress events."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from kcompress.errors import KCompressError
from kcompress.io.models import SequenceClassifier
from kcompress.progress import ProgressEvent
from kcompress.tuning.data import SequenceData, load_builtin
from kcompress.tuning.evaluate import evaluate
from kcompress.tuning.finetune import FinetuneResult, finetune
from tests.conftest import EXAMPLE_LSTM


@pytest.fixture(scope="module")
def trained() -> SequenceClassifier:
    """The bundled JapaneseVowels LSTM (97.6 % test accuracy)."""
    model = SequenceClassifier.from_state_dict(torch.load(EXAMPLE_LSTM, weights_only=True))
    assert model is not None
    return model.eval()


@pytest.fixture(scope="module")
def train() -> SequenceData:
    return load_builtin("japanese-vowels", "train")


@pytest.fixture(scope="module")
def test() -> SequenceData:
    return load_builtin("japanese-vowels", "test")


def damaged(model: SequenceClassifier, scale: float = 2.0) -> SequenceClassifier:
    """A copy whose LSTM matrices carry seeded noise of ``scale`` times their std."""
    copy_ = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for weight in (copy_.rnn.weight_ih_l0, copy_.rnn.weight_hh_l0):
            weight.add_(scale * weight.std() * torch.randn(weight.shape, generator=generator))
    return copy_


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_distillation_recovers_accuracy_without_labels(
    trained: SequenceClassifier, train: SequenceData, test: SequenceData
) -> None:
    student = damaged(trained)
    before = evaluate(student, test)
    assert before < 0.7
    garbage = SequenceData(train.inputs, torch.full((len(train),), 10**6), train.lengths)  # no such class
    with pytest.raises(KCompressError, match=r"0\.\.8"):  # any use of the garbage labels would fail
        finetune(copy.deepcopy(student), garbage, epochs=1, loss="task")
    result = finetune(student, garbage, teacher=trained, loss="distill", epochs=20, lr=1e-2, patience=5)
    assert result.model is student and result.metric == "distill_loss" and not result.higher_is_better
    assert result.best_val < result.history[0].val
    assert evaluate(student, test) > 0.9 > before + 0.2


def test_best_state_is_restored(trained: SequenceClassifier, train: SequenceData, test: SequenceData) -> None:
    events: list[ProgressEvent] = []
    result = finetune(
        damaged(trained), train, epochs=6, lr=1e-2, val_data=test, patience=None, progress=events.append
    )
    vals = [record.val for record in result.history]
    assert result.metric == "accuracy" and result.higher_is_better and len(vals) == 7
    assert result.best_val == max(vals) == vals[result.best_epoch] > vals[-1]  # the last epoch was worse
    assert evaluate(result.model, test) == result.best_val
    assert [(e.stage, e.name, e.index, e.total, e.error) for e in events] == [
        ("epoch", "finetune", epoch, 6, val) for epoch, val in enumerate(vals)
    ]


def test_early_stopping_keeps_the_start_when_training_only_hurts(
    trained: SequenceClassifier, train: SequenceData
) -> None:
    model = copy.deepcopy(trained)
    result = finetune(model, train, epochs=10, lr=1.0, patience=2)  # a learning rate that wrecks the model
    assert result.best_epoch == 0 and result.stopped_early and len(result.history) == 3
    assert all(record.val < result.best_val for record in result.history[1:])
    assert same_state(model, trained)
    assert evaluate(model, train.split(0.2, seed=0)[1]) == result.best_val


def run(model: SequenceClassifier, data: SequenceData, seed: int) -> FinetuneResult:
    return finetune(copy.deepcopy(model), data, epochs=2, lr=1e-2, seed=seed, patience=None)


def test_seeded_runs_are_identical_and_leave_the_global_rng_alone(
    trained: SequenceClassifier, train: SequenceData
) -> None:
    student = damaged(trained, scale=1.0)
    state = torch.get_rng_state()
    first = run(student, train, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    second, other = run(student, train, seed=3), run(student, train, seed=4)
    assert first.history == second.history and same_state(first.model, second.model)
    assert not same_state(first.model, other.model)


class PairedDataset(Dataset):
    """Items ``((x (T, F), length), y)``: default collation gives ``[[x (B, T, F), lengths (B,)], y (B,)]``."""

    def __init__(self, data: SequenceData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        return (self.data.inputs[index], self.data.lengths[index]), self.data.targets[index]


def test_dataloader_batches_with_lengths(trained: SequenceClassifier, train: SequenceData) -> None:
    loader = DataLoader(PairedDataset(train), batch_size=32, shuffle=True)
    model = damaged(trained, scale=1.0)
    model.train()
    result = finetune(model, loader, epochs=3, lr=1e-2, patience=None, seed=5)
    assert result.metric == "train_loss" and not result.higher_is_better
    assert result.best_val < result.history[0].val
    assert model.training, "the caller's mode comes back"
    repeat = finetune(damaged(trained, scale=1.0), loader, epochs=3, lr=1e-2, patience=None, seed=5)
    assert result.history == repeat.history, "a shuffling DataLoader is seeded too"
    with_val = finetune(damaged(trained, scale=1.0), loader, epochs=1, val_data=train)
    assert with_val.metric == "accuracy"


def test_argument_errors(trained: SequenceClassifier, train: SequenceData) -> None:
    with pytest.raises(KCompressError, match="needs a teacher"):
        finetune(copy.deepcopy(trained), train, loss="distill")
    with pytest.raises(KCompressError, match="separate model"):
        finetune(trained, train, teacher=trained, loss="both")
    with pytest.raises(KCompressError, match="unknown loss"):
        finetune(copy.deepcopy(trained), train, loss="hinge")
    with pytest.raises(KCompressError, match="re-iterable"):
        finetune(copy.deepcopy(trained), iter([(train.inputs, train.targets)]))
    with pytest.raises(KCompressError, match="integer class"):
        finetune(copy.deepcopy(trained), [((train.inputs, train.lengths), train.targets.float())], epochs=1)


class MeanRegressor(torch.nn.Module):
    """``x (B, T, F)`` -> ``(B, 1)``: a linear map of the time-averaged input."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(dim=1))


def test_regression_task_and_distillation() -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(200, 5, 3, generator=generator)
    data = SequenceData(inputs, inputs.mean(dim=1) @ torch.tensor([1.0, -2.0, 0.5]) + 0.3)
    teacher = MeanRegressor(3)
    result = finetune(teacher, data, task="regression", epochs=30, lr=5e-2, patience=None)
    assert result.metric == "mse" and not result.higher_is_better
    assert evaluate(teacher, data, "regression") < 1e-3 < result.history[0].val
    student = MeanRegressor(3)
    unlabeled = SequenceData(inputs, torch.full((200,), float("nan")))
    distilled = finetune(student, unlabeled, teacher=teacher, loss="distill", task="regression", epochs=30, lr=5e-2)
    assert distilled.best_val < 1e-3
    torch.testing.assert_close(student(inputs), teacher(inputs), atol=0.05, rtol=0)
