"""BT: KCP as BT with Tucker ranks 1, exact recovery, multiplication and reconstruction against independent dense
computations, counts (the BT-RNN setting), rank rules, ALS behaviour, data-aware refinement."""

import pytest
import torch
from tensorly.tucker_tensor import tucker_to_tensor

from kcompress import compress
from kcompress.errors import KCompressError
from kcompress.formats import BT, KCP, DataFitSettings, output_error
from kcompress.formats.bt import DEFAULT_TUCKER_RANK
from kcompress.formats.network_refine import EnvironmentPreconditioned
from kcompress.formats.tensorize import Tensorization, choose_tensorization
from kcompress.io.artifact import load, save_artifact
from kcompress.io.models import SequenceClassifier
from tests.conftest import trained_like
from tests.formats.test_tr import correlated_moment, relative

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def with_random_nodes(tz: Tensorization, rank: object, seed: int = 0) -> BT:
    """A float64 BT with Gaussian cores and factors."""
    generator = torch.Generator().manual_seed(seed)
    module = BT(tz, rank).double()
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64))
    return module


def tensorly_dense(module: BT) -> torch.Tensor:
    """The merged ``(m_1 n_1, …, m_d n_d)`` tensor: Σ_b TensorLy's ``tucker_to_tensor`` of each block."""
    total = 0
    for b in range(module.rank[0]):
        factors = [factor[b].detach().reshape(-1, factor.shape[-1]).numpy() for factor in module.factors]
        total = total + tucker_to_tensor((module.cores[b].detach().numpy(), factors))
    return torch.from_numpy(total)


def test_tucker_ranks_one_are_kcp_with_as_many_terms() -> None:
    tz = Tensorization(300, 200, (3, 4, 5, 5), (2, 4, 5, 5))
    kcp = KCP(tz, 6).double()
    with torch.no_grad():
        for factor in kcp.factors:
            factor.normal_()
    bt = BT(tz, [6, 1]).double()
    with torch.no_grad():
        for target, factor in zip(bt.factors, kcp.factors):
            target.copy_(factor[..., None])
    assert not hasattr(bt, "cores") and BT.param_count(tz, [6, 1]) == KCP.param_count(tz, 6) == bt.num_params()
    assert sum(p.numel() for p in bt.parameters()) == sum(p.numel() for p in kcp.parameters())
    assert BT.macs(tz, [6, 1]) == KCP.macs(tz, 6)
    assert relative(bt.reconstruct(), kcp.reconstruct()) < 1e-12
    x = torch.randn(5, 200, dtype=torch.float64)
    assert relative(bt.multiply(x), kcp.multiply(x)) < 1e-12


def test_fits_start_from_kcp_and_never_end_worse() -> None:
    weight = trained_like(96, 64)
    tz = choose_tensorization(96, 64, order=3)
    kcp = KCP.fit(weight, tz, 5, seed=3)
    start = BT.fit(weight, tz, [5, 1], init="kcp", max_sweeps=0, seed=3)  # the KCP fit, as BT
    assert relative(start.reconstruct(), kcp.reconstruct()) < 1e-6
    assert start.fit_info.relative_error == pytest.approx(kcp.fit_info.relative_error, rel=1e-6)
    for rank in ([5, 1], [5, 2], [5, 2, 3, 2]):
        fitted = BT.fit(weight, tz, rank, seed=3)
        assert fitted.fit_info.relative_error <= kcp.fit_info.relative_error + 1e-9
    assert BT.fit(weight, tz, [5, 2], seed=3).fit_info.relative_error < kcp.fit_info.relative_error - 1e-3


EXACT = [
    (Tensorization(64, 48, (8, 8), (6, 8)), [2, 3]),
    (Tensorization(64, 48, (4, 4, 4), (3, 4, 4)), [3, 2, 3, 2]),
    (Tensorization(64, 48, (4, 4, 4), (3, 4, 4)), [3, 1]),
    (Tensorization(64, 48, (2, 4, 2, 4), (2, 3, 2, 4)), [2, 2]),
]


@pytest.mark.parametrize("tz, rank", EXACT, ids=["d2", "d3", "d3-kcp", "d4"])
def test_exact_block_terms_are_recovered(tz: Tensorization, rank: list[int]) -> None:
    weight = with_random_nodes(tz, rank).reconstruct().detach()
    fitted = BT.fit(weight, tz, rank, max_sweeps=100, min_sweep_gain=1e-12)
    assert fitted.fit_info.relative_error < 1e-6
    assert relative(fitted.reconstruct(), weight) < 1e-6


def test_reconstruct_matches_tensorly() -> None:
    tz = Tensorization(60, 48, (3, 4, 5), (4, 3, 4))
    module = with_random_nodes(tz, [3, 2, 3, 2])
    assert relative(tz.rearrange(module.reconstruct()), tensorly_dense(module)) < 1e-12


SHAPES = [(64, 48, 2, 3), (4 * 131, 97, 3, 4), (97, 61, 3, [3, 2, 1, 3]), (300, 200, 4, [2, 1])]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("rows, cols, order, rank", SHAPES)
def test_multiply_equals_dense_product(rows: int, cols: int, order: int, rank: object, monkeypatch) -> None:
    tz = choose_tensorization(rows, cols, order=order)
    module = with_random_nodes(tz, rank).float()
    x = torch.randn(2, 3, cols)
    expected = x @ module.reconstruct().T
    assert relative(module.multiply(x), expected) < 1e-5
    traced = torch.jit.trace(module.eval(), (x.reshape(6, cols),))
    assert relative(traced(x.reshape(6, cols)), expected.reshape(6, rows)) < 1e-5
    monkeypatch.setattr("kcompress.formats.rows.CHUNK_BYTES", 1)  # one row per chunk: the same result
    assert relative(module.multiply(x), expected) < 1e-5


