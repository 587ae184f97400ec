"""Kronecker CP (KCP): ``W ≈ Σ_r A_r^(1) ⊗ … ⊗ A_r^(d)`` with ``A_r^(k)`` of shape ``(m_k, n_k)``.

Wang et al., "Kronecker CP Decomposition with Fast Multiplication for Compressing RNNs",
arXiv 2008.09342 (IEEE TNNLS 2023). Rearranging W to the order-d tensor with modes ``m_k·n_k``
(:meth:`Tensorization.rearrange`) turns KCP into a plain rank-R CP decomposition, fitted here by
CP-ALS through ``tensorly.decomposition.parafac``; for d = 2 the optimum is the truncated SVD of the
rearranged matrix (Van Loan–Pitsianis).

Parameters: ``R · Σ_k m_k n_k``. Multiplication never builds W; the paper's two fast algorithms are
both implemented (see ``docs/concepts.md``):

* ``per_rank`` (algorithm 1): for each r, d sequential mode products of the reshaped input; the
  intermediate never exceeds one rank's worth of memory.
* ``rank_batch`` (algorithm 2): the rank is a batch dimension; each mode is one batched contraction over
  all R terms (the first one a single GEMM producing every rank, the last one a GEMM that also sums over
  r). Faster, R times the intermediate memory.

The mode order minimises a cost of MACs plus intermediate traffic over all d! orders; ``algorithm="auto"``
uses ``rank_batch`` unless its intermediates would exceed :data:`RANK_BATCH_MEMORY_LIMIT` bytes.
"""

from __future__ import annotations

import math
import string
from typing import Any, Optional

import numpy as np
import tensorly as tl
import torch
from tensorly.decomposition import parafac
from torch import Tensor, nn

from ..errors import KCompressError
from ..tensorize import Tensorization, mode_orders
from .base import Factorization, ProgressFn

#: ``algorithm="auto"`` switches to ``per_rank`` when rank-batched intermediates exceed this many bytes
RANK_BATCH_MEMORY_LIMIT = 256 * 2**20
ALGORITHMS = ("auto", "rank_batch", "per_rank")


