"""Row blocks of one matrix, each in its own format: the gates of an LSTM/GRU matrix fitted separately.

``Stack([W_i, W_f, W_g, W_o])`` acts as the ``(4H, N)`` matrix ``[W_i; W_f; W_g; W_o]``. It offers the same
public methods as a :class:`~kcompress.formats.base.Factorization`, so layers never know whether the gates
were fitted together or apart.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from kcompress.formats.base import FitInfo, ProgressFn
from kcompress.formats.data_fit import DataFitInfo, DataFitSettings


class Stack(nn.Module):
    """Concatenation along the output dimension of several matrix modules with the same input size."""

    name = "stack"

    def __init__(self, parts: Sequence[nn.Module]) -> None:
        super().__init__()
        # Any: the parts are Factorization-like, but nn.Module attributes are typed as Tensor | Module
        self.parts: Any = nn.ModuleList(parts)
        members: Sequence[Any] = parts
        self.in_features = members[0].tensorization.in_features
        self.out_features = sum(part.tensorization.out_features for part in members)

    def forward(self, x: Tensor) -> Tensor:
        return self.multiply(x)

    def multiply(self, x: Tensor) -> Tensor:
        """``(..., N) -> (..., Σ M_i)``."""
        return torch.cat([part.multiply(x) for part in self.parts], dim=-1)

    def reconstruct(self) -> Tensor:
        return torch.cat([part.reconstruct() for part in self.parts], dim=0)

    def num_params(self) -> int:
        return sum(part.num_params() for part in self.parts)

    def macs_per_vector(self) -> int:
        return sum(part.macs_per_vector() for part in self.parts)

    @property
    def fit_info(self) -> Optional[FitInfo]:
        """Combined over the parts: the stacked matrix's relative error and the summed fit time."""
        infos = [part.fit_info for part in self.parts]
        if any(info is None for info in infos):
            return None
        squared = sum((info.relative_error * info.reference_norm) ** 2 for info in infos)
        total = sum(info.reference_norm**2 for info in infos)
        return FitInfo(
            relative_error=(squared / total) ** 0.5 if total > 0 else 0.0,
            seconds=sum(info.seconds for info in infos),
            iterations=max(info.iterations for info in infos),
            reference_norm=total**0.5,
        )

    def fit_to_data(
        self,
        weight: Tensor,
        moment: Tensor,
        holdout: Tensor,
        settings: DataFitSettings = DataFitSettings(),
        *,
        seed: int = 0,
        progress: Optional[ProgressFn] = None,
        start: Optional[nn.Module] = None,
        row_weights: Optional[Tensor] = None,
    ) -> DataFitInfo:
        """Each part fitted to its row block of ``weight`` on the same inputs (the output error is a sum over
        row blocks, so this minimises the whole), from the same part of ``start`` (a ``Stack`` of as many
        parts) when given, with the rows of ``row_weights`` split the same way; the errors combined over the
        parts."""
        rows = [part.tensorization.out_features for part in self.parts]
        starts = list(start.parts) if isinstance(start, Stack) and len(start.parts) == len(self.parts) else None
        blocks = weight.split(rows)
        weights = [None] * len(rows) if row_weights is None else row_weights.split(rows)
        infos = [part.fit_to_data(block, moment, holdout, settings, seed=seed, progress=progress,
                                  start=None if starts is None else starts[index], row_weights=weights[index])
                 for index, (part, block) in enumerate(zip(self.parts, blocks))]
        reference = sum(info.reference for info in infos)

        def combined(key: str) -> float:
            if reference <= 0:
                return 0.0
            return (sum(getattr(info, key) ** 2 * info.reference for info in infos) / reference) ** 0.5

        return DataFitInfo(combined("before"), combined("after"), combined("fit_before"), combined("fit_after"),
                           any(info.kept for info in infos), infos[0].method,
                           max(info.iterations for info in infos), sum(info.seconds for info in infos), reference)

    def config(self) -> dict[str, Any]:
        return {"format": self.name, "parts": [part.config() for part in self.parts]}