def test_parameter_counts_and_the_bt_rnn_setting() -> None:
    tz = Tensorization(300, 200, (3, 4, 5, 5), (2, 4, 5, 5))
    for rank, (blocks, *tucker) in ((4, [4] + [DEFAULT_TUCKER_RANK] * 4), ([3, 2, 3, 1, 2], [3, 2, 3, 1, 2])):
        module = BT(tz, rank)
        core = 1
        for r in tucker:
            core *= r
        formula = blocks * (sum(m * n * r for m, n, r in zip(tz.out_modes, tz.in_modes, tucker)) + core)
        assert module.num_params() == BT.param_count(tz, rank) == formula == sum(p.numel() for p in module.parameters())
    folded = Tensorization(1024, 57600, (16, 4, 4, 4), (8, 20, 20, 18))  # the KCP paper's shape, gates folded
    assert BT.param_count(folded, [2, 4]) == 2 * (4 * 360 + 4**4) == 3392
    assert int(1024 * 57600 / 3392) == 17388  # BT-RNN's abstract: "17,388 times fewer parameters"


def test_rank_rules_and_options() -> None:
    tz = Tensorization(64, 64, (2, 4, 8), (2, 4, 8))  # merged modes 4, 16, 64
    assert BT.normalize_rank(tz, 3) == [3] + [DEFAULT_TUCKER_RANK] * 3
    assert BT.normalize_rank(tz, [3, 4]) == [3, 4, 4, 4] and BT.normalize_rank(tz, (3, 1, 2, 3)) == [3, 1, 2, 3]
    # Tucker ranks to the mode sizes and to the product of the others (9 > 4·2);
    # blocks to 64·64 // (4·4 + 16·2 + 64·8 + 4·2·8)
    assert BT.clamp_rank(tz, [10**6, 8, 2, 9]) == [6, 4, 2, 8]
    assert BT.param_count(tz, BT.max_rank(tz)) <= 64 * 64 < BT.param_count(tz, BT.max_rank(tz) + 1)
    rank = BT.rank_for_ratio(tz, 8)
    assert BT.param_count(tz, rank) <= 64 * 64 / 8 < BT.param_count(tz, rank + 1)
    for bad in (0, [3], [3, 2, 2], [3, 0], 2.5, True, [3, "4"]):
        with pytest.raises(KCompressError) as error:
            BT(tz, bad)
        assert "\n" not in str(error.value)
    with pytest.raises(KCompressError, match="at least 2 modes"):
        BT(Tensorization(64, 48, (64,), (48,)), 2)
    for options in ({"init": "tr_svd"}, {"max_sweeps": -1}, {"start_iterations": 0}):
        with pytest.raises(KCompressError, match="option"):
            BT(tz, 2, **options)


def test_tucker_ranks_above_what_they_can_use_are_exact_and_zero_padded() -> None:
    tz = Tensorization(16, 16, (2, 2, 4), (2, 2, 4))  # merged modes 4, 4, 16
    weight = trained_like(16, 16)
    fitted = BT.fit(weight, tz, [1, 20, 20, 20], max_sweeps=3)  # one Tucker block of ranks (4, 4, 16) is exact
    assert fitted.fit_info.relative_error < 1e-6
    assert fitted.factors[0].shape == (1, 2, 2, 20) and not fitted.factors[0][..., 4:].any()


def test_sweeps_never_increase_the_error() -> None:
    weight = trained_like(256, 192, seed=1)
    tz = choose_tensorization(256, 192, order=3)
    seen = []
    fitted = BT.fit(weight, tz, [4, 2], max_sweeps=6, min_sweep_gain=0.0, progress=lambda i, n, e: seen.append(e))
    curve = fitted.fit_info.error_curve
    assert all(later <= earlier for earlier, later in zip(curve, curve[1:])), curve
    assert curve[-1] < curve[0] and seen == curve
    assert fitted.fit_info.relative_error == pytest.approx(curve[-1], rel=1e-6)


def test_data_aware_refinement_in_preconditioned_variables() -> None:
    weight = trained_like(64, 48)
    moment = correlated_moment(48)
    tz = choose_tensorization(64, 48, order=3)
    module = BT.fit(weight, tz, [3, 2])
    variables = EnvironmentPreconditioned(module.layout, module.block_nodes(), tz)  # the same matrix
    assert relative(variables.reconstruct(), module.reconstruct()) < 1e-5
    info = module.fit_to_data(weight, moment, moment, DataFitSettings(iterations=40))
    assert info.kept and info.after < 0.9 * info.before and info.method == "auto"
    assert output_error(weight, module.reconstruct(), moment) == pytest.approx(info.after, rel=1e-5)


def test_compressed_model_round_trips_through_an_artifact(tmp_path) -> None:
    model = SequenceClassifier(12, 16, 4)
    compressed, report = compress(model, format="bt", rank=[3, 2], check_speed=False, execution="factorized")
    loaded = load(save_artifact(compressed, report, tmp_path / "model.safetensors"))
    x = torch.randn(3, 7, 12)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), compressed.eval()(x))
