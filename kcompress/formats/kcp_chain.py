"""The KCP product as a chain of large GEMMs with the rank axis outermost (``kcp``'s ``chain`` algorithm).

For ``x (B, n_1, …, n_d)`` and factors ``A_k (R, m_k, n_k)`` the modes are contracted from the last to the
first, and every contraction is one (batched) GEMM whose long dimension holds the batch, the modes not yet
contracted and those already done, with no permutation of the state in between:

1. the last mode for every rank at once: ``(R·m_d, n_d) @ xᵀ`` with ``x`` viewed as ``(B·n_1⋯n_{d-1}, n_d)``
   (a transposed operand, no copy), leaving ``(R, m_d, B, n_1, …, n_{d-1})``;
2. each middle mode k: ``bmm(A_k (R, m_k, n_k), stateᵀ)``; mode k is innermost in the state, and its output
   ``m_k`` comes out just after the rank axis, so the next mode is innermost again;
3. the first mode and the sum over ranks in one GEMM with ``K = R·n_1`` (after a copy of the small state),
   then the output transposed to ``(B, m_1, …, m_d)``.

The MACs are those of :func:`~kcompress.formats.kcp_contraction.kcp_step_costs` in the order ``(d-1, …, 0)``, which is
the cheapest order or close to it when the large output mode (the gates) is mode 1, as kcompress tensorizes
recurrent matrices. Where the step-by-step contraction of :mod:`kcompress.formats.kcp_contraction` runs many small batched
GEMMs (a ``(R·m, n)`` block per group of rows), this runs a few large ones: at the KCP paper's shape (57,600
inputs, 4x256 gates, rank 8) it is 1.4x faster at 256 and 2,048 rows and 1.1-1.7x at 16 (benchmarks.md). Every
operation is a differentiable torch op, so autograd, tracing and ONNX export work as for any torch code.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from kcompress.formats.tensorize import Tensorization


class GemmChain:
    """The chain for one tensorization's modes: ``run(x, factors)`` and the contraction interface of
    :class:`~kcompress.formats.kcp_contraction.Contraction` (``order``, ``cost``, ``elements_per_vector``)."""

    def __init__(self, in_modes: tuple[int, ...], out_modes: tuple[int, ...]) -> None:
        if len(in_modes) < 2 or len(in_modes) != len(out_modes):
            raise ValueError(f"a chain needs at least two matching modes, got {out_modes} x {in_modes}")
        self.in_modes, self.out_modes = tuple(in_modes), tuple(out_modes)
        self.order = tuple(range(len(in_modes) - 1, -1, -1))

    @classmethod
    def for_tensorization(cls, tensorization: Tensorization) -> "GemmChain":
        return cls(tensorization.in_modes, tensorization.out_modes)

    def _sizes(self) -> list[tuple[int, int]]:
        """Per step, ``(input, output)`` elements for one vector and one rank (the first step's input is the
        vector itself, shared by all ranks)."""
        sizes, steps = list(self.in_modes), []
        for mode in self.order:
            before = math.prod(sizes)
            sizes[mode] = self.out_modes[mode]
            steps.append((before, math.prod(sizes)))
        return steps

    def macs(self) -> int:
        """MACs per vector and rank."""
        return sum(size_in * self.out_modes[mode] for (size_in, _), mode in zip(self._sizes(), self.order))

    def cost(self) -> int:
        """Work per vector and rank in :meth:`Contraction.cost`'s units: MACs, elements written, and the
        copies of the last step (its input regrouped, its output transposed)."""
        steps = self._sizes()
        written = sum(size_out for _, size_out in steps)
        return self.macs() + written + 2 * (steps[-1][0] + steps[-1][1])

    def elements_per_vector(self, rank: int) -> int:
        """Largest input + output of a step for one vector, with ``rank`` ranks contracted at once."""
        steps = self._sizes()
        largest = steps[0][0] + rank * steps[0][1]
        for size_in, size_out in steps[1:-1]:
            largest = max(largest, rank * (size_in + size_out))
        size_in, size_out = steps[-1]
        return max(largest, 2 * (rank * size_in + size_out))  # the regrouped input and transposed output

    def run(self, x: Tensor, factors: list[Tensor]) -> Tensor:
        """``x (B, N')`` and factors ``(R, m_k, n_k)`` -> ``(B, M')``, summed over the ranks."""
        batch, rank = x.shape[0], factors[0].shape[0]
        last = factors[-1]
        state = last.reshape(rank * last.shape[1], last.shape[2]) @ x.reshape(-1, last.shape[2]).T
        for factor in factors[-2:0:-1]:  # middle modes, last to second: (R, m_k, P)
            state = torch.bmm(factor, state.reshape(rank, -1, factor.shape[2]).transpose(1, 2))
        first = factors[0]
        m, n = first.shape[1], first.shape[2]
        rows = state.reshape(rank, -1, n).transpose(0, 1).reshape(-1, rank * n)  # ((m_2..m_d, B), (R, n_1))
        out = rows @ first.transpose(1, 2).reshape(rank * n, m)                  # ((m_2..m_d, B), m_1)
        return out.reshape(-1, batch, m).permute(1, 2, 0).reshape(batch, -1)


#: ``algorithm="auto"`` takes the chain when its order needs at most this times the MACs of the cheapest order
#: (at the KCP paper's shape: 2,400,256 against 2,351,104 per vector at rank 8)
MAC_TOLERANCE = 1.05
#: ... and no input mode is wider than this. Measured (1 thread, 1-4096 rows, ranks 4-682): with input modes of
#: at most 20 (the paper's shape, bench_exec's LSTM(H, H) matrices) the chain took 0.15-0.7x the step contraction's
#: time; with a 64- or 256-wide mode the step contraction's GEMMs are large already and the chain took 0.4-8x its
#: time (its regrouping and final transpose dominate there)
MAX_MODE = 32


def chain_suits(tensorization: Tensorization, mode_order: Optional[Sequence[int]], best_macs: int) -> bool:
    """Whether ``algorithm="auto"`` runs the chain: a requested ``mode_order`` must be the chain's, otherwise
    its MACs must be within :data:`MAC_TOLERANCE` of ``best_macs`` (the cheapest order's, per vector and
    rank) and every input mode at most :data:`MAX_MODE`."""
    chain = GemmChain.for_tensorization(tensorization)
    if mode_order is not None:
        return tuple(mode_order) == chain.order
    return chain.macs() <= MAC_TOLERANCE * best_macs and max(tensorization.in_modes) <= MAX_MODE
