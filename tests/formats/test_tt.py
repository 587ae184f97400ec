"""TT: exact recovery, multiplication against the dense product, counts, rank rules, ALS behaviour."""

import math

import pytest
import torch
from tensorly.tt_matrix import tt_matrix_to_tensor

from kcompress.errors import KCompressError
from kcompress.formats.tensorize import Tensorization, choose_tensorization
from kcompress.formats.tt import TT
from tests.conftest import trained_like


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def random_cores(tz: Tensorization, ranks: list[int], seed: int = 0) -> list[torch.Tensor]:
    """Gaussian cores ``(r_{k-1}, m_k, n_k, r_k)``."""
    generator = torch.Generator().manual_seed(seed)
    bonds = [1, *ranks, 1]
    return [
        torch.randn(bonds[k], m, n, bonds[k + 1], generator=generator, dtype=torch.float64)
        for k, (m, n) in enumerate(zip(tz.out_modes, tz.in_modes))
    ]


def tt_dense(tz: Tensorization, cores: list[torch.Tensor]) -> torch.Tensor:
    """The padded ``(M', N')`` matrix of TT-matrix cores, by TensorLy (independent of the format's code)."""
    return torch.from_numpy(tt_matrix_to_tensor([core.numpy() for core in cores])).reshape(tz.padded_out, tz.padded_in)


def with_random_cores(tz: Tensorization, ranks: list[int]) -> TT:
    """A float64 module holding :func:`random_cores`."""
    module = TT(tz, ranks).double()
    with torch.no_grad():
        for param, core in zip(module.cores, random_cores(tz, ranks)):
            param.copy_(core)
    return module


def sequential_macs(tz: Tensorization, ranks: list[int]) -> tuple[int, int]:
    """MACs per vector of the left-to-right and the right-to-left core-by-core contraction."""
    r = [1, *ranks, 1]
    m, n, d = tz.out_modes, tz.in_modes, tz.order
    left = sum(math.prod(m[:k]) * r[k] * n[k] * m[k] * r[k + 1] * math.prod(n[k + 1 :]) for k in range(d))
    right = sum(math.prod(n[:k]) * r[k] * n[k] * m[k] * r[k + 1] * math.prod(m[k + 1 :]) for k in range(d))
    return left, right


EXACT = [
    (Tensorization(64, 48, (8, 8), (6, 8)), 5),
    (Tensorization(64, 48, (4, 4, 4), (3, 4, 4)), [3, 5]),
    (Tensorization(64, 48, (2, 4, 2, 4), (2, 3, 2, 4)), 3),
]


@pytest.mark.parametrize("tz, rank", EXACT)
def test_exact_tt_weight_is_recovered(tz: Tensorization, rank: object) -> None:
    ranks = TT.normalize_rank(tz, rank)
    weight = tt_dense(tz, random_cores(tz, ranks))
    fitted = TT.fit(weight.float(), tz, rank)
    assert fitted.fit_info.relative_error < 1e-5
    assert relative(fitted.reconstruct(), weight) < 1e-5


def test_reconstruct_matches_tensorly() -> None:
    tz = Tensorization(60, 48, (3, 4, 5), (4, 3, 4))
    module = with_random_cores(tz, [2, 3])
    assert relative(module.reconstruct(), tt_dense(tz, random_cores(tz, [2, 3]))) < 1e-12


SHAPES = [(64, 48, 3, 3), (4 * 131, 97, 3, 4), (97, 61, 2, 5), (300, 200, 4, [2, 5, 3])]


@pytest.mark.parametrize("rows, cols, order, rank", SHAPES)
def test_multiply_equals_dense_product(rows: int, cols: int, order: int, rank: object) -> None:
    tz = choose_tensorization(rows, cols, order=order)
    module = with_random_cores(tz, TT.normalize_rank(tz, rank)).float()
    x = torch.randn(2, 3, cols)
    out = module.multiply(x)
    assert out.shape == (2, 3, rows)
    assert relative(out, x @ module.reconstruct().T) < 1e-5
    assert module.macs_per_vector() <= min(sequential_macs(tz, module.rank))


