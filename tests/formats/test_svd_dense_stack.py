"""Truncated SVD (the baseline), the dense pass-through format, and stacked gate blocks."""

import pytest
import torch

from kcompress.formats import Dense, Stack, build, get_format
from tests.conftest import trained_like

SVD = get_format("svd")


def test_svd_is_optimal_below_full_rank() -> None:
    weight = trained_like(40, 30)
    tz = SVD.default_tensorization(40, 30)
    singular = torch.linalg.svdvals(weight.double())
    for rank in (1, 5, 10):
        expected = float(singular[rank:].square().sum().sqrt() / singular.square().sum().sqrt())
        assert SVD.fit(weight, tz, rank).fit_info.relative_error == pytest.approx(expected, rel=1e-5)


def test_svd_multiply_counts_and_rank_rules() -> None:
    tz = SVD.default_tensorization(40, 30)
    module = SVD.fit(trained_like(40, 30), tz, 7)
    assert module.num_params() == 7 * 70
    assert module.macs_per_vector() == 7 * 70
    assert SVD.clamp_rank(tz, 100) == 30
    assert SVD.param_count(tz, SVD.rank_for_ratio(tz, 4)) <= 40 * 30 / 4


def test_dense_format_is_exact_and_stack_concatenates_rows() -> None:
    gates = [trained_like(8, 6, seed=s) for s in range(4)]
    parts = [Dense.fit(g, Dense.default_tensorization(8, 6), 1) for g in gates]
    stack = Stack(parts)
    x = torch.randn(5, 6)
    assert torch.allclose(stack.multiply(x), x @ torch.cat(gates).T, atol=1e-6)
    assert torch.equal(stack.reconstruct(), torch.cat(gates))
    assert stack.num_params() == 4 * 48 and stack.macs_per_vector() == 4 * 48
    assert stack.fit_info.relative_error == 0.0
    rebuilt = build(stack.config())
    rebuilt.load_state_dict(stack.state_dict())
    assert torch.equal(rebuilt.multiply(x), stack.multiply(x))


def test_stack_error_combines_parts_by_norm() -> None:
    gates = [trained_like(16, 12, seed=s) for s in range(3)]
    parts = [SVD.fit(g, SVD.default_tensorization(16, 12), 2) for g in gates]
    stacked = torch.cat(gates).double()
    expected = float((Stack(parts).reconstruct().double() - stacked).norm() / stacked.norm())
    assert Stack(parts).fit_info.relative_error == pytest.approx(expected, rel=1e-6)
