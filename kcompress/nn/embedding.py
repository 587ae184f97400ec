"""Drop-in ``nn.Embedding`` whose table is a matrix module (``matrices["weight"]``, ``(num_embeddings, dim)``).

A lookup runs on the layer's execution paths (:mod:`kcompress.nn.execution`): ``materialized`` gathers from
the reconstructed table (cached while no gradient can reach the factors, as for every other matrix);
``factorized`` gathers the rows from the factors (``matrix.rows``, e.g. ``left[i] @ right`` for SVD, one
core slice per digit of ``i`` for TT as in TT-Rec) and never builds the table.

``padding_idx`` behaves as torch's: its row is looked up like any other and receives no gradient.
``max_norm`` is applied to the looked-up rows (the table is not renormalised in place: it is not stored);
``sparse`` gradients and ``scale_grad_by_freq`` are refused: the factors are shared by every row.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from kcompress.errors import KCompressError
from kcompress.nn.base import CompressedLayer
from kcompress.nn.execution import tracing


class CompressedEmbedding(CompressedLayer):
    """``input (*) -> (*, embedding_dim)``: the rows ``input`` of the table ``W = matrices["weight"]``."""

    dense_type = nn.Embedding
    gates = 1
    config_keys = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                   "scale_grad_by_freq", "sparse")
    attributes = config_keys

    num_embeddings: int
    embedding_dim: int
    padding_idx: Optional[int]
    max_norm: Optional[float]
    norm_type: float
    scale_grad_by_freq: bool
    sparse: bool

    @classmethod
    def parameter_names(cls, config: Mapping[str, Any]) -> tuple[list[str], list[str]]:
        return ["weight"], []

    @classmethod
    def dense_config(cls, dense: nn.Module) -> dict[str, Any]:
        if dense.sparse:
            raise KCompressError("Embedding(sparse=True) is not supported: a compressed table's factors are shared "
                                 "by every row, so its gradients are dense; use sparse=False")
        if dense.scale_grad_by_freq:
            raise KCompressError("Embedding(scale_grad_by_freq=True) is not supported: a compressed table's "
                                 "factors are shared by every row")
        return super().dense_config(dense)

    def table(self) -> Tensor:
        """The ``(num_embeddings, embedding_dim)`` table (cached as every materialized weight)."""
        return self.weight("weight")

    def forward(self, input: Tensor) -> Tensor:
        if input.dtype not in (torch.int32, torch.int64):
            raise KCompressError(f"an embedding looks up integer indices, got {input.dtype}")
        if self.materialized("weight"):
            rows = nn.functional.embedding(input, self.table(), self.padding_idx)
        else:
            _check_range(input, self.num_embeddings)
            rows = self.matrices["weight"].rows(input)  # type: ignore[operator]  # nn.Module attrs typed Tensor | Module
            if self.padding_idx is not None and torch.is_grad_enabled():
                rows = torch.where((input == self.padding_idx).unsqueeze(-1), rows.detach(), rows)
        return rows if self.max_norm is None else _renormed(rows, self.max_norm, self.norm_type)


def _check_range(input: Tensor, size: int) -> None:
    """The one-line error ``nn.Embedding`` would give (as an IndexError) for an index outside ``[0, size)``."""
    if input.numel() and not tracing() and (int(input.min()) < 0 or int(input.max()) >= size):
        raise KCompressError(f"embedding index out of range: indices must be in [0, {size}), got "
                             f"[{int(input.min())}, {int(input.max())}]")


def _renormed(rows: Tensor, max_norm: float, norm_type: float) -> Tensor:
    """``rows (*, D)`` scaled as torch's ``embedding_renorm_`` scales the table's rows: those whose
    ``norm_type``-norm exceeds ``max_norm`` by ``max_norm / (norm + 1e-7)``."""
    norms = torch.linalg.vector_norm(rows, ord=norm_type, dim=-1, keepdim=True)
    scale = torch.where(norms > max_norm, max_norm / (norms + 1e-7), torch.ones_like(norms))
    return rows * scale
