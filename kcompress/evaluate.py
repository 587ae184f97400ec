"""Task metrics of a model on sequence data: accuracy (classification) or mean squared error (regression)."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Union

import torch
from torch import Tensor, nn

from .data import Batch, SequenceData
from .errors import KCompressError

TASKS = ("classification", "regression")


def higher_is_better(task: str) -> bool:
    """True for accuracy (classification), False for MSE (regression)."""
    return check_task(task) == "classification"


def check_task(task: str) -> str:
    """``task`` if it is known, else KCompressError."""
    if task not in TASKS:
        raise KCompressError(f"unknown task {task!r}; use one of: {', '.join(TASKS)}")
    return task


def evaluate(
    model: nn.Module,
    data: Union[SequenceData, Iterable[Batch]],
    task: str = "classification",
    batch_size: int = 256,
) -> float:
    """Accuracy in [0, 1] (classification: argmax of ``(B, C)`` outputs) or MSE (regression) over ``data``.

    ``data`` is a ``SequenceData`` or any iterable of ``(inputs, targets)`` batches whose inputs may be a
    tuple of positional arguments. Runs without gradients in eval mode; the model's modes are restored.
    """
    check_task(task)
    batches = data.batches(batch_size) if isinstance(data, SequenceData) else data
    total, count = 0.0, 0
    with torch.no_grad(), eval_mode(model):
        for batch in batches:
            inputs, targets = split_batch(batch)
            outputs = run_model(model, inputs)
            targets = targets.to(outputs.device)
            total += float(batch_metric_sum(outputs, targets, task))
            count += targets.numel()
    if count == 0:
        raise KCompressError("cannot evaluate on empty data")
    return total / count


def split_batch(batch: object) -> Batch:
    """``(inputs, targets)`` of one batch (a 2-tuple or 2-list), else KCompressError."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        found = f"{len(batch)} items" if isinstance(batch, (tuple, list)) else f"a {type(batch).__name__}"
        raise KCompressError(f"each batch must be a pair (inputs, targets), got {found}")
    return batch[0], batch[1]


def batch_metric_sum(outputs: Tensor, targets: Tensor, task: str) -> Tensor:
    """Correct predictions (classification) or summed squared error (regression) of one batch, a scalar."""
    if task == "classification":
        if outputs.dim() != 2 or outputs.shape[0] != targets.shape[0]:
            raise KCompressError(f"a classifier must output (batch, classes) logits, got {tuple(outputs.shape)}")
        return (outputs.argmax(dim=1) == targets).sum()
    return ((match_targets(outputs, targets) - targets) ** 2).sum()


def match_targets(outputs: Tensor, targets: Tensor) -> Tensor:
    """Regression outputs reshaped to the targets' shape (``(B, 1)`` against ``(B,)``), else KCompressError."""
    if outputs.numel() != targets.numel():
        raise KCompressError(
            f"regression outputs {tuple(outputs.shape)} do not match targets {tuple(targets.shape)}"
        )
    return outputs.reshape(targets.shape)


def run_model(model: nn.Module, inputs: Union[Tensor, tuple[Tensor, ...], list[Tensor]]) -> Tensor:
    """``model(*inputs)`` for a tuple/list (e.g. ``(x, lengths)``), else ``model(inputs)``, on the model's device."""
    device = _device(model)
    if isinstance(inputs, (tuple, list)):
        return model(*(x.to(device) for x in inputs))
    return model(inputs.to(device))


def _device(model: nn.Module) -> torch.device:
    """Where the model's first parameter or buffer lives (CPU for a model without any)."""
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


@contextlib.contextmanager
def kept_modes(model: nn.Module) -> Iterator[None]:
    """Every submodule's own training flag restored after the block."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside the block; the training flags restored after."""
    with kept_modes(model):
        model.eval()
        yield
