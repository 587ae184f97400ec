"""Which tensors of a compressed model are stored as integers, and how (:func:`quantization_rules`), the model
run on exactly the values its artifact stores (:func:`quantize_model`), and the artifact's tensor bytes
(:func:`tensor_bytes`).

With ``quantize="int8"`` (or ``"int4"``) every floating tensor of ``model.state_dict()`` with at least two
dimensions is stored with that many bits (:mod:`kcompress.formats.quantize`):

* the factors of compressed matrices with one scale per slice along their smallest axis longer than 1 (the
  rank axis of an SVD factor, a bond of a TT core);
* every other matrix (untouched weights, matrices kept dense, embeddings not compressed) with one scale
  per row (per output channel), or one for the whole tensor when rows hold fewer than
  :data:`MIN_PER_SCALE` values each.

Biases (1-D tensors named ``bias*``) are stored as int8 with one scale (int4 biases cost more accuracy than
they save bytes); every other tensor (norms, running statistics, scalars, integers) stays as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from kcompress.errors import KCompressError
from kcompress.formats.quantize import check_bits, quantize, stored_bytes
from kcompress.nn.base import CompressedLayer
from kcompress.nn.execution import is_dense

#: ``quantize`` setting -> bits of the matrices and factors
QUANTIZE_BITS = {"int8": 8, "int4": 4}
#: a per-row scale is used only when each row holds at least this many values
MIN_PER_SCALE = 8
BIAS_BITS = 8


@dataclass(frozen=True)
class TensorQuantization:
    """How one state-dict tensor is stored: ``bits`` and the ``axis`` of its scales (None: one scale)."""

    bits: int
    axis: Optional[int]

    def to_dict(self) -> dict[str, Optional[int]]:
        return {"bits": self.bits, "axis": self.axis}


def check_quantize(mode: object) -> Optional[str]:
    """``None``, ``"int8"`` or ``"int4"``; anything else is a one-line error."""
    if mode is not None and mode not in QUANTIZE_BITS:
        raise KCompressError(f"quantize must be one of {', '.join(QUANTIZE_BITS)} (or none), got {mode!r}")
    return mode


def quantization_rules(model: nn.Module, mode: Optional[str]) -> dict[str, TensorQuantization]:
    """``{state-dict key: TensorQuantization}`` of the tensors stored as integers (see the module docs)."""
    if check_quantize(mode) is None:
        return {}
    assert mode is not None  # check_quantize returns mode itself
    bits = QUANTIZE_BITS[mode]
    factors = _factor_keys(model)
    rules = {}
    for key, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        if key in factors:
            rules[key] = factor_quantization(tensor, bits)
        elif tensor.dim() >= 2:
            per_row = tensor.shape[0] * MIN_PER_SCALE <= tensor.numel()
            rules[key] = TensorQuantization(bits, 0 if per_row else None)
        elif tensor.dim() == 1 and key.rpartition(".")[2].startswith("bias"):
            rules[key] = TensorQuantization(BIAS_BITS, None)
    return rules


def _factor_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the factors of every compressed (not dense) matrix."""
    keys: set[str] = set()
    for path, module in model.named_modules():
        if isinstance(module, CompressedLayer):
            for name, matrix in module.matrices.items():
                if not is_dense(matrix):
                    prefix = ".".join(part for part in (path, "matrices", name) if part)
                    keys.update(f"{prefix}.{key}" for key in matrix.state_dict())
    return keys


def _slice_axis(tensor: Tensor) -> Optional[int]:
    """The smallest axis longer than 1 (the first of equals), None when there is none."""
    axes = [axis for axis in range(tensor.dim()) if tensor.shape[axis] > 1]
    return min(axes, key=lambda axis: tensor.shape[axis]) if axes else None


def quantize_model(model: nn.Module, rules: Mapping[str, TensorQuantization]) -> None:
    """Replace, in place, each planned tensor's values by their dequantized integers: the model then computes
    exactly what the artifact will store (quantizing again changes nothing)."""
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, spec in rules.items():
            tensor = state[key]
            tensor.copy_(quantize(tensor, spec.bits, spec.axis).dequantize().to(tensor.dtype))


def tensor_bytes(model: nn.Module, rules: Optional[Mapping[str, TensorQuantization]] = None) -> int:
    """Bytes of the tensors an artifact of ``model`` stores: each state-dict tensor's, the planned ones as
    integers and scales (:func:`kcompress.formats.quantize.stored_bytes`)."""
    rules = rules or {}
    return sum(stored_tensor_bytes(tensor, rules.get(key)) for key, tensor in model.state_dict().items())


def stored_tensor_bytes(tensor: Tensor, spec: Optional[TensorQuantization]) -> int:
    """Bytes of one tensor as an artifact stores it: as it is (``spec`` None), or as integers and scales."""
    if spec is None:
        return tensor.numel() * tensor.element_size()
    scales = 1 if spec.axis is None else tensor.shape[spec.axis]
    return stored_bytes(tensor.numel(), scales, check_bits(spec.bits))


def factor_bytes(matrix: nn.Module, mode: Optional[str]) -> int:
    """Bytes of a compressed matrix's factors (its state dict) as an artifact with storage ``mode`` stores them
    (the factors' rule of :func:`quantization_rules`)."""
    bits = QUANTIZE_BITS.get(check_quantize(mode) or "")
    return sum(stored_tensor_bytes(tensor, factor_quantization(tensor, bits)
                                   if bits is not None and tensor.is_floating_point() else None)
               for tensor in matrix.state_dict().values())


def factor_quantization(tensor: Tensor, bits: int) -> TensorQuantization:
    """How a factor is stored with ``bits``: one scale per slice of its smallest axis longer than 1."""
    return TensorQuantization(bits, _slice_axis(tensor))
