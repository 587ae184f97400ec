"""``dense``: the matrix kept as it is. Layers hold untouched matrices (e.g. hidden-to-hidden) in this format,
so they treat every matrix the same way."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from kcompress.formats.base import Factorization, ProgressFn, Rank
from kcompress.formats.options import FormatOptions
from kcompress.formats.tensorize import Tensorization


class Dense(Factorization):
    """The uncompressed ``(M, N)`` matrix; ``rank`` is ignored (stored as 1)."""

    name = "dense"
    factored = False
    compresses = False
    exact_at_max_rank = True
    summary = "uncompressed matrix (reference)"

    def _allocate(self) -> None:
        tz = self.tensorization
        self.weight = nn.Parameter(torch.empty(tz.out_features, tz.in_features))

    @classmethod
    def normalize_rank(cls, tensorization: Tensorization, rank: Rank) -> Any:
        return 1

    @classmethod
    def param_count(cls, tensorization: Tensorization, rank: Rank) -> int:
        return tensorization.out_features * tensorization.in_features

    @classmethod
    def max_rank(cls, tensorization: Tensorization) -> int:
        return 1

    @classmethod
    def macs(cls, tensorization: Tensorization, rank: Rank, options: Optional[FormatOptions] = None) -> int:
        return cls.param_count(tensorization, 1)

    def _fit(self, weight: Tensor, seed: int, progress: Optional[ProgressFn]) -> tuple[int, list[float]]:
        self.weight.copy_(self.tensorization.crop_weight(weight))
        return 0, [0.0]

    def _multiply(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x, self.weight)

    def _reconstruct(self) -> Tensor:
        return self.weight

    def _rows(self, index: Tensor, digits: Tensor) -> Tensor:
        return self.weight[index]
