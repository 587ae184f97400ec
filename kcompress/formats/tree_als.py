"""ALS sweeps for tree tensor networks (the ``tt`` and ``ht`` fits), over numpy nodes of a tree layout
(:class:`~kcompress.formats.treenet.TreeLayout`, seen here through the :class:`Layout` protocol).

With every node but one (the *centre*) an isometry towards the centre, the centre's environment is an
isometry, so the least-squares optimal centre is the projection of the tensor onto it, and
``‖T − T̂‖² = ‖T‖² − ‖centre‖²``. A sweep walks an Euler tour of the tree, moving the centre along one edge
at a time (a QR of the old centre) and re-solving it. Each step is optimal, so the error never increases;
the best nodes are kept regardless of rounding.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Protocol

import numpy as np
import opt_einsum

from kcompress.formats.base import ProgressFn


class Layout(Protocol):
    """What the sweeps read of a tree layout: the labels of the physical axes and of each node's axes, and
    the tree's walks (``TreeLayout`` in :mod:`kcompress.formats.treenet` implements it)."""

    @property
    def physical(self) -> str: ...

    @property
    def nodes(self) -> tuple[str, ...]: ...

    def holder(self, label: str) -> int: ...

    def connected(self, node: int) -> str: ...

    def neighbours(self, node: int) -> list[tuple[int, str]]: ...

    def tour(self, start: int) -> list[int]: ...

    def edges_towards(self, center: int) -> list[tuple[int, int]]: ...


def tree_als(
    tensor: np.ndarray,
    layout: Layout,
    nodes: list[np.ndarray],
    center: int,
    *,
    max_sweeps: int = 4,
    min_sweep_gain: float = 1e-6,
    progress: Optional[ProgressFn] = None,
) -> tuple[list[np.ndarray], list[float]]:
    """ALS sweeps of a tree network from its starting nodes (an SVD start).

    Parameters
    ----------
    tensor : np.ndarray
        The target, shape ``(m_1, n_1, …, m_d, n_d)`` (the rearranged weight with its mode pairs split).
    layout : Layout
        The tree: which labels each node carries.
    nodes : list of np.ndarray
        Starting nodes in layout order, at feasible ranks (:meth:`TreeLayout.feasible`).
    center : int
        The node that is solved first (the others are made isometries towards it).
    max_sweeps : int
        Most sweeps (0: only the centre is re-solved).
    min_sweep_gain : float
        Stop when a sweep lowers the relative error by no more than this.
    progress : callable, optional
        ``progress(sweep, max_sweeps, relative_error)``, from sweep 0 (the start).

    Returns
    -------
    nodes : list of np.ndarray
        The best nodes seen.
    curve : list of float
        Relative error before the sweeps and after each: the best so far, never increasing.
    """
    network = TreeNetwork(layout, nodes)
    norm2 = float(np.vdot(tensor, tensor))
    network.orthogonalize(center)
    curve = [network.solve(tensor, center, norm2)]
    if progress is not None:
        progress(0, max_sweeps, curve[0])
    best = list(network.nodes)
    path = layout.tour(center)[1:]
    for sweep in range(1, max_sweeps + 1):
        current = center
        for node in path:
            network.move_center(current, node)
            error = network.solve(tensor, node, norm2)
            current = node
        gain = curve[-1] - error
        if gain > 0:
            best = list(network.nodes)
        curve.append(min(error, curve[-1]))
        if progress is not None:
            progress(sweep, max_sweeps, curve[-1])
        if gain <= min_sweep_gain:
            break
    return best, curve


class TreeNetwork:
    """numpy nodes of a :class:`TreeLayout` during a fit, with the gauge moves and projections of ALS."""

    def __init__(self, layout: Layout, nodes: list[np.ndarray]) -> None:
        self.layout = layout
        self.nodes = [np.asarray(node, dtype=np.float64) for node in nodes]
        self._projections: dict[int, Callable[..., np.ndarray]] = {}

    def move_center(self, source: int, target: int) -> None:
        """Make ``source`` an isometry towards ``target`` (QR) and absorb the triangular factor into ``target``.

        The represented tensor is unchanged. Needs the bond no larger than the product of ``source``'s other
        axes (:meth:`TreeLayout.feasible`).
        """
        bond = next(label for other, label in self.layout.neighbours(source) if other == target)
        axis = self.layout.nodes[source].index(bond)
        moved = np.moveaxis(self.nodes[source], axis, -1)
        q, r = np.linalg.qr(moved.reshape(-1, moved.shape[-1]))
        self.nodes[source] = np.moveaxis(q.reshape(moved.shape), -1, axis)
        target_axis = self.layout.nodes[target].index(bond)
        self.nodes[target] = np.moveaxis(np.tensordot(r, self.nodes[target], axes=(1, target_axis)), 0, target_axis)

    def orthogonalize(self, center: int) -> None:
        """Every node but ``center`` becomes an isometry towards ``center``; the tensor is unchanged."""
        for node, parent in self.layout.edges_towards(center):
            self.move_center(node, parent)

    def project(self, tensor: np.ndarray, center: int) -> np.ndarray:
        """``tensor`` contracted with every node but ``center``: the optimal centre when the others are isometries."""
        edge, reduced, labels = self._absorb_end(tensor, center)
        rest = [index for index in range(len(self.nodes)) if index not in (center, edge)]
        others = [self._connected_view(index) for index in rest]
        if center not in self._projections:
            inputs = [labels] + [self.layout.connected(index) for index in rest]
            equation = ",".join(inputs) + "->" + self.layout.connected(center)
            shapes = [reduced.shape] + [node.shape for node in others]
            self._projections[center] = opt_einsum.contract_expression(equation, *shapes, memory_limit="max_input")
        return self._projections[center](reduced, *others).reshape(self.nodes[center].shape)

    def _absorb_end(self, tensor: np.ndarray, center: int) -> tuple[int, np.ndarray, str]:
        """The tensor contracted with the node holding its first mode pair (the last pair's node if the first
        is the centre) as one GEMM on a free view; returns ``(that node, result, result's labels)``.

        Left to opt_einsum, this first and largest contraction may transpose (copy) the whole tensor.
        """
        physical = self.layout.physical
        front = self.layout.holder(physical[0])
        edge = front if front != center else self.layout.holder(physical[-1])
        labels = self.layout.connected(edge)
        pair = physical[:2] if edge == front else physical[-2:]
        node_axes = [labels.index(label) for label in pair]
        free = "".join(label for label in labels if label not in pair)
        if edge == front:
            return edge, np.tensordot(self._connected_view(edge), tensor, axes=(node_axes, [0, 1])), free + physical[2:]
        ends = [tensor.ndim - 2, tensor.ndim - 1]
        return edge, np.tensordot(tensor, self._connected_view(edge), axes=(ends, node_axes)), physical[:-2] + free

    def _connected_view(self, index: int) -> np.ndarray:
        """Node ``index`` without its dangling axes (a size-1 axis summed alone would force a slow einsum)."""
        connected = self.layout.connected(index)
        labels, shape = self.layout.nodes[index], self.nodes[index].shape
        return self.nodes[index].reshape([size for label, size in zip(labels, shape) if label in connected])

    def solve(self, tensor: np.ndarray, center: int, norm2: float) -> float:
        """Replace ``center`` by its optimal value; return the relative error of the network."""
        self.nodes[center] = self.project(tensor, center)
        if norm2 == 0.0:
            return 0.0
        kept = float(np.vdot(self.nodes[center], self.nodes[center]))
        return math.sqrt(max(norm2 - kept, 0.0) / norm2)
