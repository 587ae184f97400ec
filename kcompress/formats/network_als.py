"""ALS for a sum of tensor networks of one layout, with cycles allowed (the ``tr`` and ``bt`` fits).

The target (the rearranged weight with its mode pairs split, ``(m_1, n_1, …, m_d, n_d)``) is approximated by
``Σ_b net_b``, where every ``net_b`` contracts nodes of the same :class:`~.treenet.TreeLayout`: one network
for a tensor ring (whose bonds close a cycle), ``N_b`` Tucker stars for block-term. The tree formats' gauge
(every node but one an isometry, :mod:`~.tree_als`) does not exist on a cycle nor across the blocks of a sum,
so a node is solved from its normal equations: with ``P_b`` the target contracted with every node of block b
but the centre (:meth:`~.tree_als.TreeNetwork.project`) and ``H_bc`` the Gram of the environments of blocks
b and c over the centre's bonds (:func:`environment_gram`), the centres ``X_c`` solve
``Σ_c X_c H_cb = P_b`` (jointly, or block by block when the joint system is large). Each solve is optimal
given the rest, so the error never increases; the best nodes are kept regardless of rounding.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, TypeVar

import numpy as np
import opt_einsum
from torch import Tensor

from kcompress.formats.base import ProgressFn
from kcompress.formats.tree_als import TreeNetwork
from kcompress.formats.treenet import LETTERS, TreeLayout

#: the centres of all blocks are solved as one system up to this many unknowns per physical index; beyond,
#: block by block (Gauss-Seidel over the blocks; each solve still optimal given the rest)
JOINT_UNKNOWNS = 1024
#: eigenvalues of a Gram below this fraction of the largest are treated as zero (pseudo-inverse)
GRAM_CUTOFF = 1e-13
#: numpy (fits) or torch (data-aware refinement) node values
Array = TypeVar("Array", np.ndarray, Tensor)


def network_sum_als(
    tensor: np.ndarray,
    layout: TreeLayout,
    blocks: list[list[np.ndarray]],
    schedule: Sequence[int],
    *,
    max_sweeps: int = 10,
    min_sweep_gain: float = 1e-6,
    progress: Optional[ProgressFn] = None,
) -> tuple[list[list[np.ndarray]], list[float]]:
    """ALS sweeps of ``Σ_b`` (the network of ``blocks[b]``) towards ``tensor``.

    Parameters
    ----------
    tensor : np.ndarray
        The target, shape ``(m_1, n_1, …, m_d, n_d)``.
    layout : TreeLayout
        Labels of every block's nodes (a cycle allowed).
    blocks : list of list of np.ndarray
        Starting nodes, one list per block in layout order.
    schedule : sequence of int
        The nodes solved in one sweep, in order (each node of every block is solved at once).
    max_sweeps : int
        Most sweeps (0: the start only).
    min_sweep_gain : float
        Stop when a sweep lowers the relative error by no more than this.
    progress : callable, optional
        ``progress(sweep, max_sweeps, relative_error)``, from sweep 0 (the start).

    Returns
    -------
    blocks : list of list of np.ndarray
        The best nodes seen.
    curve : list of float
        Relative error of the start and after each sweep: the best so far, never increasing.
    """
    solver = NetworkSum(layout, blocks)
    norm2 = float(np.vdot(tensor, tensor))
    curve = [solver.error(tensor, norm2)]
    if progress is not None:
        progress(0, max_sweeps, curve[0])
    best = solver.snapshot()
    for sweep in range(1, max_sweeps + 1):
        error = curve[-1]
        for node in schedule:
            error = solver.solve(tensor, node, norm2)
        gain = curve[-1] - error
        if gain > 0:
            best = solver.snapshot()
        curve.append(min(error, curve[-1]))
        if progress is not None:
            progress(sweep, max_sweeps, curve[-1])
        if gain <= min_sweep_gain or curve[-1] == 0.0:
            break
    return best, curve


def best_of_starts(
    tensor: np.ndarray,
    layout: TreeLayout,
    starts: list[list[list[np.ndarray]]],
    schedule: Sequence[int],
    *,
    max_sweeps: int,
    min_sweep_gain: float,
    progress: Optional[ProgressFn] = None,
) -> tuple[list[list[np.ndarray]], list[float]]:
    """:func:`network_sum_als` from each start (a list of blocks); the result with the lowest final error
    (the first on ties). ``progress`` sees that result's curve (live when there is one start)."""
    live = progress if len(starts) == 1 else None
    results = [network_sum_als(tensor, layout, blocks, schedule, max_sweeps=max_sweeps,
                               min_sweep_gain=min_sweep_gain, progress=live) for blocks in starts]
    blocks, curve = min(results, key=lambda result: result[1][-1])
    if live is None and progress is not None:
        for sweep, error in enumerate(curve):
            progress(sweep, max_sweeps, error)
    return blocks, curve


