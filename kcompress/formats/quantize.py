"""Symmetric integer storage of one tensor: int8 or int4 values and one float32 scale per slice.

``quantize(t, bits, axis)`` stores ``q = clamp(round(t / s), -qmax, qmax)`` (``qmax`` 127 for int8, 7 for
int4) with one scale ``s`` per index of ``axis`` (``axis=None``: one for the whole tensor); ``dequantize``
gives ``q · s`` in float32. int8 scales are ``max|t| / qmax`` per slice, so every value is within half a step
``s / 2`` of the original. int4 has only 15 levels: each slice's scale is the clipped one (``c · max|t| /
qmax`` for ``c`` in :data:`INT4_CLIPS`) with the smallest squared error, as is usual for 4-bit weights.

Quantization is idempotent: ``quantize(dequantize(x))`` gives ``x`` back bit for bit (each scale is a fixed
point of the float32 map ``s -> fl(fl(qmax · s) / qmax)`` that re-quantizing applies), so a quantized model
saved, loaded and saved again stores the same integers and scales.

int4 values are stored two to a byte (:func:`pack_int4`: ``q + 8`` in the low nibble for even positions,
the high nibble for odd ones).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from kcompress.errors import KCompressError

#: bits -> the largest stored magnitude
QMAX = {8: 127, 4: 7}
#: clipping ratios tried per slice for int4 (first: no clipping)
INT4_CLIPS = tuple(1.0 - 0.05 * k for k in range(11))


@dataclass(frozen=True)
class Quantized:
    """``values`` int8 of the tensor's shape, ``scale`` float32 ``(shape[axis],)`` or ``(1,)``."""

    values: Tensor
    scale: Tensor
    axis: Optional[int]
    bits: int

    def dequantize(self) -> Tensor:
        """``values · scale`` as float32, the tensor's shape."""
        return self.values.to(torch.float32) * _broadcast(self.scale, self.values.dim(), self.axis)


def check_bits(bits: int) -> int:
    if bits not in QMAX:
        raise KCompressError(f"quantization stores 8 or 4 bits, got {bits!r}")
    return bits


def quantize(tensor: Tensor, bits: int, axis: Optional[int]) -> Quantized:
    """``tensor`` (floating, any shape) as :class:`Quantized` with one scale per index of ``axis``."""
    qmax = QMAX[check_bits(bits)]
    values = tensor.detach().to("cpu", torch.float32)
    slices = values.movedim(axis, 0).reshape(values.shape[axis], -1) if axis is not None else values.reshape(1, -1)
    amax = slices.abs().amax(dim=1) if slices.shape[1] else torch.zeros(slices.shape[0])
    clips = INT4_CLIPS if bits == 4 else (1.0,)
    best_scale, best_error = None, None
    for clip in clips:
        scale = _stable(torch.where(amax > 0, amax * clip / qmax, torch.ones_like(amax)), qmax)
        error = (_rounded(slices, scale[:, None], qmax) * scale[:, None] - slices).square().sum(dim=1)
        if best_scale is None:
            best_scale, best_error = scale, error
        else:
            assert best_error is not None  # set with best_scale on the first clip
            better = error < best_error
            best_scale, best_error = torch.where(better, scale, best_scale), torch.where(better, error, best_error)
    assert best_scale is not None  # clips is never empty
    q = _rounded(values, _broadcast(best_scale, values.dim(), axis), qmax).to(torch.int8)
    return Quantized(q, best_scale, axis, bits)


def _rounded(values: Tensor, scale: Tensor, qmax: int) -> Tensor:
    return torch.clamp(torch.round(values / scale), -qmax, qmax)


def _stable(scale: Tensor, qmax: int) -> Tensor:
    """``scale`` moved (by at most an ulp or two) to a fixed point of ``s -> fl(fl(qmax · s) / qmax)``: the
    scale re-quantizing the dequantized values computes, so quantization is idempotent."""
    for _ in range(4):
        moved = (scale * qmax) / qmax
        if torch.equal(moved, scale):
            return scale
        scale = moved
    raise KCompressError("no stable quantization scale found")  # never seen: one step has always sufficed


def _broadcast(scale: Tensor, dim: int, axis: Optional[int]) -> Tensor:
    """``scale`` shaped to multiply a ``dim``-dimensional tensor along ``axis`` (a scalar for ``None``)."""
    if axis is None:
        return scale.reshape(())
    shape = [1] * dim
    shape[axis] = -1
    return scale.reshape(shape)


def pack_int4(values: Tensor) -> Tensor:
    """int8 values in ``[-7, 7]`` (any shape) -> uint8 ``(ceil(n / 2),)``, two per byte."""
    flat = (values.reshape(-1).to(torch.int16) + 8).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_int4`: int8 values of ``shape``."""
    count = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (count + 1) // 2:
        raise KCompressError(f"int4 data must be uint8 ({(count + 1) // 2},) for shape {tuple(shape)}, got "
                             f"{packed.dtype} {tuple(packed.shape)}")
    pairs = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:count]
    return (pairs.to(torch.int16) - 8).to(torch.int8).reshape(shape)


def stored_bytes(numel: int, scales: int, bits: int) -> int:
    """Bytes of a quantized tensor as stored: its values (one byte each for int8, two per byte for int4)
    and its float32 scales."""
    return (numel if check_bits(bits) == 8 else (numel + 1) // 2) + 4 * scales
