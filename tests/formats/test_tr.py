"""TR: exact recovery, TT as the ring with a closing bond of 1, multiplication and reconstruction against
independent dense computations, counts, rank rules, ALS behaviour, data-aware refinement."""

import math

import pytest
import torch
from tensorly.tr_tensor import tr_to_tensor

from kcompress import compress
from kcompress.errors import KCompressError
from kcompress.formats import TR, TT, DataFitSettings, output_error
from kcompress.formats.network_refine import EnvironmentPreconditioned
from kcompress.formats.tensorize import Tensorization, choose_tensorization
from kcompress.io.artifact import load, save_artifact
from kcompress.io.models import SequenceClassifier
from tests.conftest import trained_like

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def with_random_cores(tz: Tensorization, rank: object, seed: int = 0) -> TR:
    """A float64 ring with Gaussian cores."""
    generator = torch.Generator().manual_seed(seed)
    module = TR(tz, rank).double()
    with torch.no_grad():
        for core in module.cores:
            core.copy_(torch.randn(core.shape, generator=generator, dtype=torch.float64))
    return module


def tensorly_dense(module: TR) -> torch.Tensor:
    """The merged ``(m_1 n_1, …, m_d n_d)`` tensor of the ring by TensorLy's ``tr_to_tensor`` (independent code)."""
    cores = [core.detach().reshape(core.shape[0], -1, core.shape[-1]).numpy() for core in module.cores]
    return torch.from_numpy(tr_to_tensor(cores))