class NetworkSum:
    """The blocks' networks during a fit, with the projections and environment Grams of their normal equations."""

    def __init__(self, layout: TreeLayout, blocks: list[list[np.ndarray]]) -> None:
        self.layout = layout
        self.networks = [TreeNetwork(layout, nodes) for nodes in blocks]
        self._grams: dict[int, Callable[..., np.ndarray]] = {}

    def snapshot(self) -> list[list[np.ndarray]]:
        """The current nodes, per block."""
        return [list(network.nodes) for network in self.networks]

    def stacked(self, node: int) -> np.ndarray:
        """Node ``node`` of every block, ``(N_b, *node shape)``."""
        return np.stack([network.nodes[node] for network in self.networks])

    def error(self, tensor: np.ndarray, norm2: float) -> float:
        """Relative error of the current sum, from the normal equations of node 0 (no reconstruction)."""
        rhs = to_rows(np.stack([network.project(tensor, 0) for network in self.networks]), self.layout, 0)
        return _relative(norm2, to_rows(self.stacked(0), self.layout, 0), rhs, self.gram(0))

    def solve(self, tensor: np.ndarray, node: int, norm2: float) -> float:
        """Replace ``node`` of every block by its least-squares optimum given the rest; the relative error after."""
        rhs = to_rows(np.stack([network.project(tensor, node) for network in self.networks]), self.layout, node)
        gram = self.gram(node)
        if gram.shape[0] <= JOINT_UNKNOWNS:
            centres = rhs @ pseudo_inverse(gram)
        else:
            centres = to_rows(self.stacked(node), self.layout, node)
            width = gram.shape[0] // len(self.networks)
            for b in range(len(self.networks)):
                own = slice(b * width, (b + 1) * width)
                others = rhs[:, own] - centres @ gram[:, own] + centres[:, own] @ gram[own, own]
                centres[:, own] = others @ pseudo_inverse(gram[own, own])
        solved = from_rows(centres, self.layout, node, self.stacked(node).shape)
        for network, value in zip(self.networks, solved):
            network.nodes[node] = np.ascontiguousarray(value)
        return _relative(norm2, centres, rhs, gram)

    def gram(self, node: int) -> np.ndarray:
        """``H``: the blocks ``H_bc`` (bond size x bond size) of :func:`environment_gram` as one square matrix."""
        others = [self.stacked(i) for i in range(len(self.layout.nodes)) if i != node]
        if node not in self._grams:
            self._grams[node] = environment_gram(self.layout, node, [value.shape for value in others])
        size = to_rows(self.stacked(node), self.layout, node).shape[1]
        return self._grams[node](*others, *others).reshape(size, size)


def _relative(norm2: float, centres: np.ndarray, rhs: np.ndarray, gram: np.ndarray) -> float:
    """``‖T − Σ‖ / ‖T‖`` from ``‖T‖² − 2⟨X, P⟩ + ⟨X H, X⟩`` (rows layout, :func:`to_rows`)."""
    if norm2 == 0.0:
        return 0.0
    squared = norm2 - 2.0 * float(np.vdot(centres, rhs)) + float(np.vdot(centres @ gram, centres))
    return math.sqrt(max(squared, 0.0) / norm2)


def row_axes(layout: TreeLayout, node: int) -> tuple[list[int], list[int]]:
    """Axes of node ``node`` stacked over the blocks (block axis 0): its own physical axes, then the block axis
    and the bonds it shares with other nodes."""
    labels = layout.nodes[node]
    elsewhere = set("".join(other for index, other in enumerate(layout.nodes) if index != node))
    bonds = [1 + axis for axis, label in enumerate(labels) if label in elsewhere]
    return [axis for axis in range(1, len(labels) + 1) if axis not in bonds], [0] + bonds


def to_rows(stacked: Array, layout: TreeLayout, node: int) -> Array:
    """Node ``node`` of every block ``(N_b, *node shape)`` (numpy or torch) -> ``(own physical size, N_b · bond
    size)``, the blocks side by side: the layout of the node's normal equations ``X H = P``."""
    own, rest = row_axes(layout, node)
    arranged = stacked.permute(own + rest) if isinstance(stacked, Tensor) else stacked.transpose(own + rest)
    return arranged.reshape(math.prod(stacked.shape[axis] for axis in own), -1)


def from_rows(rows: Array, layout: TreeLayout, node: int, shape: Sequence[int]) -> Array:
    """Inverse of :func:`to_rows` for the stacked ``shape``."""
    own, rest = row_axes(layout, node)
    arranged = rows.reshape([shape[axis] for axis in own + rest])
    inverse = [int(axis) for axis in np.argsort(own + rest)]
    return arranged.permute(inverse) if isinstance(arranged, Tensor) else arranged.transpose(inverse)


def environment_gram(layout: TreeLayout, node: int, shapes: list[tuple[int, ...]]) -> Callable[..., np.ndarray]:
    """``f(*others, *others)``: the Grams of the environments of ``node`` between every two blocks.

    ``others`` are the nodes but ``node`` stacked over the blocks (shapes ``shapes``, the block axis first).
    The two copies share their physical labels and have their own block and bond labels; the result has the
    axes ``(block, centre's bonds…)`` of the first copy, then of the second: ``H`` once reshaped to a square.
    """
    used = set(layout.physical + "".join(layout.nodes))
    spare = iter(letter for letter in LETTERS if letter not in used)
    primed = {label: next(spare) for label in sorted(used - set(layout.physical))}
    first_block, second_block = next(spare), next(spare)
    centre = layout.nodes[node]
    others = [labels for index, labels in enumerate(layout.nodes) if index != node]
    elsewhere = set("".join(others))
    bonds = "".join(label for label in centre if label in elsewhere)
    first = [first_block + labels for labels in others]
    second = [second_block + "".join(primed.get(label, label) for label in labels) for labels in others]
    output = first_block + bonds + second_block + "".join(primed[label] for label in bonds)
    return opt_einsum.contract_expression(",".join(first + second) + "->" + output, *shapes, *shapes)


def pseudo_inverse(gram: np.ndarray) -> np.ndarray:
    """The pseudo-inverse of a symmetric positive semi-definite matrix (eigenvalues below
    :data:`GRAM_CUTOFF` times the largest dropped)."""
    values, vectors = np.linalg.eigh((gram + gram.T) / 2)
    top = values.max(initial=0.0)
    keep = values > GRAM_CUTOFF * top if top > 0 else np.zeros_like(values, dtype=bool)
    inverse = np.where(keep, 1.0 / np.where(keep, values, 1.0), 0.0)
    return (vectors * inverse) @ vectors.T
