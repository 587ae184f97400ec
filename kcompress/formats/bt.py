"""Block-term (BT): ``W ≈ Σ_{b=1}^{N_b} G_b ×_1 U_b^(1) ×_2 … ×_d U_b^(d)`` on the ``(m_k n_k)``-merged tensor.

Ye et al., "Learning Compact Recurrent Neural Networks with Block-Term Tensor Decomposition" (BT-RNN, CVPR
2018), one of the KCP paper's baselines. Each of the ``N_b`` blocks is a Tucker decomposition of the rearranged
weight (:meth:`Tensorization.rearrange`): a core ``G_b`` of shape ``(r_1, …, r_d)`` and one factor per mode,
stored as ``(m_k, n_k, r_k)``. Parameters: ``N_b (Σ_k m_k n_k r_k + ∏_k r_k)``. With every Tucker rank 1 a block
is a Kronecker product ``A_b^(1) ⊗ … ⊗ A_b^(d)`` and BT is exactly KCP with ``R = N_b`` (papers.md §A.2); its
cores are then the scalar 1 and not stored, so the parameters are KCP's too.

The rank is ``N_b`` (an int; every Tucker rank :data:`DEFAULT_TUCKER_RANK`), ``[N_b, r]`` (one Tucker rank for
every mode) or ``[N_b, r_1, …, r_d]``; it is stored as the last form.

Fit (block-wise ALS, :func:`~.network_als.network_sum_als`) from two starts, the better result kept
(``init="auto"``): the KCP fit at ``R = N_b`` (CP-ALS through TensorLy, :func:`~.kcp.kcp_als`) whose terms become
each block's first Tucker directions, the others the leading singular vectors of each unfolding; and those
singular vectors alone. Sweeps solve every block's core, then every block's factor of each mode, jointly from
their normal equations; from the KCP start a fit is never worse than KCP at ``R = N_b``. Multiplication runs
each block's Tucker star in the absorption order that needs the fewest MACs (:meth:`~.treenet.TreeLayout.contraction`)
and adds the blocks, in row chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np
import tensorly as tl
import torch
from torch import Tensor, nn

from kcompress.errors import KCompressError
from kcompress.formats.base import Factorization, ProgressFn, Rank
from kcompress.formats.data_fit import DataFitSettings
from kcompress.formats.kcp import KCPOptions, kcp_als, kronecker_factors
from kcompress.formats.linalg import leading_vectors
from kcompress.formats.network_als import best_of_starts
from kcompress.formats.network_refine import network_dense, refine_network
from kcompress.formats.options import FormatOptions, option
from kcompress.formats.rows import chunk_rows, in_row_chunks
from kcompress.formats.tensorize import Tensorization
from kcompress.formats.treenet import TreeLayout, take_letters

#: the Tucker rank of every mode when the rank is one int (the number of blocks)
DEFAULT_TUCKER_RANK = 2


@lru_cache(maxsize=None)
def block_layout(order: int, with_core: bool) -> TreeLayout:
    """One Tucker block: the core ``(bond_1, …, bond_d)`` (node 0) and factor k ``(out_k, in_k, bond_k)``; without
    a core (every Tucker rank 1) the factors alone, their bond dangling."""
    letters = take_letters(3 * order)
    physical, bonds = letters[: 2 * order], letters[2 * order :]
    factors = tuple(physical[2 * k : 2 * k + 2] + bonds[k] for k in range(order))
    return TreeLayout(physical, bonds, (bonds,) + factors) if with_core else TreeLayout(physical, "", factors)


@dataclass(frozen=True)
class BTOptions(FormatOptions):
    """Options of ``bt``.

    Attributes
    ----------
    init : {'auto', 'kcp', 'svd'}
        The start: the KCP fit at ``R = N_b`` as each block's first Tucker directions (a BT fit is then never
        worse than KCP's), the leading singular vectors of each unfolding shared out over the blocks, or
        ``auto``: ALS from both, the better kept.
    start_iterations : int
        CP-ALS iterations of the ``kcp`` start (:func:`~.kcp.kcp_als`; KCP's default).
    max_sweeps : int
        Most ALS sweeps (0: the start as it is; with ``init="kcp"`` the KCP fit).
    min_sweep_gain : float
        Sweeps stop when one lowers the relative error by no more than this.
    """

    init: str = option("auto", choices=("auto", "kcp", "svd"))
    start_iterations: int = option(KCPOptions().max_iterations, minimum=1)
    max_sweeps: int = option(10, minimum=0)
    min_sweep_gain: float = option(1e-6, minimum=0)


class BT(Factorization):
    """Block-term: ``cores`` ``(N_b, r_1, …, r_d)`` (absent when every ``r_k`` is 1) and ``factors[k]``
    ``(N_b, m_k, n_k, r_k)``."""

    name = "bt"
    summary = "block-term, Σ of N_b Tucker blocks (BT-RNN, Ye et al. 2018); KCP start + block-wise ALS"
    options_type = BTOptions
    options: BTOptions

    # ------------------------------------------------------------------ ranks and counts
    @classmethod
    def normalize_rank(cls, tensorization: Tensorization, rank: Rank) -> list[int]:
        """``[N_b, r_1, …, r_d]`` from ``N_b``, ``[N_b, r]`` or ``[N_b, r_1, …, r_d]``."""
        order = tensorization.order
        if order < 2:
            raise KCompressError("bt needs at least 2 modes; use svd for an unfactored matrix")
        if isinstance(rank, int) and not isinstance(rank, bool):
            ranks = [rank] + [DEFAULT_TUCKER_RANK] * order
        elif isinstance(rank, (list, tuple)) and all(isinstance(r, int) and not isinstance(r, bool) for r in rank) \
                and len(rank) in (2, order + 1):
            ranks = [int(rank[0])] + [int(r) for r in rank[1:]] * (order if len(rank) == 2 else 1)
        else:
            raise KCompressError(f"bt takes the number of blocks N_b, [N_b, tucker rank] or [N_b, r_1..r_{order}], "
                                 f"got {rank!r}")
        if any(r <= 0 for r in ranks):
            raise KCompressError(f"bt ranks must be positive integers, got {ranks}")
        return ranks

    @classmethod
    def block_params(cls, tensorization: Tensorization, tucker: list[int]) -> int:
        """Parameters of one block: ``Σ_k m_k n_k r_k`` plus ``∏_k r_k`` unless every ``r_k`` is 1."""
        factors = sum(size * r for size, r in zip(tensorization.merged_modes, tucker))
        return factors + (math.prod(tucker) if max(tucker) > 1 else 0)

    @classmethod
    def param_count(cls, tensorization: Tensorization, rank: Rank) -> int:
        blocks, *tucker = cls.normalize_rank(tensorization, rank)
        return blocks * cls.block_params(tensorization, tucker)

    @classmethod
    def max_rank(cls, tensorization: Tensorization) -> int:
        """The number of blocks (at :data:`DEFAULT_TUCKER_RANK`) at which BT would hold as many values as dense."""
        tucker = cls.normalize_rank(tensorization, 1)[1:]
        return max(1, tensorization.out_features * tensorization.in_features // cls.block_params(tensorization, tucker))

    @classmethod
    def clamp_rank(cls, tensorization: Tensorization, rank: Rank) -> list[int]:
        """Tucker ranks lowered to what they can use (:meth:`TreeLayout.feasible`), blocks to no more than dense."""
        blocks, *tucker = cls.normalize_rank(tensorization, rank)
        tucker = block_layout(tensorization.order, True).feasible(tensorization, tucker)
        limit = tensorization.out_features * tensorization.in_features // cls.block_params(tensorization, tucker)
        return [min(blocks, max(1, limit))] + tucker

    @classmethod
    def macs(cls, tensorization: Tensorization, rank: Rank, options: Optional[FormatOptions] = None) -> int:
        """``N_b`` times the MACs of one block's cheapest absorption order (:meth:`TreeLayout.contraction`)."""
        blocks, *tucker = cls.normalize_rank(tensorization, rank)
        return blocks * cls.layout_for(tensorization, tucker).contraction(tensorization, tucker).macs

    @classmethod
    def layout_for(cls, tensorization: Tensorization, tucker: list[int]) -> TreeLayout:
        return block_layout(tensorization.order, max(tucker) > 1)

    # ------------------------------------------------------------------ module
    def _allocate(self) -> None:
        tz = self.tensorization
        blocks, *tucker = self.rank
        self.layout = self.layout_for(tz, tucker)
        self.with_core = max(tucker) > 1
        if self.with_core:
            self.cores = nn.Parameter(torch.empty(blocks, *tucker))
        self.factors = nn.ParameterList(
            nn.Parameter(torch.empty(blocks, m, n, r)) for m, n, r in zip(tz.out_modes, tz.in_modes, tucker)
        )
        self.contraction = self.layout.contraction(tz, tucker)

    def block_nodes(self) -> list[Tensor]:
        """The nodes of the layout, each stacked over the blocks (core first when there is one)."""
        return ([self.cores] if self.with_core else []) + list(self.factors)

    def _fit(self, weight: Tensor, seed: int, progress: Optional[ProgressFn]) -> tuple[int, list[float]]:
        """Start (KCP or SVD), then block-wise ALS. Tucker ranks above what they can use
        (:meth:`TreeLayout.feasible`) are fitted at the usable size and stored zero-padded."""
        tz = self.tensorization
        blocks, *tucker = self.rank
        tucker = block_layout(tz.order, True).feasible(tz, tucker) if self.with_core else tucker
        merged = tz.rearrange(weight).numpy()
        inits = ("kcp", "svd") if self.options.init == "auto" else (self.options.init,)
        with tl.backend_context("numpy"):
            starts = [self._start(merged, blocks, tucker, seed, init) for init in inits]
        interleaved = merged.reshape([size for pair in zip(tz.out_modes, tz.in_modes) for size in pair])
        schedule = range(len(self.layout.nodes))  # the core first: the starts' cores are not solved yet
        fitted, curve = best_of_starts(interleaved, self.layout, starts, schedule, max_sweeps=self.options.max_sweeps,
                                       min_sweep_gain=self.options.min_sweep_gain, progress=progress)
        for param, values in zip(self.block_nodes(), zip(*fitted)):
            stacked = torch.from_numpy(np.stack(values))
            param.zero_()
            param[tuple(slice(0, size) for size in stacked.shape)] = stacked
        return len(curve), curve

    def _start(
        self, tensor: np.ndarray, blocks: int, tucker: list[int], seed: int, init: str
    ) -> list[list[np.ndarray]]:
        """Per block, its nodes in layout order: orthonormal factors (the KCP term first, at its size, for
        ``init="kcp"``) and a core that is zero but for its first entry."""
        tz = self.tensorization
        kronecker = None
        if init == "kcp":
            weights, columns, _ = kcp_als(tensor, blocks, max_iterations=self.options.start_iterations, seed=seed)
            kronecker = [block.reshape(blocks, -1).T for block in kronecker_factors(weights, columns, tz)]
        factors = [block_factors(tl.base.unfold(tensor, k), blocks, r, None if kronecker is None else kronecker[k])
                   for k, r in enumerate(tucker)]
        nodes = []
        for b in range(blocks):
            leaves = [factor[b].reshape(m, n, -1) for factor, m, n in zip(factors, tz.out_modes, tz.in_modes)]
            if self.with_core:
                core = np.zeros(tucker)
                core[(0,) * len(tucker)] = 1.0
                leaves = [core] + leaves
            nodes.append(leaves)
        return nodes

    # ------------------------------------------------------------------ multiplication
    def _multiply(self, x: Tensor) -> Tensor:
        nodes = self.block_nodes()
        blocks = self.rank[0]

        def run(rows: Tensor) -> Tensor:
            total = self.contraction.run(rows, [node[0] for node in nodes])
            for b in range(1, blocks):
                total = total + self.contraction.run(rows, [node[b] for node in nodes])
            return total

        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return run(x)
        return in_row_chunks(run, x, chunk_rows(self.contraction.elements_per_vector * nodes[0].element_size()))

    def _reconstruct(self) -> Tensor:
        return network_dense(self.layout, self.block_nodes(), self.tensorization)

    def _fit_to_data(
        self, weight: Tensor, moment: Tensor, settings: DataFitSettings, seed: int, progress: Optional[ProgressFn],
        row_weights: Optional[Tensor],
    ) -> tuple[str, int]:
        """The gradient refinement in the preconditioned variables of
        :class:`~.network_refine.EnvironmentPreconditioned`, written back to the cores and factors."""
        return settings.optimizer, refine_network(self.layout, self.block_nodes(), self.tensorization, weight, moment,
                                                  settings, seed, progress, row_weights)


def block_factors(unfolding: np.ndarray, blocks: int, rank: int, first: Optional[np.ndarray]) -> np.ndarray:
    """``(N_b, I, rank)`` factors of one mode: each block's ``first`` column (``(I, N_b)``, e.g. its KCP term, kept
    as it is) if given, then its share of the leading left singular vectors of ``unfolding (I, J)``,
    orthonormalised (QR) against each other and the first column."""
    extra = rank - (first is not None)
    vectors = leading_vectors(unfolding, blocks * extra) if extra else np.zeros((unfolding.shape[0], 0))
    factors = []
    for b in range(blocks):
        columns = vectors[:, b * extra : (b + 1) * extra]
        if first is not None:
            columns = np.concatenate([first[:, b : b + 1], columns], axis=1)
        q, r = np.linalg.qr(columns)
        if first is not None:
            q[:, 0] *= r[0, 0]  # = the first column
        factors.append(q)
    return np.stack(factors)
