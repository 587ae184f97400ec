"""Tree tensor networks, the machinery shared by the ``tt`` and ``ht`` formats (and ``tr``, ``bt``).

A tree format stores one node tensor per vertex of a tree. Each axis of a node carries an einsum label:

* a *physical* label for an output mode ``m_k`` or an input mode ``n_k`` (each on exactly one node);
* a *bond* label, shared by the two nodes of an edge; its size is a rank;
* a *dangling* label of size 1 (the TT boundary ranks ``r_0 = r_d = 1``, the HT root's ``r_root = 1``).

Contracting all nodes gives the rearranged weight (:meth:`Tensorization.rearrange`) viewed with axes
``(m_1, n_1, …, m_d, n_d)``. The formats differ only in the tree (:class:`TreeLayout`) and the SVD start;
rank rules, parameter counts, the multiplication contraction (:meth:`TreeLayout.contraction`) and reconstruction are here;
the ALS refinement is :func:`~.tree_als.tree_als`. Counts, contractions and reconstruction hold for any network of
one layout, a cycle included: ``tr`` is a ring of this kind and each block of ``bt`` a Tucker star (their ALS
is :func:`~.network_als.network_sum_als`).
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar, Iterable, Mapping, Optional

import numpy as np
import tensorly as tl
import torch
from torch import Tensor, nn

from kcompress.errors import KCompressError
from kcompress.formats.base import Factorization, ProgressFn, Rank
from kcompress.formats.options import FormatOptions, option
from kcompress.formats.tensorize import Tensorization
from kcompress.formats.tree_als import tree_als

#: einsum labels (torch.einsum accepts letters only)
LETTERS = string.ascii_letters
#: a multiplication step with ``B·pre <= ratio · post`` runs as ``B·pre`` GEMMs ``(new, K) @ (K, post)``; otherwise
#: as one GEMM after moving the contracted block last (measured, torch 2.13 MKL, 1 thread: the batched form is up
#: to 5x slower when it has many small GEMMs, the transposing form up to 6x slower when ``post`` is large)
BATCHED_GEMM_RATIO = 4


def take_letters(count: int) -> str:
    """The first ``count`` einsum labels (a clear error when a tree needs more than there are)."""
    if count > len(LETTERS):
        raise KCompressError(f"a tree network with {count} axis labels is too large (at most {len(LETTERS)})")
    return LETTERS[:count]


def volume(sizes: dict[str, int], labels: Iterable[str]) -> int:
    """Product of the sizes of ``labels``."""
    return math.prod(sizes[label] for label in labels)


@dataclass(frozen=True)
class Step:
    """One step of a :class:`TreeContraction`: the state ``(B, *shape)``, its axes reordered by ``permutation``
    (batch axis included; ``None``: already in place), viewed as ``(B·pre, contracted, post)``, is multiplied
    by node ``node`` arranged by ``node_permutation`` as a ``(new, contracted)`` matrix: ``(B·pre, new, post)``."""

    node: int
    shape: tuple[int, ...]
    permutation: Optional[tuple[int, ...]]
    pre: int
    contracted: int
    post: int
    new: int
    node_permutation: tuple[int, ...]

    @property
    def macs(self) -> int:
        return self.pre * self.contracted * self.post * self.new


class TreeContraction:
    """``x (B, n_1, …, n_d)`` absorbs the nodes one at a time in ``order``; W is never built.

    The axes a node consumes (its input mode, bonds to absorbed nodes) are contracted as one block and its new
    axes take the block's place, so a step is a single (batched) GEMM on a view of the state; the state is
    permuted only when a block is not contiguous, and once at the end if the output modes are out of order.
    """

    def __init__(self, layout: TreeLayout, sizes: dict[str, int], order: tuple[int, ...]) -> None:
        labels = list(layout.physical[1::2])
        self.steps: list[Step] = []
        for node in order:
            node_labels = layout.nodes[node]
            shared = [label for label in labels if label in node_labels]
            new = [label for label in layout.connected(node) if label not in shared]
            dangling = [label for label in node_labels if label not in layout.connected(node)]
            start = labels.index(shared[0])
            rest = [label for label in labels if label not in shared]
            arranged = rest[:start] + shared + rest[start:]
            permutation = (0,) + tuple(1 + labels.index(label) for label in arranged)
            self.steps.append(
                Step(
                    node,
                    tuple(sizes[label] for label in labels),
                    None if permutation == tuple(range(len(permutation))) else permutation,
                    volume(sizes, rest[:start]),
                    volume(sizes, shared),
                    volume(sizes, rest[start:]),
                    volume(sizes, new),
                    tuple(node_labels.index(label) for label in new + shared + dangling),
                )
            )
            labels = rest[:start] + new + rest[start:]
        self.final_shape = tuple(sizes[label] for label in labels)
        self.output_permutation = (0,) + tuple(1 + labels.index(label) for label in layout.physical[0::2])

    @property
    def macs(self) -> int:
        """Multiply-accumulates per input vector."""
        return sum(step.macs for step in self.steps)

    @property
    def elements_per_vector(self) -> int:
        """Largest input + output of a step for one vector (sizes row chunks)."""
        return max(step.pre * step.post * (step.contracted + step.new) for step in self.steps)

    def run(self, x: Tensor, nodes: list[Tensor]) -> Tensor:
        """``x (B, N')`` -> ``(B, M')``."""
        batch = x.shape[0]
        state = x
        for step in self.steps:
            if step.permutation is not None:
                state = state.reshape((batch,) + step.shape).permute(step.permutation)
            matrix = nodes[step.node].permute(step.node_permutation).reshape(step.new, step.contracted)
            grouped = state.reshape(-1, step.contracted, step.post)
            if step.post == 1:
                state = grouped.reshape(-1, step.contracted) @ matrix.T
            elif grouped.shape[0] <= BATCHED_GEMM_RATIO * step.post:
                state = torch.bmm(matrix.expand(grouped.shape[0], step.new, step.contracted), grouped)
            else:
                flat = grouped.transpose(1, 2).reshape(-1, step.contracted) @ matrix.T
                state = flat.reshape(grouped.shape[0], step.post, step.new).transpose(1, 2)
        return state.reshape((batch,) + self.final_shape).permute(self.output_permutation).reshape(batch, -1)


@dataclass(frozen=True)
class TreeLayout:
    """Labels of a tree network over ``d`` modes.

    ``physical``: ``2d`` labels, interleaved ``out_1 in_1 … out_d in_d``; ``bonds``: one label per rank,
    in the order of the format's rank list; ``nodes``: the labels of each node's axes, in storage order.
    """

    physical: str
    bonds: str
    nodes: tuple[str, ...]

    @property
    def equation(self) -> str:
        """einsum equation contracting all nodes into the ``(m_1, n_1, …, m_d, n_d)`` tensor."""
        return ",".join(self.nodes) + "->" + self.physical

    def sizes(self, tensorization: Tensorization, ranks: list[int]) -> dict[str, int]:
        """Size of every label: physical from the modes, bonds from ``ranks``, dangling 1."""
        modes = [size for pair in zip(tensorization.out_modes, tensorization.in_modes) for size in pair]
        sizes = {label: 1 for labels in self.nodes for label in labels}
        sizes.update(zip(self.physical, modes))
        sizes.update(zip(self.bonds, ranks))
        return sizes

    def shapes(self, tensorization: Tensorization, ranks: list[int]) -> list[tuple[int, ...]]:
        """Shape of each node."""
        sizes = self.sizes(tensorization, ranks)
        return [tuple(sizes[label] for label in labels) for labels in self.nodes]

    def param_count(self, tensorization: Tensorization, ranks: list[int]) -> int:
        sizes = self.sizes(tensorization, ranks)
        return sum(volume(sizes, labels) for labels in self.nodes)

    def feasible(self, tensorization: Tensorization, ranks: list[int]) -> list[int]:
        """``ranks`` lowered until no bond exceeds the product of the other axes of either of its nodes.

        A larger bond cannot carry more information (the node's matricization has no more rank), and with
        the rule met every node can be made an isometry towards any neighbour. At the fixed point each bond
        is also at most both sizes of the unfolding it cuts (``min(∏ inside, ∏ outside)``).
        """
        sizes = self.sizes(tensorization, ranks)
        changed = True
        while changed:
            changed = False
            for labels in self.nodes:
                for bond in set(labels) & set(self.bonds):
                    others = volume(sizes, (label for label in labels if label != bond))
                    if sizes[bond] > others:
                        sizes[bond], changed = others, True
        return [sizes[bond] for bond in self.bonds]

    def exact_ranks(self, tensorization: Tensorization) -> list[int]:
        """Per bond, the rank at which any weight is represented exactly: ``min(∏ inside, ∏ outside)``."""
        unbounded = math.prod(tensorization.out_modes) * math.prod(tensorization.in_modes)
        return self.feasible(tensorization, [unbounded] * len(self.bonds))

    def contraction(self, tensorization: Tensorization, ranks: list[int]) -> TreeContraction:
        """The multiplication contraction whose absorption order costs the least MACs plus elements read and written
        (dynamic programming over the sets of absorbed nodes; each step absorbs a node sharing an axis with
        the state: its input mode or a bond to an absorbed node)."""
        sizes = self.sizes(tensorization, ranks)
        inputs, outputs = self.physical[1::2], set(self.physical[0::2])
        holders = {label: {i for i, labels in enumerate(self.nodes) if label in labels} for label in sizes}

        @lru_cache(maxsize=None)
        def state(absorbed: frozenset[int]) -> frozenset[str]:
            present = set(inputs).union(*(self.nodes[i] for i in absorbed))
            return frozenset(label for label in present if label in outputs or not holders[label] <= absorbed)

        def step_cost(absorbed: frozenset[int], node: int) -> int:
            before, after = state(absorbed), state(absorbed | {node})
            macs = volume(sizes, before | set(self.nodes[node]))
            return macs + volume(sizes, before) + volume(sizes, after)

        layer: dict[frozenset[int], tuple[int, tuple[int, ...]]] = {frozenset(): (0, ())}
        for _ in self.nodes:
            following: dict[frozenset[int], tuple[int, tuple[int, ...]]] = {}
            for absorbed, (cost, order) in layer.items():
                reachable = state(absorbed)
                for node, labels in enumerate(self.nodes):
                    if node in absorbed or not reachable & set(labels):
                        continue
                    candidate = (cost + step_cost(absorbed, node), order + (node,))
                    key = absorbed | {node}
                    if key not in following or candidate[0] < following[key][0]:
                        following[key] = candidate
            layer = following
        ((_, order),) = layer.values()
        return TreeContraction(self, sizes, order)

    def holder(self, label: str) -> int:
        """The node with axis ``label`` (the first one for a bond)."""
        return next(index for index, labels in enumerate(self.nodes) if label in labels)

    def connected(self, node: int) -> str:
        """Labels of ``node`` without the dangling ones."""
        return "".join(label for label in self.nodes[node] if label in self.physical + self.bonds)

    def neighbours(self, node: int) -> list[tuple[int, str]]:
        """``(neighbour, shared bond label)`` pairs of ``node``."""
        return [
            (other, bond)
            for other, labels in enumerate(self.nodes)
            if other != node
            for bond in set(labels) & set(self.nodes[node]) & set(self.bonds)
        ]

    def tour(self, start: int) -> list[int]:
        """Euler tour from ``start``: consecutive nodes are neighbours; it visits every node, ends at ``start``."""
        walk = [start]

        def visit(node: int, parent: int) -> None:
            for other, _ in self.neighbours(node):
                if other != parent:
                    walk.append(other)
                    visit(other, node)
                    walk.append(node)

        visit(start, -1)
        return walk

    def edges_towards(self, center: int) -> list[tuple[int, int]]:
        """``(node, parent)`` pairs of the tree rooted at ``center``, farthest nodes first."""
        pairs: list[tuple[int, int]] = []

        def visit(node: int, parent: int) -> None:
            for other, _ in self.neighbours(node):
                if other != parent:
                    pairs.append((other, node))
                    visit(other, node)

        visit(center, -1)
        return pairs[::-1]


@dataclass(frozen=True)
class TreeOptions(FormatOptions):
    """Options of ``tt`` and ``ht`` (the ALS sweeps after the SVD start, :func:`~.tree_als.tree_als`).

    Attributes
    ----------
    max_sweeps : int
        Most ALS sweeps (0: the SVD start with its centre re-solved; earlier key ``n_sweeps``).
    min_sweep_gain : float
        Sweeps stop when one lowers the relative error by no more than this (earlier key ``tol``).
    """

    renamed: ClassVar[Mapping[str, str]] = {"n_sweeps": "max_sweeps", "tol": "min_sweep_gain"}

    max_sweeps: int = option(4, minimum=0)
    min_sweep_gain: float = option(1e-6, minimum=0)


class TreeFactorization(Factorization):
    """A format whose factors are the nodes of a tree network (``tt``, ``ht``; ``tr``'s ring); ranks are per bond.

    Subclasses give the tree (:meth:`layout`) and the SVD start (:meth:`_initial_nodes`). The nodes are
    stored in ``getattr(self, node_attribute)``; ``contraction`` is the :class:`TreeContraction` (:meth:`TreeLayout.contraction`).
    """

    #: name of the ``nn.ParameterList`` holding the nodes in layout order
    node_attribute: ClassVar[str] = "nodes"
    options_type = TreeOptions
    options: TreeOptions
    exact_at_max_rank = True

    @classmethod
    def layout(cls, order: int) -> TreeLayout:
        """The tree over ``order`` modes."""
        raise NotImplementedError

    def _initial_nodes(self, tensor: np.ndarray, ranks: list[int]) -> tuple[list[np.ndarray], int]:
        """SVD start from the merged ``(m_1 n_1, …, m_d n_d)`` tensor at feasible ``ranks``: (nodes, centre)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ ranks and counts
    @classmethod
    def normalize_rank(cls, tensorization: Tensorization, rank: Rank) -> list[int]:
        """One rank per bond: an int applies to every bond; a list is checked for length and positivity."""
        if tensorization.order < 2:
            raise KCompressError(f"{cls.name} needs at least 2 modes; use svd for an unfactored matrix")
        count = len(cls.layout(tensorization.order).bonds)
        if isinstance(rank, int) and not isinstance(rank, bool):
            ranks = [rank] * count
        elif isinstance(rank, (list, tuple)) and all(isinstance(r, int) and not isinstance(r, bool) for r in rank):
            ranks = [int(r) for r in rank]
        else:
            raise KCompressError(f"{cls.name} takes an integer rank or a list of {count} integers, got {rank!r}")
        if len(ranks) != count:
            raise KCompressError(f"{cls.name} with {tensorization.order} modes has {count} ranks, got {len(ranks)}")
        if any(r <= 0 for r in ranks):
            raise KCompressError(f"ranks must be positive integers, got {ranks}")
        return ranks

    @classmethod
    def clamp_rank(cls, tensorization: Tensorization, rank: Rank) -> list[int]:
        """Each bond limited to what it can use (:meth:`TreeLayout.feasible`)."""
        return cls.layout(tensorization.order).feasible(tensorization, cls.normalize_rank(tensorization, rank))

    @classmethod
    def max_rank(cls, tensorization: Tensorization) -> int:
        """The largest per-bond exact-representation rank."""
        return max(cls.layout(tensorization.order).exact_ranks(tensorization))

    @classmethod
    def param_count(cls, tensorization: Tensorization, rank: Rank) -> int:
        ranks = cls.normalize_rank(tensorization, rank)
        return cls.layout(tensorization.order).param_count(tensorization, ranks)

    @classmethod
    def macs(cls, tensorization: Tensorization, rank: Rank, options: Optional[FormatOptions] = None) -> int:
        """MACs of the cheapest absorption order (:meth:`TreeLayout.contraction`)."""
        ranks = cls.normalize_rank(tensorization, rank)
        return cls.layout(tensorization.order).contraction(tensorization, ranks).macs

    # ------------------------------------------------------------------ module
    @property
    def node_params(self) -> nn.ParameterList:
        return getattr(self, self.node_attribute)

    def _allocate(self) -> None:
        shapes = self.layout(self.tensorization.order).shapes(self.tensorization, self.rank)
        setattr(self, self.node_attribute, nn.ParameterList(nn.Parameter(torch.empty(shape)) for shape in shapes))
        self.contraction = self.layout(self.tensorization.order).contraction(self.tensorization, self.rank)

    def _fit(self, weight: Tensor, seed: int, progress: Optional[ProgressFn]) -> tuple[int, list[float]]:
        """SVD start, then ALS sweeps; deterministic (``seed`` is unused). Bonds above what they can use
        (:meth:`TreeLayout.feasible`) are fitted at the usable size and stored zero-padded."""
        tz = self.tensorization
        layout = self.layout(tz.order)
        merged = tz.rearrange(weight).numpy()
        with tl.backend_context("numpy"):
            nodes, center = self._initial_nodes(merged, layout.feasible(tz, self.rank))
        interleaved = merged.reshape([size for pair in zip(tz.out_modes, tz.in_modes) for size in pair])
        nodes, curve = tree_als(interleaved, layout, nodes, center, max_sweeps=self.options.max_sweeps,
                                min_sweep_gain=self.options.min_sweep_gain, progress=progress)
        for param, node in zip(self.node_params, nodes):
            param.zero_()
            param[tuple(slice(0, size) for size in node.shape)] = torch.from_numpy(node)
        return len(curve), curve

    def _multiply(self, x: Tensor) -> Tensor:
        return self.contraction.run(x, list(self.node_params))

    def _reconstruct(self) -> Tensor:
        layout = self.layout(self.tensorization.order)
        return self.tensorization.unrearrange(torch.einsum(layout.equation, *self.node_params))

    def _rows(self, index: Tensor, digits: Tensor) -> Tensor:
        """The network with every output-mode axis indexed by the rows' digits (a batch axis in its place),
        contracted to ``(B, n_1, …, n_d)``."""
        layout = self.layout(self.tensorization.order)
        batch = next(letter for letter in LETTERS if letter not in layout.equation)
        outputs = {label: k for k, label in enumerate(layout.physical[0::2])}
        terms, operands = [], []
        for labels, node in zip(layout.nodes, self.node_params):
            gathered = [labels.index(label) for label in labels if label in outputs]
            if gathered:
                node = node.movedim(gathered, list(range(len(gathered))))
                node = node[tuple(digits[:, outputs[labels[axis]]] for axis in gathered)]
                labels = batch + "".join(label for label in labels if label not in outputs)
            terms.append(labels)
            operands.append(node)
        equation = ",".join(terms) + "->" + batch + layout.physical[1::2]
        return torch.einsum(equation, *operands).reshape(index.shape[0], -1)
