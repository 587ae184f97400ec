"""A quick, measured speed check of a compressed matrix against the dense product it replaces.

MAC counts mislead on CPUs: a factorized multiply runs several small kernels whose fixed cost and memory
traffic dominate on small matrices (KCP rank 8 needs 5x fewer MACs than a 2048x512 matrix and still runs
slower). So the converter times both on this machine, for a typical batch, and warns when the compressed
matrix is slower. The check takes a few milliseconds per matrix; the full picture is in benchmarks/.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import Tensor, nn

#: the batch (rows of x) used by :func:`measured_speedup`
CHECK_BATCH = 16


def _median_seconds(fn: Callable[[], Tensor], repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measured_speedup(matrix: nn.Module, batch: int = CHECK_BATCH, repeats: int = 5) -> float:
    """``time(x @ W.T) / time(matrix.multiply(x))`` for ``x`` of shape ``(batch, N)``: > 1 means faster.

    ``W`` is the matrix's own reconstruction, so both sides compute the same product.
    """
    with torch.no_grad():
        weight = matrix.reconstruct().detach().contiguous()
        x = torch.randn(batch, weight.shape[1], dtype=weight.dtype, device=weight.device)
        dense = _median_seconds(lambda: x @ weight.T, repeats)
        compressed = _median_seconds(lambda: matrix.multiply(x), repeats)
    return dense / max(compressed, 1e-12)
