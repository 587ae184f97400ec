"""Tensor ring (TR-matrix): ``W[i, j] = Tr(G_1[i_1, j_1] G_2[i_2, j_2] … G_d[i_d, j_d])``.

Zhao et al., "Tensor Ring Decomposition", arXiv 1606.05535; TR-LSTM (Pan et al. 2019) is one of the KCP
paper's baselines. Cores ``G_k`` have shape ``(r_{k-1}, m_k, n_k, r_k)`` like TT cores, but the ring is closed:
``r_d = r_0`` is a bond between the last core and the first. The rank is one int for every bond or a list of
the ``d`` bonds ``[r_0, r_1, …, r_{d-1}]`` (``r_0`` the closing one). With ``r_0 = 1`` a ring is the tensor
train with ranks ``[r_1, …, r_{d-1}]``.

Fit: a start, then ALS sweeps over the cores (:func:`~.network_als.network_sum_als`: the normal equations
of one core given the others; a ring has no canonical form). The start is TensorLy's TR-SVD
(``tensorly.decomposition.tensor_ring``) of the ``(m_k n_k)``-merged tensor, rotated to the first mode that can
hold ``r_{k-1} r_k`` singular vectors, or else TT-SVD with the closing bond grown from 1 (``init`` picks one or
``auto`` the better of both). Parameters: ``Σ_k r_{k-1} m_k n_k r_k``. Multiplication absorbs one core at a time
in the order that needs the fewest MACs (:meth:`~.treenet.TreeLayout.contraction`), in row chunks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np
import tensorly as tl
import torch
from tensorly.decomposition import tensor_ring, tensor_train
from torch import Tensor

from kcompress.formats.base import ProgressFn
from kcompress.formats.data_fit import DataFitSettings
from kcompress.formats.linalg import gram_svd
from kcompress.formats.network_als import best_of_starts
from kcompress.formats.network_refine import refine_network
from kcompress.formats.options import option
from kcompress.formats.rows import chunk_rows, in_row_chunks
from kcompress.formats.tensorize import Tensorization
from kcompress.formats.treenet import TreeFactorization, TreeLayout, TreeOptions, take_letters
from kcompress.formats.tt import TT

#: a bond grown from a smaller start is filled with Gaussian values of this relative size (ALS cannot grow zeros)
GROWTH_SCALE = 1e-2
INITS = ("auto", "tr_svd", "tt_svd")


@lru_cache(maxsize=None)
def tr_layout(order: int) -> TreeLayout:
    """Core k has labels ``(bond k, out_k, in_k, bond k+1)``, the last core's right bond being bond 0."""
    letters = take_letters(3 * order)
    physical, bonds = letters[: 2 * order], letters[2 * order :]
    nodes = tuple(bonds[k] + physical[2 * k : 2 * k + 2] + bonds[(k + 1) % order] for k in range(order))
    return TreeLayout(physical, bonds, nodes)


@dataclass(frozen=True)
class TROptions(TreeOptions):
    """Options of ``tr``.

    Attributes
    ----------
    max_sweeps : int
        Most ALS sweeps over the cores (0: the start only).
    min_sweep_gain : float
        Sweeps stop when one lowers the relative error by no more than this.
    init : {'auto', 'tr_svd', 'tt_svd'}
        The start: TensorLy's TR-SVD (TT-SVD where no mode can hold the ranks), TT-SVD with the closing bond
        grown from 1, or ``auto``: ALS from both, the lower final error kept.
    """

    max_sweeps: int = option(10, minimum=0)
    init: str = option("auto", choices=INITS)


