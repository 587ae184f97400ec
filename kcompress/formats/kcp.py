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

Both run the same :class:`ContractionPlan`, chosen over all d! mode orders by a cost of MACs plus memory
traffic. Large batches are cut into chunks whose intermediates fit in :data:`CHUNK_BYTES` (measured: the
first step at batch 128 writes 47 MB and runs at a quarter of its in-cache speed). ``algorithm="auto"`` uses
``rank_batch`` unless one vector's rank-batched intermediates exceed that budget.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import tensorly as tl
import torch
from tensorly.decomposition import parafac
from torch import Tensor, nn

from ..errors import KCompressError
from ..tensorize import Tensorization, mode_orders
from .base import Factorization, ProgressFn

#: the batch is cut into chunks whose intermediates stay within this many bytes (cache-sized); ``"auto"``
#: picks ``per_rank`` when a single vector's rank-batched intermediates exceed it
CHUNK_BYTES = 8 * 2**20
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


#: marks the rank axis in a step's static shape (its size is the factors' leading dimension)
RANK_AXIS = 0


@dataclass(frozen=True)
class Step:
    """One mode contraction of a :class:`ContractionPlan`.

    ``kind``: ``"first"`` (one GEMM creating the rank axis), ``"right"`` (a batched GEMM for a mode right of
    the rank axis) or ``"einsum"`` (small late tensors; ``equation`` given). ``shape`` is the state's shape
    without the batch axis before the step (:data:`RANK_AXIS` marks the rank axis); ``post`` is the size
    right of the mode and ``pre`` the size left of it (for ``"right"``: between the rank axis and the mode).
    """

    kind: str
    mode: int
    shape: tuple[int, ...]
    pre: int = 1
    post: int = 1
    equation: str = ""


class ContractionPlan:
    """A mode order and, per step, the cheapest way to run it for the layout reached so far.

    The layout starts as ``(batch, n_1, …, n_d)``. The first step multiplies the stacked factors
    ``(R·m_k, n_k)`` into the input viewed as ``(batch·pre, n_k, post)`` (no copy of the input) and leaves the
    rank axis just before mode k. Modes right of the rank axis are batched multiplications that need no
    permutation either: ``(R, 1, m, n) @ (·, R, ·, n, post)``, or ``(·, R, ·, n) @ (R, n, m)`` for the last axis. The rest (modes left of the rank
    axis, and the last mode, whose einsum also sums over the rank) runs as einsum on tensors that are small
    by then.
    """

    def __init__(self, in_modes: tuple[int, ...], out_modes: tuple[int, ...], order: tuple[int, ...]) -> None:
        self.in_modes, self.out_modes, self.order = in_modes, out_modes, order
        sizes = {}
        for k, (m, n) in enumerate(zip(out_modes, in_modes)):
            sizes[string.ascii_lowercase[k]], sizes[string.ascii_uppercase[k]] = n, m
        layout = [string.ascii_lowercase[k] for k in range(len(in_modes))]
        self.steps: list[Step] = []
        for index, mode in enumerate(order):
            step = self._plan_step(layout, sizes, mode, last=index == len(order) - 1)
            self.steps.append(step)
            label = string.ascii_lowercase[mode]
            position = layout.index(label)
            layout[position] = label.upper()
            if step.kind == "first":
                layout.insert(position, "r")
        layout.remove("r")
        self.final_shape = tuple(sizes[label] for label in layout)
        self.output_permutation = [0] + [1 + layout.index(string.ascii_uppercase[k]) for k in range(len(in_modes))]

    @staticmethod
    def _plan_step(layout: list[str], sizes: dict[str, int], mode: int, last: bool) -> Step:
        label = string.ascii_lowercase[mode]
        position = layout.index(label)
        shape = tuple(RANK_AXIS if axis == "r" else sizes[axis] for axis in layout)
        rank_position = layout.index("r") if "r" in layout else -1
        post = math.prod(sizes[axis] for axis in layout[position + 1 :] if axis != "r")
        if rank_position < 0:
            pre = math.prod(sizes[axis] for axis in layout[:position])
            return Step("first", mode, shape, pre=pre, post=post)
        if rank_position < position and not last:
            between = math.prod(sizes[axis] for axis in layout[rank_position + 1 : position])
            return Step("right", mode, shape, pre=between, post=post)
        source = "z" + "".join(layout)
        target = source.replace(label, label.upper()).replace("r", "" if last else "r")
        return Step("einsum", mode, shape, equation=f"{source},r{label.upper()}{label}->{target}")

    def cost(self) -> int:
        """Work per vector and rank: MACs, elements written, and einsum steps' permutation copies."""
        total = 0
        for step in self.steps:
            elements = math.prod(size for size in step.shape if size != RANK_AXIS)
            written = elements // self.in_modes[step.mode] * self.out_modes[step.mode]
            total += elements * self.out_modes[step.mode] + written
            if step.kind == "einsum":
                total += 2 * (elements + written)
        return total

    def elements_per_vector(self, rank: int) -> int:
        """Largest input + output of a step for one vector, with ``rank`` ranks contracted at once."""
        largest = 0
        for step in self.steps:
            size_in = math.prod(size for size in step.shape if size != RANK_AXIS)
            size_out = size_in // self.in_modes[step.mode] * self.out_modes[step.mode]
            copies_in = 1 if step.kind == "first" else rank
            copies_out = 1 if step is self.steps[-1] else rank
            largest = max(largest, size_in * copies_in + size_out * copies_out)
        return largest

    def run(self, x: Tensor, factors: list[Tensor]) -> Tensor:
        """``x (B, N')`` and factors ``(R, m_k, n_k)`` -> ``(B, M')``, summed over the ranks."""
        batch, rank = x.shape[0], factors[0].shape[0]
        state = x
        for step in self.steps:
            factor = factors[step.mode]
            m, n = factor.shape[1], factor.shape[2]
            if step.kind == "first" and step.post == 1:
                state = state.reshape(-1, n) @ factor.permute(2, 0, 1).reshape(n, rank * m)
            elif step.kind == "first":
                grouped = state.reshape(-1, n, step.post)
                stacked = factor.reshape(1, rank * m, n).expand(grouped.shape[0], rank * m, n)
                state = torch.bmm(stacked, grouped)
            elif step.kind == "right" and step.post == 1:
                grouped = state.reshape(-1, rank, step.pre, n)
                blocks = factor.transpose(1, 2).unsqueeze(0).expand(grouped.shape[0], rank, n, m)
                state = torch.bmm(grouped.reshape(-1, step.pre, n), blocks.reshape(-1, n, m))
            elif step.kind == "right":
                grouped = state.reshape(-1, rank, step.pre, n, step.post)
                blocks = factor.reshape(1, rank, 1, m, n).expand(grouped.shape[0], rank, step.pre, m, n)
                state = torch.bmm(blocks.reshape(-1, m, n), grouped.reshape(-1, n, step.post))
            else:
                shape = [rank if size == RANK_AXIS else size for size in step.shape]
                state = torch.einsum(step.equation, state.reshape([batch] + shape), factor)
        return state.reshape((batch,) + self.final_shape).permute(self.output_permutation).reshape(batch, -1)


