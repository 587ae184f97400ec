"""A size budget in bytes (:attr:`kcompress.config.BudgetOptions.size`) met by the allocation.

The budget counts the whole artifact's tensor bytes as ``report.model_bytes_after`` does
(:func:`kcompress.nn.quantize.tensor_bytes`): the allocated matrices' factors, every other tensor (untouched
weights, biases, norms) and the quantization scales. For each storage the user allows (float32 as it is,
int8, int4: :meth:`kcompress.config.StorageOptions.choices`):

* the *fixed* bytes: every tensor of the model but the allocated matrices, stored that way;
* each option's bytes: its factors (an unfitted module of the format at that rank) stored that way;
* each option's estimated output error: the format's (:mod:`kcompress.allocation.choose`) plus the output
  error of the matrix quantized per row at that width (an estimate of the noise quantizing the factors adds);

then the knapsack over the options' bytes within ``size - fixed``. The storage whose allocation has the lowest
estimated total output error is kept; its :class:`~kcompress.allocation.choose.Allocation` counts the whole
artifact (``budget``: the size, ``used``: the predicted tensor bytes, ``dense``: the dense model's).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

from torch import nn

from kcompress.allocation.auto import Prepared
from kcompress.allocation.choose import Allocation, Candidate, Option, allocate
from kcompress.errors import KCompressError
from kcompress.formats import get_format
from kcompress.formats.quantize import quantize
from kcompress.nn.quantize import QUANTIZE_BITS, factor_bytes, quantization_rules, stored_tensor_bytes, tensor_bytes


def allocate_size(model: nn.Module, prepared: Prepared, size: int,
                  storages: Sequence[Optional[str]]) -> tuple[Allocation, Optional[str]]:
    """``(allocation, storage)``: per storage of ``storages`` (None: as it is, ``"int8"``, ``"int4"``) the
    allocation whose bytes with the fixed ones fit ``size``, and of those the one with the lowest estimated
    error. A one-line error when no storage fits: naming the fixed bytes when they alone exceed ``size``."""
    best: Optional[tuple[float, Allocation, Optional[str]]] = None
    smallest: Optional[tuple[int, int, Optional[str]]] = None  # (fixed, fixed + cheapest options, storage)
    for storage in storages:
        fixed = fixed_bytes(model, prepared.candidates, storage)
        options = byte_options(prepared, storage)
        cheapest = fixed + sum(min(o.cost("bytes") for o in opts) for opts in options)
        if smallest is None or cheapest < smallest[1]:
            smallest = (fixed, cheapest, storage)
        if cheapest > size:
            continue
        allocation = allocate(prepared.candidates, options, size - fixed, "bytes")
        allocation.budget, allocation.used, allocation.dense = size, fixed + allocation.used, tensor_bytes(model)
        error = sum(row.estimated_error ** 2 * row.energy for row in allocation.rows)
        if best is None or error < best[0]:
            best = (error, allocation, storage)
    if best is None:
        assert smallest is not None  # StorageOptions.choices() is never empty
        fixed, cheapest, storage = smallest
        stored = storage or "float32"
        if fixed > size:
            raise KCompressError(f"the size budget of {size:,} bytes is below what the tensors left uncompressed "
                                 f"alone need: {fixed:,} bytes ({stored}); allow more bytes or compress more layers")
        raise KCompressError(f"the size budget of {size:,} bytes is below the smallest allocation: {cheapest:,} "
                             f"bytes ({stored}, {fixed:,} of them uncompressed tensors); allow more bytes")
    return best[1], best[2]


def fixed_bytes(model: nn.Module, candidates: Sequence[Candidate], storage: Optional[str]) -> int:
    """Bytes of every tensor of ``model`` but the ``candidates``' matrices, stored as ``storage`` plans them."""
    rules = quantization_rules(model, storage)
    state = model.state_dict()
    missing = [c.name for c in candidates if c.name not in state]
    if missing:
        raise KCompressError(f"a size budget counts the model's state dict, which has no tensor {missing[0]!r}")
    return tensor_bytes(model, rules) - sum(stored_tensor_bytes(state[c.name], rules.get(c.name)) for c in candidates)


def byte_options(prepared: Prepared, storage: Optional[str]) -> list[list[Option]]:
    """Per candidate, its options with their stored bytes and their error plus the quantization's."""
    result = []
    for candidate, options in zip(prepared.candidates, prepared.options):
        noise = 0.0 if storage is None else quantization_error(candidate, QUANTIZE_BITS[storage])
        result.append([replace(o, error=o.error + noise, bytes=option_bytes(candidate, o, storage)) for o in options])
    return result


def option_bytes(candidate: Candidate, option: Option, storage: Optional[str]) -> int:
    """Bytes of the option's factors (all row blocks) as stored with ``storage``."""
    module = get_format(option.format)(candidate.tensorizations[option.format], option.rank)
    return candidate.blocks * factor_bytes(module, storage)


def quantization_error(candidate: Candidate, bits: int) -> float:
    """``tr(D E C Eᵀ)`` of the matrix quantized to ``bits`` with one scale per row (summed over row blocks)."""
    return sum(candidate.error(block, quantize(block, bits, 0).dequantize().to(block.dtype), rows)
               for block, rows in candidate.parts())
