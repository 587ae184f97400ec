"""The KCP multiplication contraction: the mode order and, per step, the cheapest contraction (``kcp``'s ``multiply``).

Both of the paper's fast algorithms (module :mod:`kcompress.formats.kcp`) run a :class:`Contraction`,
chosen over all d! mode orders by a cost of MACs plus memory traffic (:func:`best_contraction`).
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from kcompress.formats.tensorize import Tensorization, mode_orders


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
    """One mode contraction of a :class:`Contraction`.

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


class Contraction:
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


@lru_cache(maxsize=None)
def best_contraction(tensorization: Tensorization) -> Contraction:
    """The contraction of least :meth:`Contraction.cost` over all mode orders (ties keep the earlier order);
    cached per tensorization (contractions are never modified)."""
    tz = tensorization
    contractions = [Contraction(tz.in_modes, tz.out_modes, order) for order in mode_orders(tz.order)]
    return min(contractions, key=Contraction.cost)
