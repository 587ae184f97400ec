"""Mode shapes, padding and the (m_k·n_k) rearrangement."""

import math

import numpy as np
import pytest
import torch

from kcompress.errors import KCompressError
from kcompress.formats.tensorize import Tensorization, balanced_factors, choose_tensorization, factor_dimension


@pytest.mark.parametrize("n, order", [(1024, 3), (57600, 4), (512, 4), (768, 3), (12, 2), (97, 2), (4 * 131, 3)])
def test_factorization_covers_dimension_with_little_padding(n: int, order: int) -> None:
    modes = factor_dimension(n, order)
    assert len(modes) == order
    assert n <= math.prod(modes) <= n * 1.25


def test_balanced_factors_prefers_balance() -> None:
    assert balanced_factors(1024, 3) == (8, 8, 16)
    assert balanced_factors(57600, 4) == (15, 15, 16, 16)


def test_badly_factoring_sizes_are_padded() -> None:
    assert math.prod(factor_dimension(4 * 131, 3)) > 4 * 131  # 2·2·131 is far from balanced
    assert math.prod(factor_dimension(1031, 3)) > 1031  # a prime
    assert factor_dimension(512, 3) == (8, 8, 8)  # good sizes are never padded


def test_gate_axis_folds_into_first_output_mode() -> None:
    tz = choose_tensorization(4 * 256, 57600, order=4, out_group=4)
    assert tz.out_modes == (16, 4, 4, 4)
    assert tz.padding == (0, 0)


def test_explicit_modes_are_used_and_checked() -> None:
    tz = choose_tensorization(1024, 57600, out_modes=(4, 4, 4, 16), in_modes=(8, 20, 20, 18))
    assert tz.merged_modes == (32, 80, 80, 288)
    with pytest.raises(KCompressError, match="do not cover"):
        Tensorization(1024, 57600, (4, 4, 4, 8), (8, 20, 20, 18))
    with pytest.raises(KCompressError, match="same length"):
        Tensorization(16, 16, (4, 4), (2, 2, 4))


def test_rearrangement_turns_kronecker_products_into_rank_one_tensors() -> None:
    tz = Tensorization(6, 20, (2, 3), (4, 5))
    a, b = torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    rearranged = tz.rearrange(torch.kron(a, b))
    expected = torch.einsum("i,j->ij", a.reshape(-1), b.reshape(-1))
    assert torch.allclose(rearranged, expected)
    assert torch.equal(tz.unrearrange(rearranged), torch.kron(a, b))


def test_padding_round_trip() -> None:
    tz = choose_tensorization(97, 61, order=2)
    weight = torch.randn(97, 61)
    padded = tz.pad_weight(weight)
    assert padded.shape == (tz.padded_out, tz.padded_in)
    assert torch.equal(tz.crop_weight(padded), weight)
    x = torch.randn(3, 61)
    y = tz.crop_output(tz.pad_input(x) @ padded.T)
    assert torch.allclose(y, x @ weight.T, atol=1e-5)
    assert "pad" in tz.describe()


def test_dict_round_trip() -> None:
    tz = choose_tensorization(300, 200, order=3)
    assert Tensorization.from_dict(tz.to_dict()) == tz
    np.testing.assert_equal(tz.to_dict()["out_modes"], list(tz.out_modes))
