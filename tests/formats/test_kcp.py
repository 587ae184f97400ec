"""KCP: exact recovery, both fast multiplication algorithms against the dense product, counts, rank rules."""

import pytest
import torch

from kcompress.errors import KCompressError
from kcompress.formats.kcp import KCP
from kcompress.formats.kcp_contraction import Contraction, kcp_step_costs
from kcompress.formats.tensorize import Tensorization, choose_tensorization, mode_orders
from tests.conftest import trained_like


def random_kcp_weight(tz: Tensorization, rank: int) -> torch.Tensor:
    """Σ_r A_r^1 ⊗ … ⊗ A_r^d built with torch.kron, independently of the format's own code."""
    total = torch.zeros(tz.padded_out, tz.padded_in, dtype=torch.float64)
    for _ in range(rank):
        term = torch.ones(1, 1, dtype=torch.float64)
        for m, n in zip(tz.out_modes, tz.in_modes):
            term = torch.kron(term, torch.randn(m, n, dtype=torch.float64))
        total += term
    return tz.crop_weight(total)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.mark.parametrize("order, rank", [(2, 3), (3, 2), (4, 3)])
def test_exact_kcp_weight_is_recovered(order: int, rank: int) -> None:
    tz = Tensorization(64, 48, *{2: ((8, 8), (6, 8)), 3: ((4, 4, 4), (3, 4, 4)), 4: ((2, 4, 2, 4), (2, 3, 2, 4))}[order])
    weight = random_kcp_weight(tz, rank)
    fitted = KCP.fit(weight.float(), tz, rank, seed=0, n_iter_max=500, tol=1e-12)
    assert fitted.fit_info.relative_error < 1e-5
    assert relative(fitted.reconstruct(), weight) < 1e-5


SHAPES = [(64, 48, 3), (97, 61, 2), (4 * 131, 97, 3), (1024, 512, 4), (300, 200, 5)]


@pytest.mark.parametrize("rows, cols, order", SHAPES)
@pytest.mark.parametrize("algorithm", ["rank_batch", "per_rank"])
def test_both_algorithms_equal_dense_product(rows: int, cols: int, order: int, algorithm: str) -> None:
    tz = choose_tensorization(rows, cols, order=order)
    module = KCP(tz, 3, algorithm=algorithm)
    with torch.no_grad():
        for factor in module.factors:
            factor.normal_()
    x = torch.randn(2, 5, cols)
    dense = x @ module.reconstruct().detach().T
    assert module.multiply(x).shape == (2, 5, rows)
    assert relative(module.multiply(x).detach(), dense) < 1e-5


@pytest.mark.parametrize("order", list(mode_orders(4)))
def test_every_mode_order_is_correct(order: tuple) -> None:
    tz = Tensorization(1024, 960, (4, 4, 4, 16), (4, 10, 6, 4))
    factors = [torch.randn(2, m, n) for m, n in zip(tz.out_modes, tz.in_modes)]
    contraction = Contraction(tz.in_modes, tz.out_modes, order)
    module = KCP(tz, 2, mode_order=list(order))
    with torch.no_grad():
        for param, value in zip(module.factors, factors):
            param.copy_(value)
    x = torch.randn(3, 960)
    assert relative(contraction.run(x, factors), x @ module.reconstruct().detach().T) < 1e-5


def test_large_batches_are_chunked_and_still_exact() -> None:
    tz = Tensorization(1024, 57600, (4, 4, 4, 16), (8, 20, 20, 18))
    module = KCP(tz, 8)
    with torch.no_grad():
        for factor in module.factors:
            factor.normal_()
        assert module._chunk_rows("rank_batch") < 40
        x = torch.randn(40, 57600)
        assert relative(module.multiply(x), x @ module.reconstruct().T) < 1e-5


def test_auto_algorithm_switches_to_per_rank_when_rank_batch_does_not_fit() -> None:
    tz = Tensorization(1024, 57600, (4, 4, 4, 16), (8, 20, 20, 18))
    assert KCP(tz, 8).algorithm_for(16) == "rank_batch"
    assert KCP(tz, 256).algorithm_for(16) == "per_rank"  # 256 ranks of 11,520 values: 12 MB per vector
    with pytest.raises(KCompressError, match="algorithm"):
        KCP(tz, 2, algorithm="fastest")


def test_parameter_counts_match_formula_and_storage() -> None:
    tz = Tensorization(256, 57600, (4, 4, 4, 4), (8, 20, 20, 18))
    assert KCP.param_count(tz, 1) == 264  # papers.md A.6: KCP per gate = 264·R
    folded = Tensorization(1024, 57600, (16, 4, 4, 4), (8, 20, 20, 18))
    assert KCP.param_count(folded, 5) == 360 * 5  # gates folded: 360·R
    module = KCP(folded, 5)
    assert module.num_params() == sum(p.numel() for p in module.parameters())


def test_macs_match_the_papers_ucf11_count() -> None:
    tz = Tensorization(256, 57600, (4, 4, 4, 4), (8, 20, 20, 18))
    assert kcp_step_costs(tz, (0, 1, 2, 3))[0] == 373_248  # papers.md A.3, R = 1, order 1234
    assert kcp_step_costs(tz, (1, 2, 3, 0))[0] == 287_744  # best order (2,3,4,1)
    assert KCP(tz, 1).macs_per_vector() <= 373_248