class TR(TreeFactorization):
    """Tensor ring: cores ``cores[k]`` of shape ``(r_{k-1}, m_k, n_k, r_k)`` with ``r_d = r_0``."""

    name = "tr"
    summary = "tensor ring (TR-matrix), cores (r, m_k, n_k, r) in a closed ring; TR-SVD via TensorLy + ALS"
    node_attribute = "cores"
    options_type = TROptions
    options: TROptions

    @classmethod
    def layout(cls, order: int) -> TreeLayout:
        return tr_layout(order)

    @classmethod
    def max_rank(cls, tensorization: Tensorization) -> int:
        """TT's: with every bond at least the TT's exact ranks (the closing one used as 1) any weight is exact."""
        return TT.max_rank(tensorization)

    def _fit(self, weight: Tensor, seed: int, progress: Optional[ProgressFn]) -> tuple[int, list[float]]:
        """TR-SVD or TT-SVD start, then ALS sweeps; bonds above what they can use (:meth:`TreeLayout.feasible`)
        are fitted at the usable size and stored zero-padded."""
        tz = self.tensorization
        layout = self.layout(tz.order)
        merged = tz.rearrange(weight).numpy()
        interleaved = merged.reshape([size for pair in zip(tz.out_modes, tz.in_modes) for size in pair])
        ranks = layout.feasible(tz, self.rank)
        starts = []
        with tl.backend_context("numpy"):
            if self.options.init != "tt_svd":
                starts.append(tr_svd_start(merged, tz, ranks, seed))
            if self.options.init != "tr_svd" or starts[0] is None:
                starts.append(tt_svd_start(merged, tz, ranks, seed))
        (best,), curve = best_of_starts(interleaved, layout, [[cores] for cores in starts if cores is not None],
                                        range(tz.order), max_sweeps=self.options.max_sweeps,
                                        min_sweep_gain=self.options.min_sweep_gain, progress=progress)
        for param, core in zip(self.node_params, best):
            param.zero_()
            param[tuple(slice(0, size) for size in core.shape)] = torch.from_numpy(core)
        return len(curve), curve

    def _fit_to_data(
        self, weight: Tensor, moment: Tensor, settings: DataFitSettings, seed: int, progress: Optional[ProgressFn],
        row_weights: Optional[Tensor],
    ) -> tuple[str, int]:
        """The gradient refinement in the preconditioned variables of
        :class:`~.network_refine.EnvironmentPreconditioned`, written back to the cores."""
        stacked = [core.unsqueeze(0) for core in self.node_params]
        return settings.optimizer, refine_network(self.layout(self.tensorization.order), stacked, self.tensorization,
                                                  weight, moment, settings, seed, progress, row_weights)

    def _multiply(self, x: Tensor) -> Tensor:
        nodes = list(self.node_params)
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return self.contraction.run(x, nodes)
        rows = chunk_rows(self.contraction.elements_per_vector * nodes[0].element_size())
        return in_row_chunks(lambda part: self.contraction.run(part, nodes), x, rows)


def tr_svd_start(tensor: np.ndarray, tz: Tensorization, ranks: list[int], seed: int) -> Optional[list[np.ndarray]]:
    """TensorLy's TR-SVD of the merged tensor from the first mode ``k`` whose unfolding can hold
    ``r_{k-1} r_k`` singular vectors, as cores ``(r_{k-1}, m_k, n_k, r_k)`` at ``ranks``; None if no mode can."""
    order = tz.order
    rank = ranks + ranks[:1]
    for mode in range(order):
        if rank[mode] * rank[mode + 1] <= min(tensor.shape[mode], tensor.size // tensor.shape[mode]):
            break
    else:
        return None
    with warnings.catch_warnings():  # TensorLy notes that an order-2 tensor is a matrix
        warnings.simplefilter("ignore", UserWarning)
        factors = tensor_ring(tensor, rank=list(rank), mode=mode, svd=gram_svd).factors
    return grown(factors, tz, ranks, seed)


def tt_svd_start(tensor: np.ndarray, tz: Tensorization, ranks: list[int], seed: int) -> list[np.ndarray]:
    """TT-SVD at the internal ``ranks[1:]``; the closing bond (1 there) grown to ``ranks[0]``."""
    factors = tensor_train(tensor, [1, *ranks[1:], 1], svd=gram_svd).factors
    return grown(factors, tz, ranks, seed)


def grown(factors: list[np.ndarray], tz: Tensorization, ranks: list[int], seed: int) -> list[np.ndarray]:
    """``(r, m_k n_k, r')`` factors as cores ``(r_{k-1}, m_k, n_k, r_k)`` at ``ranks``; bonds smaller than asked
    are grown with Gaussian values of :data:`GROWTH_SCALE` times the core's root mean square."""
    generator = np.random.default_rng(seed)
    bonds = ranks + ranks[:1]
    cores = []
    for k, (factor, m, n) in enumerate(zip(factors, tz.out_modes, tz.in_modes)):
        shape = (bonds[k], m, n, bonds[k + 1])
        scale = GROWTH_SCALE * float(np.sqrt(np.mean(factor**2))) if factor.size else 0.0
        core = generator.standard_normal(shape) * scale
        core[: factor.shape[0], :, :, : factor.shape[2]] = factor.reshape(factor.shape[0], m, n, factor.shape[2])
        cores.append(core)
    return cores