def correlated_moment(size: int, seed: int = 0) -> torch.Tensor:
    """``E[x xᵀ]`` of inputs with a fast-decaying spectrum in random directions (the data matters to the fit)."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return (basis * 0.7 ** torch.arange(size, dtype=torch.float64)) @ basis.T


EXACT = [
    (Tensorization(64, 48, (8, 8), (6, 8)), [3, 4]),
    (Tensorization(64, 48, (4, 4, 4), (3, 4, 4)), [2, 3, 4]),
    (Tensorization(64, 48, (4, 4, 4), (3, 4, 4)), 3),
    (Tensorization(64, 48, (2, 4, 2, 4), (2, 3, 2, 4)), [2, 3, 2, 3]),
]


@pytest.mark.parametrize("tz, rank", EXACT, ids=["d2", "d3", "d3-uniform", "d4"])
def test_exact_ring_is_recovered(tz: Tensorization, rank: object) -> None:
    weight = with_random_cores(tz, rank).reconstruct().detach()
    fitted = TR.fit(weight, tz, rank, max_sweeps=100, min_sweep_gain=1e-12)
    assert fitted.fit_info.relative_error < 1e-6
    assert relative(fitted.reconstruct(), weight) < 1e-6


def test_reconstruct_matches_tensorly() -> None:
    tz = Tensorization(60, 48, (3, 4, 5), (4, 3, 4))
    module = with_random_cores(tz, [2, 3, 4])
    assert relative(tz.rearrange(module.reconstruct()), tensorly_dense(module)) < 1e-12


def test_a_closing_bond_of_one_is_the_tensor_train() -> None:
    tz = Tensorization(300, 200, (3, 4, 5, 5), (2, 4, 5, 5))
    ring = with_random_cores(tz, [1, 2, 5, 3])
    train = TT(tz, [2, 5, 3]).double()
    with torch.no_grad():
        for target, core in zip(train.cores, ring.cores):
            target.copy_(core)
    assert relative(ring.reconstruct(), train.reconstruct()) < 1e-12
    x = torch.randn(7, 200, dtype=torch.float64)
    assert relative(ring.multiply(x), train.multiply(x)) < 1e-12
    assert TR.param_count(tz, [1, 2, 5, 3]) == TT.param_count(tz, [2, 5, 3])
    assert TR.macs(tz, [1, 2, 5, 3]) == TT.macs(tz, [2, 5, 3])
    weight = trained_like(300, 200)
    for init in ("tr_svd", "tt_svd"):  # TR-SVD with r_0 = 1 is TT-SVD; no sweeps: the starts themselves
        start = TR.fit(weight, tz, [1, 2, 5, 3], init=init, max_sweeps=0)
        assert relative(start.reconstruct(), TT.fit(weight, tz, [2, 5, 3], max_sweeps=0).reconstruct()) < 1e-6


SHAPES = [(64, 48, 2, 3), (4 * 131, 97, 3, 4), (97, 61, 3, [2, 5, 3]), (300, 200, 4, [2, 3, 1, 4])]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("rows, cols, order, rank", SHAPES)
def test_multiply_equals_dense_product(rows: int, cols: int, order: int, rank: object, monkeypatch) -> None:
    tz = choose_tensorization(rows, cols, order=order)
    module = with_random_cores(tz, rank).float()
    x = torch.randn(2, 3, cols)
    expected = x @ module.reconstruct().T
    assert relative(module.multiply(x), expected) < 1e-5
    traced = torch.jit.trace(module.eval(), (x.reshape(6, cols),))
    assert relative(traced(x.reshape(6, cols)), expected.reshape(6, rows)) < 1e-5
    monkeypatch.setattr("kcompress.formats.rows.CHUNK_BYTES", 1)  # one row per chunk: the same result
    assert relative(module.multiply(x), expected) < 1e-5


def test_parameter_and_mac_counts() -> None:
    tz = Tensorization(300, 200, (3, 4, 5, 5), (2, 4, 5, 5))
    for rank in (3, [2, 7, 4, 5]):
        module = TR(tz, rank)
        r = module.rank + module.rank[:1]
        formula = sum(r[k] * m * n * r[k + 1] for k, (m, n) in enumerate(zip(tz.out_modes, tz.in_modes)))
        assert module.num_params() == TR.param_count(tz, rank) == formula == sum(p.numel() for p in module.parameters())
    folded = Tensorization(1024, 57600, (16, 4, 4, 4), (8, 20, 20, 18))  # the KCP paper's shape, gates folded
    assert TR.param_count(folded, 4) == 16 * (16 * 8 + 4 * 20 + 4 * 20 + 4 * 18) == 5760
    m, n = folded.out_modes, folded.in_modes
    bonds = [4 * 4, 4 * 4 * 4, 4 * 4 * 4, 4 * 4]  # bond sizes a core's step multiplies: 2 at the ends, 3 between
    left_to_right = sum(math.prod(m[:k]) * n[k] * m[k] * bonds[k] * math.prod(n[k + 1 :]) for k in range(4))
    assert TR.macs(folded, 4) <= left_to_right  # the planned order is at least as cheap as the natural one


def test_rank_rules_and_options() -> None:
    tz = Tensorization(64, 64, (2, 4, 8), (2, 4, 8))
    assert TR.normalize_rank(tz, 3) == [3, 3, 3]
    assert TR.max_rank(tz) == TT.max_rank(tz)
    assert TR.clamp_rank(tz, [1, 100, 100]) == [1, 4, 64]  # a bond cannot use more than its core's other axes
    rank = TR.rank_for_ratio(tz, 8)
    assert TR.param_count(tz, rank) <= 64 * 64 / 8 < TR.param_count(tz, rank + 1)
    for bad in (0, [3, 3], [3, 0, 3], 2.5, True, [3, "4", 3]):
        with pytest.raises(KCompressError) as error:
            TR(tz, bad)
        assert "\n" not in str(error.value)
    with pytest.raises(KCompressError, match="at least 2 modes"):
        TR(Tensorization(64, 48, (64,), (48,)), 2)
    for options in ({"init": "random"}, {"max_sweeps": -1}, {"min_sweep_gain": "small"}):
        with pytest.raises(KCompressError, match="option"):
            TR(tz, 2, **options)


def test_sweeps_never_increase_the_error_and_both_starts_are_tried() -> None:
    weight = trained_like(256, 192, seed=1)
    tz = choose_tensorization(256, 192, order=3)
    seen = []
    fitted = TR.fit(weight, tz, 3, max_sweeps=6, min_sweep_gain=0.0, progress=lambda i, n, e: seen.append((i, n, e)))
    curve = fitted.fit_info.error_curve
    assert all(later <= earlier for earlier, later in zip(curve, curve[1:])), curve
    assert curve[-1] < curve[0] and [e for _, _, e in seen] == curve and seen[0][:2] == (0, 6)
    assert fitted.fit_info.relative_error == pytest.approx(curve[-1], rel=1e-6)
    each = [TR.fit(weight, tz, 3, max_sweeps=6, min_sweep_gain=0.0, init=init).fit_info.relative_error
            for init in ("tr_svd", "tt_svd")]
    assert fitted.fit_info.relative_error == pytest.approx(min(each), rel=1e-9)


def test_data_aware_refinement_in_preconditioned_variables() -> None:
    weight = trained_like(64, 48)
    moment = correlated_moment(48)
    tz = choose_tensorization(64, 48, order=3)
    module = TR.fit(weight, tz, 3)
    stacked = [core.unsqueeze(0) for core in module.cores]
    variables = EnvironmentPreconditioned(TR.layout(3), stacked, tz)  # a change of variables: the same matrix
    assert relative(variables.reconstruct(), module.reconstruct()) < 1e-5
    info = module.fit_to_data(weight, moment, moment, DataFitSettings(iterations=40))
    assert info.kept and info.after < 0.9 * info.before and info.method == "auto"
    assert output_error(weight, module.reconstruct(), moment) == pytest.approx(info.after, rel=1e-5)


def test_compressed_model_round_trips_through_an_artifact(tmp_path) -> None:
    model = SequenceClassifier(12, 16, 4)
    compressed, report = compress(model, format="tr", rank=[1, 2, 3], check_speed=False, execution="factorized")
    loaded = load(save_artifact(compressed, report, tmp_path / "model.safetensors"))
    x = torch.randn(3, 7, 12)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), compressed.eval()(x))
