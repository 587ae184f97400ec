"""Hierarchical Tucker (HT) on a balanced binary tree over the ``d`` merged modes ``m_k n_k``.

Hackbusch & Kühn 2009, Grasedyck 2010; HT-RNN (Yin et al. 2020). The tree splits the modes ``[lo, hi)`` of a
node at ``lo + ⌈(hi − lo)/2⌉``. Its nodes, in breadth-first order (root first), are stored in ``nodes``:

* a leaf (mode k): frame ``U_k`` of shape ``(m_k, n_k, r_k)``;
* an inner node t with children l, r: transfer tensor ``B_t`` of shape ``(r_l, r_r, r_t)``, with ``r_root = 1``.

The rank is one int for every non-root node or a list with one rank per non-root node in the same
breadth-first order (for d = 4: ``[r_{12}, r_{34}, r_1, r_2, r_3, r_4]``). Parameters:
``Σ_leaves m_k n_k r_k + Σ_inner r_l r_r r_t``.

Fit: leaves-to-root hierarchical SVD (each node's frame from the Gram of the core tensor's unfolding, the
core tensor projected onto it as the tree is climbed), then ALS sweeps (:func:`~.tree_als.tree_als`).
Multiplication never builds W: the input absorbs one node at a time (a leaf turns ``n_k`` into
``(m_k, r_k)``, a transfer tensor joins two bonds into one), in the order that needs the fewest MACs
(:meth:`TreeLayout.contraction`).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import tensorly as tl
from tensorly.tenalg import mode_dot

from kcompress.formats.linalg import leading_vectors
from kcompress.formats.tensorize import Tensorization
from kcompress.formats.treenet import TreeFactorization, TreeLayout, take_letters


class TreeNode(NamedTuple):
    """Modes ``[lo, hi)`` of a node and the indices of its children (none for a leaf)."""

    lo: int
    hi: int
    children: tuple[int, ...]


@lru_cache(maxsize=None)
def dimension_tree(order: int) -> tuple[TreeNode, ...]:
    """The balanced binary tree over ``order`` modes in breadth-first order (root first)."""
    ranges = [(0, order)]
    nodes: list[TreeNode] = []
    while len(nodes) < len(ranges):
        lo, hi = ranges[len(nodes)]
        if hi - lo == 1:
            nodes.append(TreeNode(lo, hi, ()))
            continue
        middle = lo + (hi - lo + 1) // 2
        nodes.append(TreeNode(lo, hi, (len(ranges), len(ranges) + 1)))
        ranges += [(lo, middle), (middle, hi)]
    return tuple(nodes)


@lru_cache(maxsize=None)
def ht_layout(order: int) -> TreeLayout:
    """Leaf labels ``(out_k, in_k, bond)``; inner ``(bond_l, bond_r, bond)``; the root's last bond dangles."""
    tree = dimension_tree(order)
    letters = take_letters(2 * order + len(tree))
    physical, bonds = letters[: 2 * order], letters[2 * order : 2 * order + len(tree) - 1]
    edge = [letters[-1]] + list(bonds)
    nodes = tuple(
        (edge[node.children[0]] + edge[node.children[1]] if node.children else physical[2 * node.lo : 2 * node.lo + 2])
        + edge[index]
        for index, node in enumerate(tree)
    )
    return TreeLayout(physical, bonds, nodes)


def hierarchical_svd(tensor: np.ndarray, tz: Tensorization, ranks: list[int]) -> list[np.ndarray]:
    """Leaves-to-root HT-SVD of the merged tensor; nodes in :func:`dimension_tree` order.

    ``core`` starts as the tensor; its axes are the current frontier of the tree. Each non-root node, children
    first, merges its children's axes (a leaf: its own mode), takes the leading ``r_t`` left singular vectors
    of that unfolding as its frame, and projects the core onto them. The root is what remains.
    """
    tree = dimension_tree(tz.order)
    leaves = {node.lo: index for index, node in enumerate(tree) if not node.children}
    frontier = [leaves[k] for k in range(tz.order)]
    nodes: list[np.ndarray] = [np.empty(0)] * len(tree)
    core = tensor
    for index in reversed(range(1, len(tree))):
        node = tree[index]
        if node.children:
            position = frontier.index(node.children[0])
            split = core.shape[position : position + 2]
            core = core.reshape(core.shape[:position] + (math.prod(split),) + core.shape[position + 2 :])
            frontier[position : position + 2] = [index]
        else:
            position = frontier.index(index)
            split = (tz.out_modes[node.lo], tz.in_modes[node.lo])
        frame = leading_vectors(tl.base.unfold(core, position), ranks[index - 1])
        nodes[index] = frame.reshape(split + (frame.shape[1],))
        core = mode_dot(core, frame.T, position)
    nodes[0] = core[..., None]
    return nodes


class HT(TreeFactorization):
    """Hierarchical Tucker: ``nodes[t]`` in breadth-first order (see the module docstring)."""

    name = "ht"
    summary = "hierarchical Tucker on a balanced binary tree; HT-SVD + ALS sweeps"
    node_attribute = "nodes"

    @classmethod
    def layout(cls, order: int) -> TreeLayout:
        return ht_layout(order)

    def _initial_nodes(self, tensor: np.ndarray, ranks: list[int]) -> tuple[list[np.ndarray], int]:
        """HT-SVD; every frame is orthonormal and the root is the projection, so the root is the centre."""
        return hierarchical_svd(tensor, self.tensorization, ranks), 0
