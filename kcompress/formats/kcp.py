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
* ``chain``: algorithm 2 with the rank axis outermost and the modes contracted last to first, so that every
  mode is one large (batched) GEMM and nothing is permuted in between (:class:`~.kcp_chain.GemmChain`,
  :mod:`kcompress.formats.kcp_chain`); the fastest where it applies.

``rank_batch`` and ``per_rank`` run a :class:`~.kcp_contraction.Contraction` (:mod:`kcompress.formats.kcp_contraction`),
chosen over all d! mode orders by a cost of MACs plus memory traffic, or the chain where it suits
(:func:`~.kcp_chain.chain_suits`). Large batches are cut into chunks whose intermediates fit in
:data:`~kcompress.formats.rows.CHUNK_BYTES` (measured: the first step at batch 128 writes 47 MB and runs at a quarter of its in-cache
speed). ``algorithm="auto"`` uses the chain where it suits, else ``rank_batch``, and ``per_rank`` (of
whichever contraction) when one vector's rank-batched intermediates exceed that budget.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping, Optional, Sequence, Union, cast

import numpy as np
import tensorly as tl
import torch
from tensorly.decomposition import parafac
from torch import Tensor, nn

from kcompress.errors import KCompressError
from kcompress.formats.base import Factorization, OptionsLike, ProgressFn, Rank
from kcompress.formats.data_fit import DataFitSettings, refine_to_data
from kcompress.formats.kcp_chain import GemmChain, chain_suits
from kcompress.formats.kcp_contraction import Contraction, best_contraction, kcp_step_costs
from kcompress.formats.linalg import gram_svd
from kcompress.formats.options import FormatOptions, option
from kcompress.formats.rows import CHUNK_BYTES, chunk_rows, in_row_chunks
from kcompress.formats.tensorize import Tensorization

ALGORITHMS = ("auto", "chain", "rank_batch", "per_rank")
#: how ``multiply`` contracts the modes (both have ``order``, ``run``, ``cost`` and ``elements_per_vector``)
Multiply = Union[Contraction, GemmChain]
#: the data-aware refinement's preconditioner (:class:`GramPreconditioned`) adds this fraction of the mean
#: diagonal of each Gram product to its diagonal (keeps it positive definite)
PRECONDITIONER_DAMPING = 1e-3


@dataclass(frozen=True)
class KCPOptions(FormatOptions):
    """Options of ``kcp``.

    Attributes
    ----------
    algorithm : {'auto', 'chain', 'rank_batch', 'per_rank'}
        Multiplication: ``chain`` (all ranks at once as a chain of large GEMMs, modes last to first),
        ``rank_batch`` (all ranks at once, the cheapest mode order, R times the intermediate memory),
        ``per_rank`` (one rank at a time) or ``auto`` (the chain where :func:`~.kcp_chain.chain_suits`, else
        ``rank_batch``; ``per_rank`` when one vector's intermediates exceed :data:`CHUNK_BYTES`).
    mode_order : list of int, optional
        Order in which multiplication contracts the modes (a permutation of ``0..d-1``; default: the
        cheapest, :func:`best_contraction`).
    max_iterations : int
        Most CP-ALS iterations (earlier key ``n_iter_max``).
    init : {'svd', 'random'}
        CP-ALS start (``random`` is drawn from the fit's seed).
    min_error_change : float
        CP-ALS stops when an iteration changes the relative error by less than this (earlier key ``tol``).
    linesearch : bool
        TensorLy's line search between CP-ALS iterations.
    """

    renamed: ClassVar[Mapping[str, str]] = {"n_iter_max": "max_iterations", "tol": "min_error_change"}

    algorithm: str = option("auto", choices=ALGORITHMS)
    mode_order: Optional[tuple[int, ...]] = option(None)
    max_iterations: int = option(100, minimum=1)
    init: str = option("svd", choices=("svd", "random"))
    min_error_change: float = option(1e-7, minimum=0)
    linesearch: bool = option(False)


