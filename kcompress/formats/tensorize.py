"""Tensorization: mode shapes for a weight matrix, padding, and the (m_k·n_k) rearrangement.

A weight ``W`` of shape ``(M, N)`` (``y = W x``) is viewed as an order-``2d`` tensor with output modes
``out_modes = (m_1, …, m_d)`` and input modes ``in_modes = (n_1, …, n_d)``; mode 1 is the most
significant digit of both the row and the column index (row-major, as ``numpy.kron``).  When ``M`` or
``N`` factors badly it is zero-padded to a nearby well-factorable size; the padding is recorded and every
output is cropped back exactly.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from kcompress.errors import KCompressError

#: a factorization is accepted when its largest factor is at most this times the ideal ``n**(1/d)``
BALANCE_TOLERANCE = 2.0
#: padding is never more than this fraction of the dimension
MAX_PADDING_FRACTION = 0.25


@dataclass(frozen=True)
class Tensorization:
    """How a ``(out_features, in_features)`` matrix is folded into modes.

    ``prod(out_modes) >= out_features`` and ``prod(in_modes) >= in_features``; the difference is zero
    padding (extra rows/columns of zeros) that is cropped from every result.
    """

    out_features: int
    in_features: int
    out_modes: tuple[int, ...]
    in_modes: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.out_modes) != len(self.in_modes):
            raise KCompressError(
                f"out_modes {self.out_modes} and in_modes {self.in_modes} must have the same length"
            )
        if any(m < 1 for m in self.out_modes + self.in_modes):
            raise KCompressError(f"mode sizes must be positive, got {self.out_modes} x {self.in_modes}")
        if self.padded_out < self.out_features or self.padded_in < self.in_features:
            raise KCompressError(
                f"modes {self.out_modes} x {self.in_modes} (product {self.padded_out} x {self.padded_in}) "
                f"do not cover the matrix {self.out_features} x {self.in_features}"
            )

    @property
    def order(self) -> int:
        return len(self.out_modes)

    @property
    def padded_out(self) -> int:
        return math.prod(self.out_modes)

    @property
    def padded_in(self) -> int:
        return math.prod(self.in_modes)

    @property
    def padding(self) -> tuple[int, int]:
        """Zero rows and zero columns added: ``(padded_out - M, padded_in - N)``."""
        return self.padded_out - self.out_features, self.padded_in - self.in_features

    @property
    def merged_modes(self) -> tuple[int, ...]:
        """Mode sizes ``m_k·n_k`` of the rearranged tensor."""
        return tuple(m * n for m, n in zip(self.out_modes, self.in_modes))

    def pad_weight(self, weight: Tensor) -> Tensor:
        """``(M, N)`` -> ``(prod(out_modes), prod(in_modes))`` with zeros appended."""
        pad_rows, pad_cols = self.padding
        if pad_rows == 0 and pad_cols == 0:
            return weight
        return torch.nn.functional.pad(weight, (0, pad_cols, 0, pad_rows))

    def pad_input(self, x: Tensor) -> Tensor:
        """``(..., N)`` -> ``(..., prod(in_modes))``."""
        pad_cols = self.padded_in - self.in_features
        return x if pad_cols == 0 else torch.nn.functional.pad(x, (0, pad_cols))

    def crop_output(self, y: Tensor) -> Tensor:
        """``(..., prod(out_modes))`` -> ``(..., M)``."""
        return y if self.padded_out == self.out_features else y[..., : self.out_features]

    def crop_weight(self, weight: Tensor) -> Tensor:
        """``(prod(out_modes), prod(in_modes))`` -> ``(M, N)``."""
        return weight[: self.out_features, : self.in_features]

    def rearrange(self, weight: Tensor) -> Tensor:
        """Padded ``(M', N')`` matrix -> order-d tensor of shape ``merged_modes``.

        Entry ``(i_1 j_1, …, i_d j_d)`` (each pair row-major) holds ``W[i, j]``; a sum of Kronecker
        products ``Σ_r A_r^1 ⊗ … ⊗ A_r^d`` becomes exactly a rank-R CP tensor (Van Loan–Pitsianis).
        """
        d = self.order
        t = weight.reshape(self.out_modes + self.in_modes)
        interleave = [axis for k in range(d) for axis in (k, d + k)]
        return t.permute(interleave).reshape(self.merged_modes)

    def unrearrange(self, tensor: Tensor) -> Tensor:
        """Inverse of :meth:`rearrange`: tensor of shape ``merged_modes`` -> padded ``(M', N')``."""
        d = self.order
        t = tensor.reshape([s for pair in zip(self.out_modes, self.in_modes) for s in pair])
        deinterleave = [2 * k for k in range(d)] + [2 * k + 1 for k in range(d)]
        return t.permute(deinterleave).reshape(self.padded_out, self.padded_in)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_features": self.out_features,
            "in_features": self.in_features,
            "out_modes": list(self.out_modes),
            "in_modes": list(self.in_modes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Tensorization":
        return cls(
            int(data["out_features"]),
            int(data["in_features"]),
            tuple(int(m) for m in data["out_modes"]),
            tuple(int(n) for n in data["in_modes"]),
        )

    def describe(self) -> str:
        """Human-readable ``(4,4,16)x(8,8,8)`` plus padding when there is some."""
        text = f"({','.join(map(str, self.out_modes))})x({','.join(map(str, self.in_modes))})"
        pad_rows, pad_cols = self.padding
        if pad_rows or pad_cols:
            text += f" pad+{pad_rows}x+{pad_cols}"
        return text


def default_order(out_features: int, in_features: int) -> int:
    """Tensor order d chosen from the larger dimension: 2 below 64, 3 below 8192, else 4."""
    largest = max(out_features, in_features)
    if largest < 64:
        return 2
    return 3 if largest < 8192 else 4


@lru_cache(maxsize=4096)
def balanced_factors(n: int, order: int) -> tuple[int, ...]:
    """The factorization of ``n`` into ``order`` factors (ascending) with the smallest largest factor.

    Ties are broken by the largest smallest factor. ``balanced_factors(1024, 3) == (8, 8, 16)``.
    """
    if order == 1:
        return (n,)
    best: Optional[tuple[int, ...]] = None
    for first in _divisors(n):
        if first ** order > n:
            break
        rest = balanced_factors(n // first, order - 1)
        if rest[0] < first:
            continue
        candidate = (first,) + rest
        if best is None or (candidate[-1], -candidate[0]) < (best[-1], -best[0]):
            best = candidate
    if best is None:  # n has too few divisors; ones fill the low modes
        best = (1,) * (order - 1) + (n,)
    return best


def _divisors(n: int) -> list[int]:
    small = [k for k in range(1, math.isqrt(n) + 1) if n % k == 0]
    return sorted(set(small + [n // k for k in small]))


def _balance(factors: Sequence[int], n: int) -> float:
    return max(factors) / n ** (1.0 / len(factors))


def factor_dimension(n: int, order: int) -> tuple[int, ...]:
    """Balanced mode sizes for dimension ``n``, zero-padding ``n`` upwards when it factors badly.

    The smallest ``n' >= n`` whose balanced factorization has its largest factor within
    :data:`BALANCE_TOLERANCE` of ``n'**(1/order)`` is used (e.g. a prime or ``4·131 = 524`` is padded);
    if none exists within :data:`MAX_PADDING_FRACTION`, the best-balanced candidate is taken.
    """
    if n < 1 or order < 1:
        raise KCompressError(f"cannot factor dimension {n} into {order} modes")
    limit = n + max(1, int(n * MAX_PADDING_FRACTION))
    best, best_balance = balanced_factors(n, order), _balance(balanced_factors(n, order), n)
    for candidate in range(n, limit + 1):
        factors = balanced_factors(candidate, order)
        balance = _balance(factors, candidate)
        if balance <= BALANCE_TOLERANCE:
            return factors
        if balance < best_balance:
            best, best_balance = factors, balance
    return best


def choose_tensorization(
    out_features: int,
    in_features: int,
    order: Optional[int] = None,
    out_modes: Optional[Sequence[int]] = None,
    in_modes: Optional[Sequence[int]] = None,
    out_group: int = 1,
) -> Tensorization:
    """Pick mode shapes for an ``(out_features, in_features)`` matrix.

    Explicit ``out_modes``/``in_modes`` are used as given (their products may exceed the dimension:
    the rest is padding). ``out_group`` > 1 folds a group axis into the first output mode (the gates of
    a fused LSTM/GRU matrix: ``4H`` rows become ``(4·h_1, h_2, …)`` with ``H = h_1·h_2·…``).
    """
    if out_modes is not None and in_modes is not None:
        return Tensorization(out_features, in_features, tuple(out_modes), tuple(in_modes))
    if order is None:
        given = out_modes if out_modes is not None else in_modes
        order = len(given) if given is not None else default_order(out_features, in_features)
    if out_modes is None:
        if out_group > 1 and out_features % out_group == 0:
            per_group = factor_dimension(out_features // out_group, order)
            out_modes = (per_group[0] * out_group,) + tuple(per_group[1:])
        else:
            out_modes = factor_dimension(out_features, order)
    if in_modes is None:
        in_modes = factor_dimension(in_features, order)
    return Tensorization(out_features, in_features, tuple(out_modes), tuple(in_modes))


def mode_orders(order: int) -> list[tuple[int, ...]]:
    """Every processing order of ``order`` modes (all permutations up to 6 modes, else the natural one)."""
    if order <= 6:
        return list(itertools.permutations(range(order)))
    return [tuple(range(order))]