def test_parameter_counts_match_formula_storage_and_the_paper() -> None:
    folded = Tensorization(1024, 57600, (16, 4, 4, 4), (8, 20, 20, 18))
    assert TT.param_count(folded, 4) == 3360  # papers.md A.6: TT-LSTM, gates folded, ranks 4
    tz = Tensorization(300, 200, (3, 4, 5, 5), (2, 4, 5, 5))
    for rank in (3, [2, 7, 4]):
        module = TT(tz, rank)
        r = [1, *module.rank, 1]
        formula = sum(r[k] * m * n * r[k + 1] for k, (m, n) in enumerate(zip(tz.out_modes, tz.in_modes)))
        assert module.num_params() == TT.param_count(tz, rank) == formula == sum(p.numel() for p in module.parameters())


def test_rank_rules() -> None:
    tz = Tensorization(64, 64, (2, 4, 8), (2, 4, 8))  # merged modes 4, 16, 64
    assert TT.normalize_rank(tz, 3) == [3, 3]
    assert TT.max_rank(tz) == 64  # bond 2: min(4·16, 64)
    assert TT.clamp_rank(tz, 10**6) == [4, 64]  # each bond to min(∏ left, ∏ right)
    assert TT.clamp_rank(tz, [2, 50]) == [2, 32]  # a bond cannot exceed its neighbour times the mode between
    rank = TT.rank_for_ratio(tz, 8)
    assert TT.param_count(tz, rank) <= 64 * 64 / 8 < TT.param_count(tz, rank + 1)
    for bad in (0, [3], [3, 0], 2.5, True, [3, "4"]):
        with pytest.raises(KCompressError):
            TT(tz, bad)
    with pytest.raises(KCompressError, match="at least 2 modes"):
        TT(Tensorization(64, 48, (64,), (48,)), 2)
    for options in ({"n_sweeps": -1}, {"tol": "small"}):
        with pytest.raises(KCompressError):
            TT(tz, 2, **options)


def test_rank_above_what_a_bond_can_use_is_exact_and_zero_padded() -> None:
    tz = Tensorization(16, 16, (2, 2, 4), (2, 2, 4))
    weight = trained_like(16, 16)
    fitted = TT.fit(weight, tz, 20)
    assert fitted.fit_info.relative_error < 1e-6
    assert fitted.cores[0].shape == (1, 2, 2, 20) and not fitted.cores[0][..., 4:].any()
    x = torch.randn(3, 16)
    assert relative(fitted.multiply(x), x @ weight.T) < 1e-5


def test_error_does_not_increase_with_rank() -> None:
    weight = trained_like(256, 192)
    tz = choose_tensorization(256, 192, order=3)
    errors = [TT.fit(weight, tz, rank).fit_info.relative_error for rank in (1, 2, 4, 8, 16)]
    assert all(later <= earlier + 1e-9 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]


def test_sweeps_never_increase_the_error_and_improve_on_tt_svd() -> None:
    weight = trained_like(256, 192, seed=1)
    tz = choose_tensorization(256, 192, order=4)
    seen = []
    fitted = TT.fit(weight, tz, 3, n_sweeps=6, tol=0.0, progress=lambda i, n, e: seen.append((i, n, e)))
    curve = fitted.fit_info.error_curve
    assert all(later <= earlier for earlier, later in zip(curve, curve[1:])), curve
    assert curve[-1] < curve[0] - 1e-6
    assert len(curve) == fitted.fit_info.iterations == len(seen) and seen[0][:2] == (0, 6)
    assert [e for _, _, e in seen] == curve
    assert fitted.fit_info.relative_error == pytest.approx(curve[-1], rel=1e-6)
    tt_svd = TT.fit(weight, tz, 3, n_sweeps=0).fit_info
    assert tt_svd.error_curve == curve[:1] and tt_svd.relative_error == pytest.approx(curve[0], rel=1e-6)
    assert fitted.fit_info.relative_error < tt_svd.relative_error - 1e-6  # both computed explicitly