def best_plan(tensorization: Tensorization) -> ContractionPlan:
    """The plan of least :meth:`ContractionPlan.cost` over all mode orders (ties keep the earlier order)."""
    tz = tensorization
    plans = [ContractionPlan(tz.in_modes, tz.out_modes, order) for order in mode_orders(tz.order)]
    return min(plans, key=ContractionPlan.cost)


class KCP(Factorization):
    """Kronecker CP: factors ``factors[k]`` of shape ``(R, m_k, n_k)``."""

    name = "kcp"
    summary = "Kronecker CP, W ≈ Σ_r ⊗_k A_r^k (Wang et al. 2008.09342), CP-ALS via TensorLy"

    def _allocate(self) -> None:
        tz = self.tensorization
        algorithm = self.options.get("algorithm", "auto")
        if algorithm not in ALGORITHMS:
            raise KCompressError(f"kcp algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        if tz.order < 2:
            raise KCompressError("kcp needs at least 2 modes per dimension; use svd for an unfactored matrix")
        self.factors = nn.ParameterList(
            nn.Parameter(torch.empty(self.rank, m, n)) for m, n in zip(tz.out_modes, tz.in_modes)
        )
        order = self.options.get("mode_order")
        if order is not None and sorted(order) != list(range(tz.order)):
            raise KCompressError(f"mode_order {order} is not a permutation of 0..{tz.order - 1}")
        self.plan = ContractionPlan(tz.in_modes, tz.out_modes, tuple(order)) if order else best_plan(tz)

    @classmethod
    def param_count(cls, tensorization: Tensorization, rank: int) -> int:
        return rank * sum(tensorization.merged_modes)

    @classmethod
    def max_rank(cls, tensorization: Tensorization) -> int:
        """The rank at which the factors would hold as many values as the dense matrix."""
        dense = tensorization.out_features * tensorization.in_features
        return max(1, dense // sum(tensorization.merged_modes))

    def macs_per_vector(self) -> int:
        macs, _ = kcp_step_costs(self.tensorization, self.plan.order)
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
        """Which algorithm ``multiply`` uses (the choice does not depend on the batch, only on memory)."""
        chosen = self.options.get("algorithm", "auto")
        if chosen != "auto":
            return chosen
        footprint = self.plan.elements_per_vector(self.rank) * self.factors[0].element_size()
        return "rank_batch" if footprint <= CHUNK_BYTES else "per_rank"

    def _multiply(self, x: Tensor) -> Tensor:
        factors = list(self.factors)
        algorithm = self.algorithm_for(x.shape[0])
        run = self.plan.run if algorithm == "rank_batch" else self._multiply_per_rank
        rows = self._chunk_rows(algorithm)
        if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or x.shape[0] <= rows:
            return run(x, factors)
        return torch.cat([run(chunk, factors) for chunk in x.split(rows)])

    def _chunk_rows(self, algorithm: str) -> int:
        """Rows per chunk so that one chunk's intermediates stay within :data:`CHUNK_BYTES`."""
        ranks_at_once = self.rank if algorithm == "rank_batch" else 1
        per_vector = self.plan.elements_per_vector(ranks_at_once) * self.factors[0].element_size()
        return max(1, CHUNK_BYTES // per_vector)

    def _multiply_per_rank(self, x: Tensor, factors: list[Tensor]) -> Tensor:
        """Algorithm 1: the plan run for one rank at a time; memory of one rank's intermediates."""
        total = self.plan.run(x, [factor[:1] for factor in factors])
        for r in range(1, self.rank):
            total = total + self.plan.run(x, [factor[r : r + 1] for factor in factors])
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
