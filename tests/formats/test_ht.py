"""HT: exact recovery, node order, multiplication against the dense product, counts, rank rules, ALS behaviour."""

import math

import pytest
import torch

from kcompress.errors import KCompressError
from kcompress.formats.ht import HT
from kcompress.formats.tensorize import Tensorization, choose_tensorization
from tests.conftest import trained_like
from tests.formats.test_tt import relative

Range = tuple[int, int]


def split(lo: int, hi: int) -> int:
    """The balanced split of modes ``[lo, hi)`` (the left half takes the extra mode)."""
    return lo + math.ceil((hi - lo) / 2)


def breadth_first(order: int) -> list[Range]:
    """Mode ranges of the dimension tree, root first, as the format documents its node order."""
    ranges = [(0, order)]
    for lo, hi in ranges:
        if hi - lo > 1:
            ranges += [(lo, split(lo, hi)), (split(lo, hi), hi)]
    return ranges


def random_tree(tz: Tensorization, ranks: list[int], seed: int = 0) -> dict[Range, torch.Tensor]:
    """Gaussian leaves ``(m_k, n_k, r_k)`` and transfer tensors ``(r_l, r_r, r_t)``; ``ranks`` per non-root node."""
    generator = torch.Generator().manual_seed(seed)
    ranges = breadth_first(tz.order)
    rank = dict(zip(ranges, [1, *ranks]))
    nodes = {}
    for lo, hi in ranges:
        if hi - lo == 1:
            shape = (tz.out_modes[lo], tz.in_modes[lo], rank[lo, hi])
        else:
            shape = (rank[lo, split(lo, hi)], rank[split(lo, hi), hi], rank[lo, hi])
        nodes[lo, hi] = torch.randn(shape, generator=generator, dtype=torch.float64)
    return nodes


def ht_dense(tz: Tensorization, nodes: dict[Range, torch.Tensor]) -> torch.Tensor:
    """The padded ``(M', N')`` matrix of an HT tree, contracted recursively here (not with the format's code)."""

    def subtree(lo: int, hi: int) -> torch.Tensor:  # (m_lo, n_lo, …, m_{hi-1}, n_{hi-1}, r_t)
        if hi - lo == 1:
            return nodes[lo, hi]
        left, right = subtree(lo, split(lo, hi)), subtree(split(lo, hi), hi)
        pairs = left.reshape(-1, left.shape[-1]), right.reshape(-1, right.shape[-1])
        joined = torch.einsum("ia,jb,abt->ijt", *pairs, nodes[lo, hi])
        return joined.reshape(left.shape[:-1] + right.shape[:-1] + (-1,))

    d = tz.order
    interleaved = subtree(0, d)[..., 0]
    return interleaved.permute(list(range(0, 2 * d, 2)) + list(range(1, 2 * d, 2))).reshape(tz.padded_out, tz.padded_in)


def with_random_tree(tz: Tensorization, ranks: list[int]) -> HT:
    """A float64 module holding :func:`random_tree`, loaded in the documented breadth-first order."""
    module = HT(tz, ranks).double()
    with torch.no_grad():
        for param, node in zip(module.nodes, random_tree(tz, ranks).values()):
            param.copy_(node)
    return module


EXACT = [
    (Tensorization(64, 48, (8, 8), (6, 8)), 4),
    (Tensorization(64, 48, (4, 4, 4), (3, 4, 4)), 3),
    (Tensorization(64, 48, (2, 4, 2, 4), (2, 3, 2, 4)), [3, 3, 2, 3, 2, 4]),
    (Tensorization(32, 48, (2, 2, 2, 2, 2), (2, 2, 2, 2, 3)), 2),
]


@pytest.mark.parametrize("tz, rank", EXACT)
def test_exact_ht_weight_is_recovered(tz: Tensorization, rank: object) -> None:
    ranks = HT.normalize_rank(tz, rank)
    weight = ht_dense(tz, random_tree(tz, ranks))
    fitted = HT.fit(weight.float(), tz, rank)
    assert fitted.fit_info.relative_error < 1e-5
    assert relative(fitted.reconstruct(), weight) < 1e-5


@pytest.mark.parametrize("order", [2, 3, 4, 5])
def test_node_order_and_reconstruction(order: int) -> None:
    tz = choose_tensorization(96, 80, order=order)
    ranks = [2 + index % 3 for index in range(2 * order - 2)]
    module = with_random_tree(tz, ranks)
    assert [tuple(p.shape) for p in module.nodes] == [tuple(node.shape) for node in random_tree(tz, ranks).values()]
    assert relative(module.reconstruct(), tz.crop_weight(ht_dense(tz, random_tree(tz, ranks)))) < 1e-12


SHAPES = [(64, 48, 3, 3), (4 * 131, 97, 3, 4), (97, 61, 2, 5), (300, 200, 4, 3), (300, 200, 5, 2)]


