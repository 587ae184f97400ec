"""Tensor train (TT-matrix): ``W[i, j] = G_1[i_1, j_1] G_2[i_2, j_2] … G_d[i_d, j_d]``.

Cores ``G_k`` have shape ``(r_{k-1}, m_k, n_k, r_k)`` with ``r_0 = r_d = 1`` (Oseledets 2011; Novikov et al.
2015; TT-RNN, Yang et al. 2017). The rank is one int for every bond or a list of the ``d − 1`` internal
ranks ``[r_1, …, r_{d-1}]``.

Fit: TT-SVD of the ``(m_k n_k)``-merged tensor through ``tensorly.decomposition.tensor_train`` (with the
Gram-based :func:`~kcompress.formats.linalg.gram_svd`), then ALS sweeps (:func:`~.tree_als.tree_als`).
Parameters: ``Σ_k r_{k-1} m_k n_k r_k``. Multiplication contracts the input with one core at a time, in the
order that needs the fewest MACs (left to right, right to left, or from the middle out; :meth:`TreeLayout.contraction`).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from tensorly.decomposition import tensor_train

from kcompress.formats.linalg import gram_svd
from kcompress.formats.treenet import TreeFactorization, TreeLayout, take_letters


@lru_cache(maxsize=None)
def tt_layout(order: int) -> TreeLayout:
    """Core k has labels ``(bond k-1, out_k, in_k, bond k)``; the outer bonds are dangling."""
    letters = take_letters(3 * order + 1)
    physical, bonds = letters[: 2 * order], letters[2 * order : 3 * order - 1]
    edges = letters[3 * order - 1] + bonds + letters[3 * order]
    nodes = tuple(edges[k] + physical[2 * k : 2 * k + 2] + edges[k + 1] for k in range(order))
    return TreeLayout(physical, bonds, nodes)


class TT(TreeFactorization):
    """TT-matrix: cores ``cores[k]`` of shape ``(r_{k-1}, m_k, n_k, r_k)``."""

    name = "tt"
    summary = "tensor train (TT-matrix), cores (r, m_k, n_k, r); TT-SVD via TensorLy + ALS sweeps"
    node_attribute = "cores"

    @classmethod
    def layout(cls, order: int) -> TreeLayout:
        return tt_layout(order)

    def _initial_nodes(self, tensor: np.ndarray, ranks: list[int]) -> tuple[list[np.ndarray], int]:
        """TT-SVD; the cores but the last are left-orthonormal, so the last is the centre."""
        tz = self.tensorization
        factors = tensor_train(tensor, [1, *ranks, 1], svd=gram_svd).factors
        cores = [
            core.reshape(core.shape[0], m, n, core.shape[-1])
            for core, m, n in zip(factors, tz.out_modes, tz.in_modes)
        ]
        return cores, tz.order - 1
