"""ADTN format: decode against an explicit Kronecker construction, counts, fitting, gradients and the cache."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kcompress.errors import KCompressError
from kcompress.formats import build, get_format
from kcompress.formats.adtn import ADTN, binary_tensorization, gate_pairs
from kcompress.formats.adtn_fit import PROGRESS_EVERY, WINDOW_BITS, applied_size
from kcompress.formats.tensorize import Tensorization

#: expected gate placements for Q = 5 (first index of each pair, in the order the gates act)
PLACEMENT_Q5 = {"brick": [0, 2, 1, 3], "stair": [0, 1, 2, 3]}
NUMPY_ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0.0),
    "leaky_relu": lambda x: np.where(x > 0, x, 0.01 * x),
    "tanh": np.tanh,
    "identity": lambda x: x,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make(rows: int, cols: int, depth: int, **options) -> ADTN:
    """An unfitted float64 ADTN with its default (binary) tensorization."""
    return ADTN(ADTN.default_tensorization(rows, cols), depth, **options).double()


def make_from(tensorization: Tensorization) -> ADTN:
    """An unfitted depth-1 ADTN with the given modes."""
    return ADTN(tensorization, 1)


def randomize(module: ADTN, seed: int) -> None:
    """Generic (far from identity) gates and scale."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.gates.copy_(torch.randn(module.gates.shape, generator=generator, dtype=torch.float64) * 0.7)
        module.scale.fill_(1.7)