class KCP(Factorization):
    """Kronecker CP: factors ``factors[k]`` of shape ``(R, m_k, n_k)``."""

    name = "kcp"
    summary = "Kronecker CP, W ≈ Σ_r ⊗_k A_r^k (Wang et al. 2008.09342), CP-ALS via TensorLy"
    options_type = KCPOptions
    options: KCPOptions

    @classmethod
    def check(cls, tensorization: Tensorization, rank: Rank, options: OptionsLike = None) -> tuple[Any, KCPOptions]:
        """Also: at least 2 modes, and ``mode_order`` a permutation of them."""
        rank, base_checked = super().check(tensorization, rank, options)
        checked = cast(KCPOptions, base_checked)  # the base check returns an options_type instance
        if tensorization.order < 2:
            raise KCompressError("kcp needs at least 2 modes per dimension; use svd for an unfactored matrix")
        order = checked.mode_order
        if order is not None and sorted(order) != list(range(tensorization.order)):
            raise KCompressError(f"mode_order {list(order)} is not a permutation of 0..{tensorization.order - 1}")
        chain_order = GemmChain.for_tensorization(tensorization).order
        if checked.algorithm == "chain" and order is not None and tuple(order) != chain_order:
            raise KCompressError(f"algorithm 'chain' contracts the modes in the order {list(chain_order)}, "
                                 f"not mode_order {list(order)}")
        return rank, checked

    @classmethod
    def contraction_for(cls, tensorization: Tensorization, options: KCPOptions) -> Multiply:
        """The chain for ``algorithm="chain"``, and for ``auto``/``per_rank`` where it suits
        (:func:`~.kcp_chain.chain_suits`); else the contraction of ``options.mode_order`` when given, or :func:`best_contraction`."""
        tz, order = tensorization, options.mode_order
        contraction = Contraction(tz.in_modes, tz.out_modes, order) if order else best_contraction(tz)
        if options.algorithm == "chain" or (
            options.algorithm != "rank_batch" and chain_suits(tz, order, kcp_step_costs(tz, contraction.order)[0])
        ):
            return GemmChain.for_tensorization(tz)
        return contraction

    def _allocate(self) -> None:
        tz = self.tensorization
        self.factors = nn.ParameterList(
            nn.Parameter(torch.empty(self.rank, m, n)) for m, n in zip(tz.out_modes, tz.in_modes)
        )
        self.contraction = self.contraction_for(tz, self.options)

    @classmethod
    def param_count(cls, tensorization: Tensorization, rank: Rank) -> int:
        return cast(int, rank) * sum(tensorization.merged_modes)

    @classmethod
    def max_rank(cls, tensorization: Tensorization) -> int:
        """The rank at which the factors would hold as many values as the dense matrix."""
        dense = tensorization.out_features * tensorization.in_features
        return max(1, dense // sum(tensorization.merged_modes))

    @classmethod
    def macs(cls, tensorization: Tensorization, rank: Rank, options: Optional[FormatOptions] = None) -> int:
        """``R`` times the MACs of one rank's mode products in the contraction's order (:func:`kcp_step_costs`)."""
        rank, checked = cls.check(tensorization, rank, options)
        macs, _ = kcp_step_costs(tensorization, cls.contraction_for(tensorization, checked).order)
        return cast(int, rank) * macs  # check normalized it to an int

    # ------------------------------------------------------------------ fitting
    def _fit(self, weight: Tensor, seed: int, progress: Optional[ProgressFn]) -> tuple[int, list[float]]:
        """Van Loan–Pitsianis for d = 2, :func:`kcp_als` otherwise, on the rearranged ``weight``."""
        tz = self.tensorization
        tensor = tz.rearrange(weight).numpy()
        if tz.order == 2:
            weights, factors, curve = van_loan_pitsianis(tensor, self.rank)
            if progress is not None:
                progress(1, 1, curve[-1])
        else:
            weights, factors, curve = kcp_als(
                tensor,
                self.rank,
                max_iterations=self.options.max_iterations,
                init=self.options.init,
                min_error_change=self.options.min_error_change,
                linesearch=self.options.linesearch,
                seed=seed,
                progress=progress,
            )
        for param, blocks in zip(self.factors, kronecker_factors(weights, factors, tz)):
            param.copy_(torch.from_numpy(blocks))
        return len(curve), curve

    # ------------------------------------------------------------------ multiplication
    def algorithm_for(self, batch: int) -> str:
        """Which algorithm ``multiply`` uses (the choice does not depend on the batch, only on memory)."""
        chosen = self.options.algorithm
        if chosen != "auto":
            return chosen
        footprint = self.contraction.elements_per_vector(self.rank) * self.factors[0].element_size()
        if footprint > CHUNK_BYTES:
            return "per_rank"
        return "chain" if isinstance(self.contraction, GemmChain) else "rank_batch"

    def intermediates_per_vector(self) -> int:
        """Largest intermediate (elements) one vector creates: ``multiply`` bounds its chunks by it."""
        return self.contraction.elements_per_vector(self.rank if self.algorithm_for(1) != "per_rank" else 1)

    def _multiply(self, x: Tensor) -> Tensor:
        factors = list(self.factors)
        algorithm = self.algorithm_for(x.shape[0])
        run = self._multiply_per_rank if algorithm == "per_rank" else self.contraction.run
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return run(x, factors)
        return in_row_chunks(lambda rows: run(rows, factors), x, self._chunk_rows(algorithm))

    def _chunk_rows(self, algorithm: str) -> int:
        """Rows per chunk so that one chunk's intermediates stay within :data:`CHUNK_BYTES`."""
        ranks_at_once = 1 if algorithm == "per_rank" else self.rank
        return chunk_rows(self.contraction.elements_per_vector(ranks_at_once) * self.factors[0].element_size())

    def _multiply_per_rank(self, x: Tensor, factors: list[Tensor]) -> Tensor:
        """Algorithm 1: the contraction run for one rank at a time; memory of one rank's intermediates."""
        total = self.contraction.run(x, [factor[:1] for factor in factors])
        for r in range(1, self.rank):
            total = total + self.contraction.run(x, [factor[r : r + 1] for factor in factors])
        return total

    def _reconstruct(self) -> Tensor:
        return self.tensorization.unrearrange(_cp_to_tensor(cp_columns(self.factors)))

    def _rows(self, index: Tensor, digits: Tensor) -> Tensor:
        """Row ``i`` of ``Σ_r ⊗_k A_r^(k)`` is ``Σ_r ⊗_k A_r^(k)[i_k, :]``: one gathered row per factor
        ``(R, B, n_k)``, their Kronecker product built mode by mode up to ``n_1·…·n_{d-1}``, and the last mode
        and the sum over ``r`` in one batched GEMM."""
        gathered = [factor[:, digits[:, k]] for k, factor in enumerate(self.factors)]
        rows = gathered[0]
        for part in gathered[1:-1]:
            rows = (rows.unsqueeze(-1) * part.unsqueeze(-2)).flatten(-2)
        return torch.bmm(rows.permute(1, 2, 0), gathered[-1].permute(1, 0, 2)).flatten(1)

    def _fit_to_data(
        self, weight: Tensor, moment: Tensor, settings: DataFitSettings, seed: int, progress: Optional[ProgressFn],
        row_weights: Optional[Tensor],
    ) -> tuple[str, int]:
        """The gradient refinement (:func:`~kcompress.formats.data_fit.refine_to_data`) in the preconditioned
        variables of :class:`GramPreconditioned`, written back to the factors."""
        variables = GramPreconditioned(self.factors, self.tensorization)
        iterations, _ = refine_to_data(variables, weight, moment, settings, seed=seed, progress=progress,
                                       row_weights=row_weights)
        variables.store(self.factors)
        return settings.optimizer, iterations


def cp_columns(factors: Iterable[Tensor]) -> list[Tensor]:
    """KCP factors ``(R, m_k, n_k)`` as the CP factor matrices ``(m_k n_k, R)`` of the rearranged weight (views)."""
    return [factor.reshape(factor.shape[0], -1).T for factor in factors]


class GramPreconditioned(nn.Module):
    """A KCP in the variables of its data-aware refinement: ``y_k = c_k L_k (I_k, R)`` for the CP factor matrices
    ``c_k`` (:func:`cp_columns`), with ``L_k L_kᵀ = Γ_k + δ I`` (Cholesky, float64) and ``Γ_k`` the Hadamard
    product of the other factors' Grams ``c_jᵀ c_j`` at the start (``δ``: :data:`PRECONDITIONER_DAMPING` times the
    mean diagonal). ``Γ_k ⊗ I`` is the Hessian block of ``‖Ŵ − W‖²`` for ``c_k`` (CP-ALS's normal equations), so
    in ``y_k`` the problem is about isotropic and L-BFGS progresses many times faster per step (LSTM(512) hh
    matrix after 5 CP-ALS iterations, ridge 1: held-out output error 0.80 -> about 0.6 in 10 steps, where the
    raw factors stopped at 0.77 after 68). ``reconstruct()`` is the matrix ``(M, N)``, differentiable in the
    variables; :meth:`store` writes them back as factors."""

    def __init__(self, factors: Iterable[Tensor], tensorization: Tensorization) -> None:
        super().__init__()
        self.tensorization = tensorization
        columns = [column.detach() for column in cp_columns(factors)]
        grams = [(column.T @ column).double() for column in columns]
        roots = [_damped_cholesky(_hadamard([gram for j, gram in enumerate(grams) if j != k]))
                 for k in range(len(grams))]
        self.variables = nn.ParameterList(nn.Parameter(column @ root.to(column.dtype))
                                          for column, root in zip(columns, roots))
        for k, root in enumerate(roots):  # c_k = y_k L_k⁻¹ (a product per evaluation, no solve)
            identity = torch.eye(root.shape[0], dtype=root.dtype, device=root.device)
            inverse = torch.linalg.solve_triangular(root, identity, upper=False)
            self.register_buffer(f"inverse_root_{k}", inverse.to(columns[k].dtype))

    def columns(self) -> list[Tensor]:
        """The CP factor matrices ``c_k = y_k L_k⁻¹ (I_k, R)``."""
        return [y @ getattr(self, f"inverse_root_{k}") for k, y in enumerate(self.variables)]

    def reconstruct(self) -> Tensor:
        """``Ŵ (M, N)``."""
        tz = self.tensorization
        return tz.crop_weight(tz.unrearrange(_cp_to_tensor(self.columns())))

    def store(self, factors: Iterable[Tensor]) -> None:
        """Write the variables back into ``factors (R, m_k, n_k)`` (in place, their dtype)."""
        with torch.no_grad():
            for factor, column in zip(factors, self.columns()):
                factor.copy_(column.T.reshape(factor.shape))


def _hadamard(matrices: Sequence[Tensor]) -> Tensor:
    """The elementwise product of equally shaped matrices."""
    product = matrices[0]
    for matrix in matrices[1:]:
        product = product * matrix
    return product


def _damped_cholesky(gram: Tensor) -> Tensor:
    """Lower ``L`` with ``L Lᵀ = gram + δ I`` (``δ``: :data:`PRECONDITIONER_DAMPING` times the mean diagonal);
    the identity for an all-zero ``gram`` (nothing to precondition)."""
    scale = float(gram.diagonal().mean())
    identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    if not scale > 0:
        return identity
    return torch.linalg.cholesky(gram + PRECONDITIONER_DAMPING * scale * identity)


def _cp_to_tensor(columns: list[Tensor]) -> Tensor:
    """Σ_r outer(c_r^(1), …, c_r^(d)) for factor matrices ``(I_k, R)``, differentiable."""
    letters = string.ascii_lowercase[: len(columns)]
    equation = ",".join(f"{letter}z" for letter in letters) + "->" + letters
    return torch.einsum(equation, *columns)


def kcp_als(
    tensor: np.ndarray,
    rank: int,
    *,
    max_iterations: int = 100,
    init: str = "svd",
    min_error_change: float = 1e-7,
    linesearch: bool = False,
    seed: int = 0,
    progress: Optional[ProgressFn] = None,
) -> tuple[np.ndarray, list[np.ndarray], list[float]]:
    """Rank-R CP-ALS of the rearranged weight (KCP for d >= 3) through ``tensorly.decomposition.parafac``.

    Parameters
    ----------
    tensor : np.ndarray
        The rearranged weight, shape ``(m_1 n_1, …, m_d n_d)`` (:meth:`Tensorization.rearrange`), float64.
    rank : int
        Number of Kronecker terms R.
    max_iterations : int
        Most ALS iterations.
    init : {'svd', 'random'}
        TensorLy's initialisation (``'svd'`` with the Gram-based :func:`~.linalg.gram_svd`).
    min_error_change : float
        Stop when an iteration changes the relative error by less than this (TensorLy's ``tol``).
    linesearch : bool
        TensorLy's line search between iterations.
    seed : int
        Seeds the random initialisation; the same seed gives the same factors.
    progress : callable, optional
        ``progress(iteration, max_iterations, relative_error)`` after each iteration.

    Returns
    -------
    weights : np.ndarray
        ``(R,)`` the CP weights λ_r.
    factors : list of np.ndarray
        ``(m_k n_k, R)`` per mode.
    curve : list of float
        Relative error after each iteration.
    """
    curve: list[float] = []

    def record(_cp: Any, error: float) -> None:
        curve.append(float(error))
        if progress is not None:
            progress(len(curve) - 1, max_iterations, float(error))

    with tl.backend_context("numpy"):
        (weights, factors), _ = parafac(
            tensor,
            rank,
            n_iter_max=max_iterations,
            init=init,
            svd=gram_svd,
            tol=min_error_change,
            random_state=np.random.RandomState(seed),
            linesearch=linesearch,
            callback=record,
            return_errors=True,  # TensorLy computes the error for its callback only then when tol is 0
        )
    return weights, factors, curve[1:] or curve


def kronecker_factors(weights: np.ndarray, factors: list[np.ndarray], tensorization: Tensorization) -> list[np.ndarray]:
    """CP columns ``(m_k n_k, R)`` -> KCP factors ``A_r^(k)`` as contiguous ``(R, m_k, n_k)`` arrays.

    The weights λ_r are spread as ``|λ_r|^(1/d)`` over the modes, with their sign on mode 1.
    """
    tz = tensorization
    scale = np.abs(weights) ** (1.0 / tz.order)
    blocks = []
    for k, (factor, m, n) in enumerate(zip(factors, tz.out_modes, tz.in_modes)):
        columns = factor * scale[None, :]
        if k == 0:
            columns = columns * np.sign(weights)[None, :]
        blocks.append(np.ascontiguousarray(columns.T.reshape(weights.shape[0], m, n)))
    return blocks


def van_loan_pitsianis(tensor: np.ndarray, rank: int) -> tuple[np.ndarray, list[np.ndarray], list[float]]:
    """Optimal d = 2 KCP: truncated SVD of the rearranged ``(m_1 n_1, m_2 n_2)`` matrix.

    Returns ``(weights (R,), [left (m_1 n_1, R), right (m_2 n_2, R)], [relative error])`` as :func:`kcp_als`;
    terms past the matrix's rank are zero.
    """
    u, s, vh = np.linalg.svd(tensor, full_matrices=False)
    kept = min(rank, s.size)
    weights = np.zeros(rank)
    weights[:kept] = s[:kept]
    left = np.zeros((tensor.shape[0], rank))
    right = np.zeros((tensor.shape[1], rank))
    left[:, :kept], right[:, :kept] = u[:, :kept], vh[:kept].T
    tail = float(np.sqrt((s[kept:] ** 2).sum() / max((s**2).sum(), 1e-300)))
    return weights, [left, right], [tail]
