"""Dense linear algebra shared by the formats' fits (numpy, float64)."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
from tensorly.tenalg.svd import svd_interface


def gram_svd(matrix: np.ndarray, n_eigenvecs: Optional[int] = None, **_: Any) -> tuple[np.ndarray, ...]:
    """Leading singular triplets of a (short, wide) matrix from the eigenvectors of its small Gram.

    Passed to TensorLy as ``svd=``: TensorLy's default runs a full SVD of every unfolding (~45 s at
    57600x1024 on 2 cores) and its ``symeig_svd`` forms the *larger* Gram for wide matrices.

    Parameters
    ----------
    matrix : np.ndarray
        ``(I, J)``.
    n_eigenvecs : int, optional
        Number of triplets ``k`` (all ``min(I, J)`` when None).

    Returns
    -------
    u, s, vh : np.ndarray
        ``(I, k)``, ``(k,)`` in decreasing order, ``(k, J)``, as ``np.linalg.svd`` with ``full_matrices=False``.
    """
    transpose = matrix.shape[0] > matrix.shape[1]
    short = matrix.T if transpose else matrix
    count = min(short.shape) if n_eigenvecs is None else min(n_eigenvecs, *short.shape)
    values, vectors = np.linalg.eigh(short @ short.T)
    order = np.argsort(values)[::-1][:count]
    singular = np.sqrt(np.clip(values[order], 0.0, None))
    u = vectors[:, order]
    v = (u.T @ short) / np.where(singular > 0, singular, 1.0)[:, None]
    return (v.T, singular, u.T) if transpose else (u, singular, v)


def leading_vectors(matrix: np.ndarray, count: int) -> np.ndarray:
    """``(rows, count)``: the leading left singular vectors (Gram-based), zero columns past the matrix's rank."""
    u, _, _ = svd_interface(matrix, method=gram_svd, n_eigenvecs=min(count, *matrix.shape))
    return np.pad(u, ((0, 0), (0, count - u.shape[1])))
