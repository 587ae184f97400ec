"""Quantized tensors in an artifact: :func:`pack` turns the planned tensors of a state dict into their
integers (int8, or int4 two to a byte as uint8) under the tensor's own key and their float32 scales under
``key + SCALE_SUFFIX``, and describes each (bits, scale axis, shape) for the artifact's metadata;
:func:`unpack` checks a file's description against its tensors and gives the float32 values back.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from kcompress.errors import KCompressError
from kcompress.formats.quantize import QMAX, Quantized, pack_int4, quantize, unpack_int4
from kcompress.nn.quantize import TensorQuantization

#: the scales of tensor ``key`` are stored as ``key + SCALE_SUFFIX`` (no torch state-dict key holds a ':')
SCALE_SUFFIX = ":scale"


def pack(tensors: Mapping[str, Tensor], rules: Mapping[str, TensorQuantization]) -> tuple[dict[str, Tensor],
                                                                                            dict[str, Any]]:
    """``(tensors to store, description)``: every tensor of ``tensors``, the planned ones as integers and
    scales; the description maps each planned key to ``{"bits", "axis", "shape", "dtype"}``."""
    stored, described = dict(tensors), {}
    for key, spec in rules.items():
        original = tensors[key]
        quantized = quantize(original, spec.bits, spec.axis)
        stored[key] = pack_int4(quantized.values) if spec.bits == 4 else quantized.values
        stored[key + SCALE_SUFFIX] = quantized.scale
        described[key] = {**spec.to_dict(), "shape": list(original.shape),
                          "dtype": str(original.dtype).removeprefix("torch.")}
    return stored, described


def unpack(tensors: Mapping[str, Tensor], described: Any) -> dict[str, Tensor]:
    """The state dict an artifact's ``tensors`` and its quantization ``described`` stand for: each described
    tensor dequantized (to its recorded dtype), its scales removed; every entry checked first."""
    if not isinstance(described, dict):
        raise KCompressError(f"quantization is {type(described).__name__}; expected a JSON object")
    if len(described) > len(tensors):
        raise KCompressError(f"the metadata describes {len(described)} quantized tensors, the file holds "
                             f"{len(tensors)} tensors")
    result = dict(tensors)
    for key, entry in described.items():
        result[key] = _restored(key, entry, tensors)
        del result[key + SCALE_SUFFIX]
    return result


def _restored(key: str, entry: Any, tensors: Mapping[str, Tensor]) -> Tensor:
    """One described tensor, checked (bits, axis, shape, dtypes, scales finite and positive) and dequantized."""
    where = f"quantization[{key!r}]"
    if not isinstance(entry, dict):
        raise KCompressError(f"{where} is {type(entry).__name__}; expected a JSON object")
    bits, axis, shape, dtype = entry.get("bits"), entry.get("axis"), entry.get("shape"), entry.get("dtype")
    if bits not in QMAX:
        raise KCompressError(f"{where}.bits is {bits!r}; expected 8 or 4")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                              for s in shape):
        raise KCompressError(f"{where}.shape is {shape!r}; expected a list of sizes")
    if axis is not None and (not isinstance(axis, int) or isinstance(axis, bool) or not 0 <= axis < len(shape)):
        raise KCompressError(f"{where}.axis is {axis!r}; expected null or an axis of shape {shape}")
    if dtype not in ("float32", "float16", "bfloat16", "float64"):
        raise KCompressError(f"{where}.dtype is {dtype!r}; expected a floating-point dtype")
    for name in (key, key + SCALE_SUFFIX):
        if name not in tensors:
            raise KCompressError(f"{name} is missing from the file")
    values, scale = tensors[key], tensors[key + SCALE_SUFFIX]
    scales = 1 if axis is None else shape[axis]
    if scale.dtype != torch.float32 or tuple(scale.shape) != (scales,):
        raise KCompressError(f"{key + SCALE_SUFFIX} is {scale.dtype} {tuple(scale.shape)}; expected float32 "
                             f"({scales},)")
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise KCompressError(f"{key + SCALE_SUFFIX} holds scales that are not finite and positive")
    if bits == 4:
        values = unpack_int4(values, tuple(shape))
    elif values.dtype != torch.int8 or list(values.shape) != shape:
        raise KCompressError(f"{key} is {values.dtype} {tuple(values.shape)}; expected int8 {tuple(shape)}")
    if values.numel() and int(values.to(torch.int16).abs().max()) > QMAX[bits]:
        raise KCompressError(f"{key} holds values beyond ±{QMAX[bits]}")
    restored = Quantized(values, scale, axis, bits).dequantize()
    return restored.to(getattr(torch, dtype))