@pytest.mark.parametrize("rows, cols, order, rank", SHAPES)
def test_multiply_equals_dense_product(rows: int, cols: int, order: int, rank: int) -> None:
    tz = choose_tensorization(rows, cols, order=order)
    module = with_random_tree(tz, HT.normalize_rank(tz, rank)).float()
    x = torch.randn(2, 3, cols)
    out = module.multiply(x)
    assert out.shape == (2, 3, rows)
    assert relative(out, x @ module.reconstruct().T) < 1e-5
    assert module.macs_per_vector() == sum(step.macs for step in module.contraction.steps)
    assert sorted(step.node for step in module.contraction.steps) == list(range(2 * order - 1))


def test_macs_of_a_two_mode_tree() -> None:
    (m1, m2), (n1, n2), r = (4, 5), (3, 4), 2
    module = HT(Tensorization(m1 * m2, n1 * n2, (m1, m2), (n1, n2)), r)
    # the cheapest of: leaf 2, root, leaf 1 and leaf 1, root, leaf 2 (absorbing both leaves first costs more)
    by_right = n1 * n2 * m2 * r + n1 * m2 * r * r + n1 * m2 * r * m1
    by_left = n1 * n2 * m1 * r + m1 * n2 * r * r + m1 * n2 * r * m2
    assert module.macs_per_vector() == min(by_right, by_left)
    assert [step.node for step in module.contraction.steps] == [2, 0, 1]


def test_parameter_counts_match_formula_and_storage() -> None:
    tz = Tensorization(300, 200, (3, 4, 5, 5), (2, 4, 5, 5))
    for rank in (3, [4, 4, 2, 3, 4, 5]):
        module = HT(tz, rank)
        r = dict(zip(breadth_first(4), [1, *module.rank]))
        leaves = sum(m * n * r[k, k + 1] for k, (m, n) in enumerate(zip(tz.out_modes, tz.in_modes)))
        inner = sum(r[lo, split(lo, hi)] * r[split(lo, hi), hi] * r[lo, hi] for lo, hi in r if hi - lo > 1)
        stored = sum(p.numel() for p in module.parameters())
        assert module.num_params() == HT.param_count(tz, rank) == leaves + inner == stored


def test_rank_rules() -> None:
    tz = Tensorization(64, 64, (2, 4, 8), (2, 4, 8))  # merged modes 4, 16, 64; tree {1,2} {3} {1} {2}
    assert HT.normalize_rank(tz, 3) == [3, 3, 3, 3]
    assert HT.clamp_rank(tz, 10**6) == [64, 64, 4, 16]  # min(∏ inside, ∏ outside) per node
    assert HT.max_rank(tz) == 64
    assert HT.clamp_rank(tz, [9, 5, 2, 3]) == [5, 5, 2, 3]  # the root's children need equal ranks; {1,2} <= 2·3
    assert HT.clamp_rank(tz, [20, 20, 2, 3]) == [6, 6, 2, 3]
    with pytest.raises(KCompressError, match="4 ranks"):
        HT(tz, [3, 3])
    for bad in (0, [3, 3, 3, -1], "3"):
        with pytest.raises(KCompressError):
            HT(tz, bad)
    with pytest.raises(KCompressError, match="at least 2 modes"):
        HT(Tensorization(64, 48, (64,), (48,)), 2)


def test_rank_above_what_a_node_can_use_is_exact_and_zero_padded() -> None:
    tz = Tensorization(16, 16, (2, 2, 4), (2, 2, 4))
    weight = trained_like(16, 16)
    fitted = HT.fit(weight, tz, [16, 16, 4, 9])
    assert fitted.fit_info.relative_error < 1e-6
    assert relative(fitted.multiply(torch.eye(16)), weight.T) < 1e-5


def test_error_does_not_increase_with_rank() -> None:
    weight = trained_like(256, 192)
    tz = choose_tensorization(256, 192, order=4)
    errors = [HT.fit(weight, tz, rank).fit_info.relative_error for rank in (1, 2, 4, 8)]
    assert all(later <= earlier + 1e-9 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]


def test_sweeps_never_increase_the_error_and_improve_on_ht_svd() -> None:
    weight = trained_like(256, 192, seed=1)
    tz = choose_tensorization(256, 192, order=4)
    seen = []
    fitted = HT.fit(weight, tz, 3, n_sweeps=5, tol=0.0, progress=lambda i, n, e: seen.append((i, n, e)))
    curve = fitted.fit_info.error_curve
    assert all(later <= earlier for earlier, later in zip(curve, curve[1:])), curve
    assert curve[-1] < curve[0] - 1e-4
    assert len(curve) == fitted.fit_info.iterations == len(seen) and [e for _, _, e in seen] == curve
    assert fitted.fit_info.relative_error == pytest.approx(curve[-1], rel=1e-6)
    ht_svd = HT.fit(weight, tz, 3, n_sweeps=0).fit_info
    assert ht_svd.relative_error == pytest.approx(curve[0], rel=1e-6)
    assert fitted.fit_info.relative_error < ht_svd.relative_error - 1e-4  # both computed explicitly

