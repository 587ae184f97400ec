"""Truncated SVD, the baseline users compare against: ``W ≈ U V`` with ``U (M, r)`` and ``V (r, N)``.

Eckart–Young: the rank-r truncation is the best rank-r approximation in Frobenius norm. The format uses
no modes (order 1, no padding).
"""

from __future__ import annotations

from typing import Optional, cast

import torch
from torch import Tensor, nn

from kcompress.formats.base import Factorization, ProgressFn, Rank
from kcompress.formats.data_fit import DataFitSettings, output_error, whitened_svd
from kcompress.formats.options import FormatOptions
from kcompress.formats.tensorize import Tensorization


class SVD(Factorization):
    """``W ≈ U @ V``; multiply is two thin GEMMs, ``(x @ V.T) @ U.T``."""

    name = "svd"
    factored = False
    exact_at_max_rank = True
    summary = "truncated SVD, W ≈ U·V (baseline)"

    def _allocate(self) -> None:
        tz = self.tensorization
        self.left = nn.Parameter(torch.empty(tz.out_features, self.rank))
        self.right = nn.Parameter(torch.empty(self.rank, tz.in_features))

    @classmethod
    def param_count(cls, tensorization: Tensorization, rank: Rank) -> int:
        return cast(int, rank) * (tensorization.out_features + tensorization.in_features)

    @classmethod
    def max_rank(cls, tensorization: Tensorization) -> int:
        return min(tensorization.out_features, tensorization.in_features)

    @classmethod
    def macs(cls, tensorization: Tensorization, rank: Rank, options: Optional[FormatOptions] = None) -> int:
        return cls.param_count(tensorization, rank)

    def _fit(self, weight: Tensor, seed: int, progress: Optional[ProgressFn]) -> tuple[int, list[float]]:
        weight = self.tensorization.crop_weight(weight)
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        root = s[: self.rank].sqrt()
        self.left.copy_(u[:, : self.rank] * root)
        self.right.copy_(root[:, None] * vh[: self.rank])
        tail = s[self.rank :].square().sum().sqrt() / s.square().sum().sqrt().clamp_min(1e-300)
        if progress is not None:
            progress(1, 1, float(tail))
        return 1, [float(tail)]

    def _fit_to_data(
        self, weight: Tensor, moment: Tensor, settings: DataFitSettings, seed: int, progress: Optional[ProgressFn],
        row_weights: Optional[Tensor],
    ) -> tuple[str, int]:
        """The closed-form optimum at this rank: truncated SVD of the whitened weight (:func:`whitened_svd`)."""
        left, right = whitened_svd(weight, moment, self.rank, settings.ridge, row_weights)
        with torch.no_grad():
            self.left.copy_(left)
            self.right.copy_(right)
        if progress is not None:
            progress(1, 1, output_error(weight, left @ right, moment, row_weights))
        return "closed form", 1

    def _multiply(self, x: Tensor) -> Tensor:
        return (x @ self.right.T) @ self.left.T

    def _reconstruct(self) -> Tensor:
        return self.left @ self.right

    def low_rank_factors(self) -> tuple[Tensor, Tensor]:
        return self.left, self.right

    def _rows(self, index: Tensor, digits: Tensor) -> Tensor:
        return self.left[index] @ self.right
