"""Run a compressed LSTM through torch's fused ``nn.LSTM`` kernel with the weights its factors reconstruct.

Fine-tuning through the factorized per-step products is slow at high rank (many small kernels per time
step). :class:`ReconstructedLSTM` computes the same function as the compressed layer's own forward (up to
float rounding) by rebuilding ``W`` from the factors on every call (``matrix.reconstruct()`` is
differentiable), so gradients reach the factors and training runs at dense-kernel speed. Use it for
training; use the compressed layer itself for inference.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


class ReconstructedLSTM(nn.Module):
    """One unidirectional batch-first ``CompressedLSTM`` layer run as ``nn.LSTM``: ``x (B, T, N)`` ->
    ``(output (B, T, H), (h_n, c_n))``, the same outputs as ``compressed(x, state)``."""

    def __init__(self, compressed: nn.Module) -> None:
        super().__init__()
        if compressed.num_layers != 1 or compressed.bidirectional or not compressed.batch_first:
            raise ValueError("ReconstructedLSTM handles one unidirectional batch-first layer")
        self.compressed = compressed
        template = nn.LSTM(compressed.input_size, compressed.hidden_size, batch_first=True, bias=compressed.bias)
        self._template = [template.requires_grad_(False)]  # a list: not a submodule, never tuned or saved

    def forward(self, x: Tensor, state: Optional[tuple[Tensor, Tensor]] = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        weights = {name: matrix.reconstruct() for name, matrix in self.compressed.matrices.items()}
        if self.compressed.bias:
            weights.update({name: getattr(self.compressed, name) for name in ("bias_ih_l0", "bias_hh_l0")})
        return torch.func.functional_call(self._template[0], weights, (x, state))