def gram_svd(matrix: np.ndarray, n_eigenvecs: Optional[int] = None, **_: Any) -> tuple[np.ndarray, ...]:
    """Leading singular triplets of a (short, wide) matrix from the eigenvectors of its small Gram.

    Passed to TensorLy as ``svd=``: TensorLy's default runs a full SVD of every unfolding (~45 s at
    57600x1024 on 2 cores) and its ``symeig_svd`` forms the *larger* Gram for wide matrices.
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


def kcp_step_costs(tensorization: Tensorization, order: tuple[int, ...]) -> tuple[int, int]:
    """``(MACs, intermediate elements)`` per vector and per rank for contracting modes in ``order``."""
    sizes = list(tensorization.in_modes)
    macs = traffic = 0
    for mode in order:
        macs += math.prod(sizes) * tensorization.out_modes[mode]
        sizes[mode] = tensorization.out_modes[mode]
        traffic += math.prod(sizes)
    return macs, traffic


def best_mode_order(tensorization: Tensorization) -> tuple[int, ...]:
    """Mode order minimising MACs + intermediate traffic (all d! orders; ties keep the natural order)."""
    return min(mode_orders(tensorization.order), key=lambda order: sum(kcp_step_costs(tensorization, order)))


def _step_equations(order: tuple[int, ...], batched: bool) -> list[str]:
    """einsum equations contracting one mode per step.

    Axes: ``z`` batch, ``r`` rank, input letters ``a..`` become output letters ``A..`` mode by mode.
    With ``batched`` (algorithm 2) the first step creates the rank axis and the last one sums it; without
    it (algorithm 1, one rank at a time) the factors carry no rank axis.
    """
    d = len(order)
    current = list(string.ascii_lowercase[:d])
    equations = []
    for step, mode in enumerate(order):
        source = "".join(current)
        current[mode] = current[mode].upper()
        target = "".join(current)
        factor = current[mode] + source[mode]
        if not batched:
            equations.append(f"z{source},{factor}->z{target}")
        elif step == 0:
            equations.append(f"z{source},r{factor}->rz{target}")
        elif step == d - 1:
            equations.append(f"rz{source},r{factor}->z{target}")
        else:
            equations.append(f"rz{source},r{factor}->rz{target}")
    if d == 1 and batched:
        equations = [f"z{current[0].lower()},r{current[0]}{current[0].lower()}->z{current[0]}"]
    return equations


class KCP(Factorization):
    """Kronecker CP: factors ``factors[k]`` of shape ``(R, m_k, n_k)``."""

    name = "kcp"
    summary = "Kronecker CP, W ≈ Σ_r ⊗_k A_r^k (Wang et al. 2008.09342), CP-ALS via TensorLy"

    def _allocate(self) -> None:
        tz = self.tensorization
        algorithm = self.options.get("algorithm", "auto")
        if algorithm not in ALGORITHMS:
            raise KCompressError(f"kcp algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        self.factors = nn.ParameterList(
            nn.Parameter(torch.empty(self.rank, m, n)) for m, n in zip(tz.out_modes, tz.in_modes)
        )
        self.mode_order = tuple(self.options.get("mode_order") or best_mode_order(tz))
        if sorted(self.mode_order) != list(range(tz.order)):
            raise KCompressError(f"mode_order {self.mode_order} is not a permutation of 0..{tz.order - 1}")
        self._batched_equations = _step_equations(self.mode_order, batched=True)
        self._per_rank_equations = _step_equations(self.mode_order, batched=False)
        _, traffic = kcp_step_costs(tz, self.mode_order)
        self._peak_elements_per_vector = self.rank * max(tz.padded_in, traffic)

    @classmethod
    def param_count(cls, tensorization: Tensorization, rank: int) -> int:
        return rank * sum(tensorization.merged_modes)

    @classmethod
    def max_rank(cls, tensorization: Tensorization) -> int:
        """The rank at which the factors would hold as many values as the dense matrix."""
        dense = tensorization.out_features * tensorization.in_features
        return max(1, dense // sum(tensorization.merged_modes))

    def macs_per_vector(self) -> int:
        macs, _ = kcp_step_costs(self.tensorization, self.mode_order)
        return self.rank * macs

    # ------------------------------------------------------------------ fitting
    def _fit(self, weight: Tensor, seed: int, progress: Optional[ProgressFn]) -> tuple[int, list[float]]:
        tz = self.tensorization
        tensor = tz.rearrange(weight).numpy()
        if tz.order == 1:
            raise KCompressError("kcp needs at least 2 modes; use svd for an unfactored matrix")
        if tz.order == 2:
            weights, factors, curve = _van_loan_pitsianis(tensor, self.rank)
            iterations = 1
            if progress is not None:
                progress(1, 1, curve[-1])
        else:
            weights, factors, curve = self._cp_als(tensor, seed, progress)
            iterations = len(curve)
        self._store_factors(weights, factors)
        return iterations, curve

    def _cp_als(
        self, tensor: np.ndarray, seed: int, progress: Optional[ProgressFn]
    ) -> tuple[np.ndarray, list[np.ndarray], list[float]]:
        n_iter_max = int(self.options.get("n_iter_max", 100))
        curve: list[float] = []

        def record(_cp: Any, error: float) -> None:
            curve.append(float(error))
            if progress is not None:
                progress(len(curve) - 1, n_iter_max, float(error))

        with tl.backend_context("numpy"):
            weights, factors = parafac(
                tensor,
                self.rank,
                n_iter_max=n_iter_max,
                init=self.options.get("init", "svd"),
                svd=gram_svd,
                tol=float(self.options.get("tol", 1e-7)),
                random_state=np.random.RandomState(seed),
                linesearch=bool(self.options.get("linesearch", False)),
                callback=record,
            )
        return weights, factors, curve[1:] or curve

    def _store_factors(self, weights: np.ndarray, factors: list[np.ndarray]) -> None:
        """CP columns -> ``A_r^(k)``; the weights λ_r are spread as ``|λ_r|^(1/d)`` with the sign on mode 1."""
        tz = self.tensorization
        scale = np.abs(weights) ** (1.0 / tz.order)
        for k, (factor, m, n) in enumerate(zip(factors, tz.out_modes, tz.in_modes)):
            columns = factor * scale[None, :]
            if k == 0:
                columns = columns * np.sign(weights)[None, :]
            blocks = columns.T.reshape(self.rank, m, n)
            self.factors[k].copy_(torch.from_numpy(np.ascontiguousarray(blocks)))

    # ------------------------------------------------------------------ multiplication
    def algorithm_for(self, batch: int) -> str:
        """Which algorithm ``multiply`` uses for a batch of ``batch`` vectors."""
        chosen = self.options.get("algorithm", "auto")
        if chosen != "auto":
            return chosen
        element_size = self.factors[0].element_size()
        peak = batch * self._peak_elements_per_vector * element_size
        return "rank_batch" if peak <= RANK_BATCH_MEMORY_LIMIT else "per_rank"

    def _multiply(self, x: Tensor) -> Tensor:
        tz = self.tensorization
        state = x.reshape((x.shape[0],) + tz.in_modes)
        if self.algorithm_for(x.shape[0]) == "rank_batch":
            out = self._multiply_rank_batch(state)
        else:
            out = self._multiply_per_rank(state)
        return out.reshape(x.shape[0], tz.padded_out)

    def _multiply_rank_batch(self, state: Tensor) -> Tensor:
        """Algorithm 2: every rank at once, one (batched) contraction per mode."""
        for equation, mode in zip(self._batched_equations, self.mode_order):
            state = torch.einsum(equation, state, self.factors[mode])
        return state

    def _multiply_per_rank(self, state: Tensor) -> Tensor:
        """Algorithm 1: for each rank, d sequential mode products; memory of one rank's intermediate."""
        total: Optional[Tensor] = None
        for r in range(self.rank):
            term = state
            for equation, mode in zip(self._per_rank_equations, self.mode_order):
                term = torch.einsum(equation, term, self.factors[mode][r])
            total = term if total is None else total + term
        assert total is not None
        return total

    def _reconstruct(self) -> Tensor:
        tz = self.tensorization
        columns = [factor.reshape(self.rank, -1).T for factor in self.factors]
        return tz.unrearrange(_cp_to_tensor(columns))


def _cp_to_tensor(columns: list[Tensor]) -> Tensor:
    """Σ_r outer(c_r^(1), …, c_r^(d)) for factor matrices ``(I_k, R)``, differentiable."""
    letters = string.ascii_lowercase[: len(columns)]
    equation = ",".join(f"{letter}z" for letter in letters) + "->" + letters
    return torch.einsum(equation, *columns)


def _van_loan_pitsianis(tensor: np.ndarray, rank: int) -> tuple[np.ndarray, list[np.ndarray], list[float]]:
    """Optimal d = 2 KCP: truncated SVD of the rearranged ``(m_1 n_1, m_2 n_2)`` matrix."""
    u, s, vh = np.linalg.svd(tensor, full_matrices=False)
    kept = min(rank, s.size)
    weights = np.zeros(rank)
    weights[:kept] = s[:kept]
    left = np.zeros((tensor.shape[0], rank))
    right = np.zeros((tensor.shape[1], rank))
    left[:, :kept], right[:, :kept] = u[:, :kept], vh[:kept].T
    tail = float(np.sqrt((s[kept:] ** 2).sum() / max((s**2).sum(), 1e-300)))
    return weights, [left, right], [tail]