def trained_like(rows: int, cols: int, seed: int = 1) -> torch.Tensor:
    """A matrix with geometrically decaying singular values (0.7^k), like a trained layer's."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=generator, dtype=torch.float64))
    k = min(rows, cols)
    return (u[:, :k] * 0.7 ** torch.arange(k, dtype=torch.float64)) @ v[:, :k].T


def naive_decode(module: ADTN) -> np.ndarray:
    """scale · 𝓛^(M) σ(… 𝓛^(1) e_0) with each 𝓛^(m) built as a 2^Q x 2^Q product of kron(I, G, I)."""
    q_total = module.qubits
    gates = module.gates.detach().numpy()
    activation = NUMPY_ACTIVATIONS[module.options.activation]
    state = np.zeros(2**q_total)
    state[0] = 1.0
    for m in range(module.rank):
        if m > 0:
            state = activation(state)
        layer = np.eye(2**q_total)
        for gate, q in zip(gates[m], gate_pairs(q_total, module.options.placement)):
            operator = np.kron(np.kron(np.eye(2**q), gate.reshape(4, 4)), np.eye(2 ** (q_total - q - 2)))
            layer = operator @ layer
        state = layer @ state
    padded = float(module.scale.detach()) * state.reshape(2**module.out_bits, 2**module.in_bits)
    return padded[: module.tensorization.out_features, : module.tensorization.in_features]


# ---------------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("placement", ["brick", "stair"])
def test_gate_placement(placement: str) -> None:
    assert gate_pairs(5, placement) == PLACEMENT_Q5[placement]
    for q_total in range(2, 9):
        assert len(gate_pairs(q_total, placement)) == q_total - 1


@pytest.mark.parametrize("placement", ["brick", "stair"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "leaky_relu", "identity"])
@pytest.mark.parametrize("shape", [(4, 8), (3, 5), (2, 2)])
def test_decode_equals_kronecker_construction(placement: str, activation: str, shape: tuple[int, int]) -> None:
    module = make(*shape, 3, placement=placement, activation=activation)
    randomize(module, seed=sum(shape))
    np.testing.assert_allclose(module.reconstruct().detach().numpy(), naive_decode(module), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "shape, bits",
    [
        ((16, 16), (4, 4)),
        ((10, 64), (4, 6)),
        ((64, 10), (6, 4)),
        ((1, 1), (1, 1)),
        ((1, 3), (0, 2)),
        ((40, 17), (6, 5)),
    ],
)
def test_binary_tensorization_is_minimal(shape: tuple[int, int], bits: tuple[int, int]) -> None:
    tz = binary_tensorization(*shape)
    assert (tz.padded_out, tz.padded_in) == (2 ** bits[0], 2 ** bits[1])
    assert set(tz.out_modes + tz.in_modes) <= {1, 2}
    assert ADTN.qubits_of(tz) == sum(bits)


def test_default_tensorization_ignores_order_and_group_but_keeps_explicit_modes() -> None:
    fused = ADTN.default_tensorization(4 * 12, 20, order=3, out_group=4)  # an LSTM's 4H x N, one ADTN
    assert (fused.padded_out, fused.padded_in) == (64, 32)
    explicit = ADTN.default_tensorization(16, 16, out_modes=(4, 4), in_modes=(4, 4))
    assert make_from(explicit).qubits == 8
    with pytest.raises(KCompressError, match="powers of two"):
        make_from(ADTN.default_tensorization(12, 16, out_modes=(3, 4), in_modes=(4, 4)))


@pytest.mark.parametrize("shape, depth", [((16, 16), 1), ((10, 64), 3), ((64, 48), 2), ((1, 1), 4)])
def test_param_count_matches_storage(shape: tuple[int, int], depth: int) -> None:
    module = make(*shape, depth)
    stored = sum(p.numel() for p in module.parameters())
    assert module.num_params() == stored == 16 * depth * (module.qubits - 1) + 1
    assert sum(v.numel() for v in module.state_dict().values()) == stored


def test_max_rank_bounds() -> None:
    small = binary_tensorization(16, 16)
    assert ADTN.param_count(small, ADTN.max_rank(small)) <= 16 * 16
    assert ADTN.param_count(small, ADTN.max_rank(small) + 1) > 16 * 16
    assert ADTN.max_rank(binary_tensorization(1024, 1024)) == 64
    assert ADTN.max_rank(binary_tensorization(1, 2)) == 1


def test_decode_macs_counts_the_gate_products() -> None:
    module = make(16, 32, 3)
    with FlopCounterMode(display=False) as counter:
        module.reconstruct()
    gate_macs = counter.get_total_flops() // 2
    windows = module.layout  # gates merged into windows of at most WINDOW_BITS indices
    assert sum(w.count for w in windows) == module.qubits - 1 and max(w.bits for w in windows) <= WINDOW_BITS
    applied = [2**w.bits * (2 if w.low + w.bits == module.qubits - 1 else 1) for w in windows]  # one widened
    assert applied == [applied_size(w, module.qubits) for w in windows] and applied.count(32) == 1
    assert gate_macs == 3 * sum(2**module.qubits * a + w.count * 4 * 4**w.bits for a, w in zip(applied, windows))
    assert module.decode_macs() == gate_macs + 2**module.qubits
    assert module.macs_per_vector() == 16 * 32


def test_options_are_checked() -> None:
    with pytest.raises(KCompressError, match="activation"):
        make(4, 4, 1, activation="gelu")
    with pytest.raises(KCompressError, match="placement"):
        make(4, 4, 1, placement="ladder")
    with pytest.raises(KCompressError, match="unknown adtn options"):
        make(4, 4, 1, step=10)


# ---------------------------------------------------------------------------------------- multiply and cache
@pytest.mark.parametrize("training", [False, True])
def test_multiply_equals_reconstruct_product(training: bool) -> None:
    module = make(10, 12, 2)
    randomize(module, seed=3)
    module.train(training)
    x = torch.randn(2, 3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = x @ module.reconstruct().detach().T
    torch.testing.assert_close(module.multiply(x), expected)
    torch.testing.assert_close(module(x), expected)
    assert module.multiply(x).shape == (2, 3, 10)


@pytest.mark.parametrize("placement", ["brick", "stair"])
def test_gradients_reach_every_gate(placement: str) -> None:
    module = make(8, 16, 3, placement=placement).train()
    x = torch.randn(5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    module.multiply(x).square().sum().backward()
    per_gate = module.gates.grad.reshape(module.rank, module.qubits - 1, 16).norm(dim=-1)
    assert (per_gate > 0).all()
    assert module.scale.grad is not None and module.scale.grad != 0


def test_eval_multiply_uses_cache_without_autograd() -> None:
    module = make(8, 8, 2).eval()
    x = torch.randn(4, 8, dtype=torch.float64)
    y = module.multiply(x)
    assert not y.requires_grad
    assert module._cached_weight() is module._cached_weight()
    module.options = dataclasses.replace(module.options, decode_every_forward=True)
    assert module.multiply(x).requires_grad


def test_cache_invalidated_when_parameters_change() -> None:
    module = make(8, 16, 2).eval()
    randomize(module, seed=5)
    x = torch.randn(3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    before = module.multiply(x)
    with torch.no_grad():
        module.gates[1, 2] += 0.3  # in-place edit
    after_edit = module.multiply(x)
    assert not torch.allclose(before, after_edit)
    torch.testing.assert_close(after_edit, x @ module.reconstruct().detach().T)

    other = make(8, 16, 2)
    randomize(other, seed=6)
    module.load_state_dict(other.state_dict())
    torch.testing.assert_close(module.multiply(x), x @ other.reconstruct().detach().T)

    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    module.train()
    module.multiply(x).sum().backward()
    optimizer.step()
    module.eval()
    torch.testing.assert_close(module.multiply(x), x @ module.reconstruct().detach().T)

    module.float()
    assert module.multiply(x.float()).dtype == torch.float32


# ---------------------------------------------------------------------------------------- fitting
def test_fit_improves_with_depth() -> None:
    weight = trained_like(16, 16)
    tz = ADTN.default_tensorization(16, 16)
    errors = [ADTN.fit(weight, tz, depth, steps=200).fit_info.relative_error for depth in (1, 2, 4)]
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 0.5 * errors[0]


def test_fit_reports_progress_and_curve() -> None:
    events: list[tuple[int, int, float]] = []
    tz = binary_tensorization(8, 8)
    module = ADTN.fit(trained_like(8, 8), tz, 2, steps=25, plateau=0.0,
                      progress=lambda *event: events.append(event))
    assert PROGRESS_EVERY == 10 and [e[0] for e in events] == [1, 10, 20, 25]  # and after the last
    assert all(total == 25 for _, total, _ in events)
    info = module.fit_info
    assert info.iterations == 25
    assert info.error_curve == [e[2] for e in events]
    assert info.error_curve[-1] < info.error_curve[0]
    assert info.relative_error == pytest.approx(info.error_curve[-1], rel=1e-5)  # the fit runs in float32


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_fit_stops_on_a_plateau(optimizer: str) -> None:
    weight = trained_like(8, 8)
    tz = binary_tensorization(8, 8)
    stopped = ADTN.fit(weight, tz, 1, steps=2000, optimizer=optimizer, patience=5, plateau=0.5).fit_info
    assert stopped.iterations < 2000
    full = ADTN.fit(weight, tz, 1, steps=60, optimizer=optimizer, plateau=0.0).fit_info
    assert full.iterations == 60 and full.relative_error < 1.0


def test_fit_stops_at_tolerance_and_handles_zero() -> None:
    weight = trained_like(4, 4)
    assert ADTN.fit(weight, binary_tensorization(4, 4), 1, steps=500, tol=0.99).fit_info.iterations < 500
    zero = ADTN.fit(torch.zeros(4, 4), binary_tensorization(4, 4), 1)
    assert zero.fit_info.relative_error == 0.0
    assert torch.count_nonzero(zero.reconstruct()) == 0


def test_fit_is_seeded_and_keeps_dtype() -> None:
    weight = trained_like(8, 16).float()
    tz = ADTN.default_tensorization(8, 16)
    first, second = (ADTN.fit(weight, tz, 2, seed=7, steps=60) for _ in range(2))
    other = ADTN.fit(weight, tz, 2, seed=8, steps=60)
    assert torch.equal(first.gates, second.gates) and torch.equal(first.scale, second.scale)
    assert not torch.equal(first.gates, other.gates)
    assert first.gates.dtype == torch.float32


def test_fit_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ADTN.fit(trained_like(4, 4), binary_tensorization(4, 4), 1, steps=5)
    assert torch.equal(torch.rand(3), expected)


def test_registered_and_rebuilt_from_config() -> None:
    assert get_format("adtn") is ADTN
    module = ADTN.fit(trained_like(6, 10), ADTN.default_tensorization(6, 10), 2, steps=30, placement="stair")
    rebuilt = build(module.config()).double()
    rebuilt.load_state_dict(module.state_dict())
    x = torch.randn(2, 10, dtype=torch.float64)
    torch.testing.assert_close(rebuilt.eval().multiply(x), module.eval().multiply(x))
    assert rebuilt.options.placement == "stair"
    weight = trained_like(6, 10)
    explicit = float((module.reconstruct().detach() - weight).norm() / weight.norm())
    assert math.isclose(module.fit_info.relative_error, explicit, rel_tol=1e-9)
