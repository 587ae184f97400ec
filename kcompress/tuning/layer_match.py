"""Intermediate matching for distillation: the outputs of named layers of the student against the teacher's.

A compressed layer sits at the same qualified name as the dense layer it replaces, so forward hooks on
both models at those names see the two output sequences. :func:`captured` records each named layer's
output (the first tensor of it: an RNN's output sequence, a PackedSequence's data, i.e. real steps only)
during a forward pass; :func:`matching_loss` is their mean normalised squared error
``‖s − t‖² / ‖t‖²``, zero when the student computes what the teacher does.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from kcompress.errors import KCompressError


@contextlib.contextmanager
def captured(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Inside the block, the returned dict maps each of ``names`` to its layer's last output (see the module
    doc); the hooks are removed afterwards. An unknown name is a KCompressError."""
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise KCompressError(f"no layer named {', '.join(missing)} to match in {type(model).__name__}")
    outputs: dict[str, Tensor] = {}

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            outputs[name] = first_tensor(output)
        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in names]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def matching_loss(student: dict[str, Tensor], teacher: dict[str, Tensor]) -> Tensor:
    """Mean over the teacher's layers of ``‖s − t‖² / ‖t‖²`` (a scalar; gradients flow into ``student``)."""
    if not teacher or set(student) != set(teacher):
        raise KCompressError("the matched layers did not all run in both the student and the teacher")
    terms = []
    for name, reference in teacher.items():
        output = student[name]
        if output.shape != reference.shape:
            raise KCompressError(f"layer {name}: student output {tuple(output.shape)} and teacher output "
                                 f"{tuple(reference.shape)} differ in shape")
        reference = reference.detach().to(output)
        terms.append((output - reference).square().sum() / reference.square().sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


def first_tensor(output: Any) -> Tensor:
    """The first tensor of a layer's output (``(output, state)`` tuples, PackedSequence data)."""
    if isinstance(output, PackedSequence):
        return output.data
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return first_tensor(output[0])
    raise KCompressError(f"cannot match layer outputs of type {type(output).__name__}")