def test_error_does_not_increase_with_rank() -> None:
    weight = trained_like(256, 192)
    tz = choose_tensorization(256, 192, order=3)
    errors = [KCP.fit(weight, tz, rank, seed=0).fit_info.relative_error for rank in (1, 2, 4, 8, 16)]
    assert all(later <= earlier + 1e-6 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]


def test_error_curve_has_one_entry_per_als_iteration() -> None:
    fitted = KCP.fit(trained_like(128, 96), choose_tensorization(128, 96, order=3), 4, seed=0)
    assert len(fitted.fit_info.error_curve) == fitted.fit_info.iterations


def test_same_seed_same_random_start() -> None:
    weight = trained_like(96, 64)
    tz = choose_tensorization(96, 64, order=3)
    first, second = (KCP.fit(weight, tz, 3, seed=7, init="random") for _ in range(2))
    for a, b in zip(first.factors, second.factors):
        assert torch.equal(a, b)


def test_order_two_is_the_optimal_van_loan_pitsianis_fit() -> None:
    weight = trained_like(64, 48)
    tz = Tensorization(64, 48, (8, 8), (6, 8))
    closed_form = KCP.fit(weight, tz, 3).fit_info.relative_error
    singular = torch.linalg.svdvals(tz.rearrange(weight.double()))
    optimum = float(singular[3:].square().sum().sqrt() / singular.square().sum().sqrt())
    assert closed_form == pytest.approx(optimum, rel=1e-6)


def test_rank_rules() -> None:
    tz = Tensorization(256, 57600, (4, 4, 4, 4), (8, 20, 20, 18))
    assert KCP.max_rank(tz) == 256 * 57600 // 264
    assert KCP.clamp_rank(tz, 10**9) == KCP.max_rank(tz)
    rank = KCP.rank_for_ratio(tz, 1000)
    assert KCP.param_count(tz, rank) <= 256 * 57600 / 1000 < KCP.param_count(tz, rank + 1)
    with pytest.raises(KCompressError):
        KCP(tz, 0)
    with pytest.raises(KCompressError):
        KCP.rank_for_ratio(tz, 10**9)


def test_progress_reports_iterations_and_errors() -> None:
    seen = []
    KCP.fit(trained_like(64, 48), choose_tensorization(64, 48, order=3), 2, progress=lambda i, n, e: seen.append((i, n, e)))
    assert seen and all(0 <= error <= 1.0 + 1e-9 for _, _, error in seen)


def test_one_mode_and_bad_mode_orders_are_refused() -> None:
    with pytest.raises(KCompressError, match="at least 2 modes"):
        KCP(Tensorization(64, 48, (64,), (48,)), 2)
    with pytest.raises(KCompressError, match="not a permutation"):
        KCP(choose_tensorization(64, 48, order=3), 2, mode_order=[0, 0, 1])


def test_preconditioned_variables_rebuild_the_matrix_and_store_it_back() -> None:
    """``GramPreconditioned``: ``y_k = c_k L_k`` with ``L_k L_kᵀ`` the damped Hadamard product of the other factors'
    Grams (built here from the factors directly), the same matrix, and written back exactly."""
    from kcompress.formats.kcp import PRECONDITIONER_DAMPING, GramPreconditioned

    torch.manual_seed(5)
    tz = Tensorization(24, 16, (2, 3, 4), (2, 2, 4))
    module = KCP.fit(random_kcp_weight(tz, 3), tz, 3, max_iterations=3)
    variables = GramPreconditioned(module.factors, tz)
    columns = [factor.detach().reshape(3, -1).T for factor in module.factors]
    for k, y in enumerate(variables.variables):
        gram = torch.ones(3, 3, dtype=torch.float64)
        for j, column in enumerate(columns):
            gram = gram if j == k else gram * (column.T @ column)
        damped = gram + PRECONDITIONER_DAMPING * gram.diagonal().mean() * torch.eye(3, dtype=torch.float64)
        assert torch.allclose(y.detach(), columns[k] @ torch.linalg.cholesky(damped))
    assert relative(variables.reconstruct(), module.reconstruct()) < 1e-12
    with torch.no_grad():
        for y in variables.variables:
            y.add_(0.1 * torch.randn_like(y))
    variables.store(module.factors)
    assert relative(module.reconstruct(), variables.reconstruct()) < 1e-12


def test_preconditioned_refinement_lowers_the_output_error_faster() -> None:
    """Ten L-BFGS steps in the preconditioned variables reach a lower output error than ten on the raw factors."""
    from kcompress.formats import DataFitSettings, data_fit
    from kcompress.formats.base import Factorization

    generator = torch.Generator().manual_seed(6)
    tz = Tensorization(64, 64, (4, 4, 4), (4, 4, 4))
    weight = torch.randn(64, 64, generator=generator, dtype=torch.float64)
    inputs = torch.randn(500, 64, generator=generator, dtype=torch.float64) * torch.logspace(0, -1, 64)
    moment = inputs.T @ inputs / 500
    plain = KCP.fit(weight, tz, 20, max_iterations=2)
    settings = DataFitSettings(iterations=10, optimizer="lbfgs")
    errors = []
    for refine in (KCP._fit_to_data, Factorization._fit_to_data):
        module = KCP.fit(weight, tz, 20, max_iterations=2)
        refine(module, weight, moment, settings, 0, None, None)
        errors.append(data_fit.output_error(weight, module.reconstruct(), data_fit.ridged(moment, 1.0)))
    before = data_fit.output_error(weight, plain.reconstruct(), data_fit.ridged(moment, 1.0))
    assert errors[0] < errors[1] < before
