"""The compressed layers against torch's dense modules: at full rank they are the same function."""

from __future__ import annotations

import itertools
from typing import Any, Callable, Optional

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from kcompress import formats
from kcompress.errors import KCompressError
from kcompress.formats import KCP, SVD, Dense, Stack
from kcompress.nn import (
    COMPRESSED_TYPES,
    CompressedConv1d,
    CompressedConv2d,
    CompressedEmbedding,
    CompressedGRU,
    CompressedGRUCell,
    CompressedLinear,
    CompressedLSTM,
    CompressedLSTMCell,
    MatrixBuilder,
    rebuild,
)

INPUT, HIDDEN, STEPS, BATCH = 5, 4, 6, 3
LENGTHS = torch.tensor([4, 6, 2])  # unsorted, so the PackedSequence carries sorted/unsorted indices
ATOL = 1e-4


def fit(cls: type[formats.Factorization], weight: Tensor) -> formats.Factorization:
    """``cls`` fitted at its full (exact) rank."""
    tz = cls.default_tensorization(*weight.shape)
    return cls.fit(weight, tz, cls.max_rank(tz))


def exact(name: str, weight: Tensor, gates: int) -> nn.Module:
    """Full-rank svd for input matrices (the compressed path under test), dense for the others."""
    return fit(SVD if name.startswith("weight_ih") or name == "weight" else Dense, weight)


def separate(name: str, weight: Tensor, gates: int) -> nn.Module:
    """Each gate's row block fitted on its own, stacked."""
    return Stack([exact(name, block, 1) for block in weight.chunk(gates, dim=0)])


def states(hx: Any) -> tuple[Tensor, ...]:
    return tuple(hx) if isinstance(hx, tuple) else (hx,)


def assert_same(actual: Any, expected: Any, atol: float = ATOL) -> None:
    """Outputs (tensor or PackedSequence) and states (tensor or tuple) equal to ``atol``."""
    if isinstance(expected, PackedSequence):
        assert isinstance(actual, PackedSequence)
        for name in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            a, e = getattr(actual, name), getattr(expected, name)
            assert (a is None and e is None) or torch.equal(a, e), name
        actual, expected = actual.data, expected.data
    if isinstance(expected, Tensor):
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, atol=atol, rtol=0)
        return
    assert type(actual) is type(expected) and len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert_same(a, e, atol)


def random_state(dense: nn.Module, batch: Optional[int]) -> Any:
    """A random initial state for ``dense`` (``batch=None``: unbatched)."""
    if isinstance(dense, nn.RNNBase):
        shape: tuple[int, ...] = (dense.num_layers * (2 if dense.bidirectional else 1), dense.hidden_size)
        shape = shape if batch is None else (shape[0], batch, shape[1])
    else:
        shape = (dense.hidden_size,) if batch is None else (batch, dense.hidden_size)
    count = 2 if isinstance(dense, (nn.LSTM, nn.LSTMCell)) else 1
    values = tuple(torch.randn(shape) for _ in range(count))
    return values if count == 2 else values[0]


def compress(dense: nn.Module, build: MatrixBuilder = exact) -> nn.Module:
    return COMPRESSED_TYPES[type(dense)].from_dense(dense, build)


RNNS = [nn.LSTM, nn.GRU]


@pytest.mark.parametrize(
    "rnn, batch_first, num_layers, bidirectional, with_state",
    list(itertools.product(RNNS, [False, True], [1, 2], [False, True], [False, True])),
)
def test_rnn_matches_dense(
    rnn: type, batch_first: bool, num_layers: int, bidirectional: bool, with_state: bool
) -> None:
    torch.manual_seed(0)
    dense = rnn(INPUT, HIDDEN, num_layers=num_layers, batch_first=batch_first, bidirectional=bidirectional)
    layer = compress(dense)
    x = torch.randn((BATCH, STEPS, INPUT) if batch_first else (STEPS, BATCH, INPUT))
    args = (random_state(dense, BATCH),) if with_state else ()
    assert_same(layer(x, *args), dense(x, *args))
    packed = pack_padded_sequence(x, LENGTHS, batch_first=batch_first, enforce_sorted=False)
    assert_same(layer(packed, *args), dense(packed, *args))


@pytest.mark.parametrize("rnn", RNNS)
def test_rnn_sorted_packed_and_no_bias(rnn: type) -> None:
    torch.manual_seed(1)
    dense = rnn(INPUT, HIDDEN, num_layers=2, bias=False, bidirectional=True)
    layer = compress(dense)
    assert layer.bias_ih_l0 is None and not any("bias" in key for key in layer.state_dict())
    packed = pack_padded_sequence(torch.randn(STEPS, BATCH, INPUT), torch.tensor([6, 5, 1]))
    assert_same(layer(packed), dense(packed))


@pytest.mark.parametrize("rnn, batch_first, with_state", list(itertools.product(RNNS, [False, True], [False, True])))
def test_rnn_unbatched(rnn: type, batch_first: bool, with_state: bool) -> None:
    torch.manual_seed(2)
    dense = rnn(INPUT, HIDDEN, num_layers=2, batch_first=batch_first, bidirectional=True)
    layer = compress(dense)
    x = torch.randn(STEPS, INPUT)
    args = (random_state(dense, None),) if with_state else ()
    assert_same(layer(x, *args), dense(x, *args))


@pytest.mark.parametrize(
    "cell, batched, with_state, bias",
    list(itertools.product([nn.LSTMCell, nn.GRUCell], [True, False], [False, True], [True, False])),
)
def test_cell_matches_dense(cell: type, batched: bool, with_state: bool, bias: bool) -> None:
    torch.manual_seed(3)
    dense = cell(INPUT, HIDDEN, bias=bias)
    layer = compress(dense)
    x = torch.randn((BATCH, INPUT) if batched else (INPUT,))
    args = (random_state(dense, BATCH if batched else None),) if with_state else ()
    assert_same(layer(x, *args), dense(x, *args))


@pytest.mark.parametrize(
    "shape, bias", list(itertools.product([(INPUT,), (BATCH, INPUT), (2, BATCH, INPUT)], [True, False]))
)
def test_linear_matches_dense(shape: tuple[int, ...], bias: bool) -> None:
    torch.manual_seed(4)
    dense = nn.Linear(INPUT, HIDDEN, bias=bias)
    layer = compress(dense)
    assert (layer.in_features, layer.out_features) == (INPUT, HIDDEN)
    x = torch.randn(shape)
    assert_same(layer(x), dense(x))


def test_compressed_types() -> None:
    assert COMPRESSED_TYPES == {
        nn.LSTM: CompressedLSTM,
        nn.GRU: CompressedGRU,
        nn.LSTMCell: CompressedLSTMCell,
        nn.GRUCell: CompressedGRUCell,
        nn.Linear: CompressedLinear,
        nn.Embedding: CompressedEmbedding,
        nn.Conv1d: CompressedConv1d,
        nn.Conv2d: CompressedConv2d,
    }


def test_attributes_and_names_match_torch() -> None:
    dense = nn.LSTM(INPUT, HIDDEN, num_layers=2, batch_first=True, dropout=0.25, bidirectional=True)
    layer = compress(dense)
    keys = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional", "proj_size")
    for key in keys:
        assert getattr(layer, key) == getattr(dense, key), key
    assert set(layer.matrices) == {name for name, _ in dense.named_parameters() if name.startswith("weight")}
    assert {name for name, _ in layer.named_parameters(recurse=False)} == {
        name for name, _ in dense.named_parameters() if name.startswith("bias")
    }
    config = layer.layer_config()
    assert config["type"] == "LSTM"
    assert type(dense)(**config["kwargs"]).state_dict().keys() == dense.state_dict().keys()
    assert compress(nn.GRUCell(INPUT, HIDDEN)).layer_config() == {
        "type": "GRUCell",
        "kwargs": {"input_size": INPUT, "hidden_size": HIDDEN, "bias": True},
        "execution": {"weight_ih": "factorized", "weight_hh": "materialized"},  # dense hh: always materialized
    }
    assert compress(nn.Linear(INPUT, HIDDEN, bias=False)).layer_config()["kwargs"]["bias"] is False


@pytest.mark.parametrize("dense", [nn.LSTM(INPUT, HIDDEN, num_layers=2), nn.GRU(INPUT, HIDDEN, bidirectional=True)])
def test_builder_gets_torch_names_weights_and_gates(dense: nn.Module) -> None:
    seen: dict[str, tuple[Tensor, int]] = {}

    def record(name: str, weight: Tensor, gates: int) -> nn.Module:
        seen[name] = (weight, gates)
        return exact(name, weight, gates)

    compress(dense, record)
    gates = 4 if isinstance(dense, nn.LSTM) else 3
    weights = {name: p for name, p in dense.named_parameters() if name.startswith("weight")}
    assert seen.keys() == weights.keys()
    for name, (weight, got_gates) in seen.items():
        assert torch.equal(weight, weights[name]) and got_gates == gates


@pytest.mark.parametrize("rnn", RNNS)
def test_gradients_reach_the_factors(rnn: type) -> None:
    torch.manual_seed(5)
    dense = rnn(INPUT, HIDDEN, num_layers=2, bidirectional=True)
    layer = compress(dense)
    packed = pack_padded_sequence(torch.randn(STEPS, BATCH, INPUT), LENGTHS, enforce_sorted=False)
    output, hx = layer(packed)
    (output.data.square().sum() + sum(value.sum() for value in states(hx))).backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert any(".left" in name for name, _ in layer.named_parameters())  # the svd factors are among them


@pytest.mark.parametrize("rnn, bidirectional", list(itertools.product(RNNS, [False, True])))
def test_dropout_between_layers_matches_torch(rnn: type, bidirectional: bool) -> None:
    torch.manual_seed(6)
    dense = rnn(INPUT, HIDDEN, num_layers=3, dropout=0.5, bidirectional=bidirectional)
    layer = compress(dense)
    x = torch.randn(STEPS, BATCH, INPUT)
    packed = pack_padded_sequence(x, LENGTHS, enforce_sorted=False)
    for value in (x, packed):
        torch.manual_seed(7)
        expected = dense(value)
        torch.manual_seed(7)
        assert_same(layer(value), expected)  # same RNG use: the same masks as torch
    layer.eval()
    dense.eval()
    assert_same(layer(x), dense(x))
    torch.manual_seed(7)
    trained = layer.train()(x)[0]
    assert not torch.allclose(trained, layer.eval()(x)[0])


def test_dropout_not_applied_after_the_last_layer() -> None:
    with pytest.warns(UserWarning, match="num_layers greater than 1"):
        dense = nn.LSTM(INPUT, HIDDEN, num_layers=1, dropout=0.5)
    layer = compress(dense).train()
    x = torch.randn(STEPS, BATCH, INPUT)
    assert_same(layer(x), layer.eval()(x))


@pytest.mark.parametrize(
    "dense",
    [
        nn.LSTM(INPUT, HIDDEN, bidirectional=True),
        nn.GRU(INPUT, HIDDEN, num_layers=2),
        nn.LSTMCell(INPUT, HIDDEN),
        nn.GRUCell(INPUT, HIDDEN),
    ],
)
def test_separate_gates_equal_fused(dense: nn.Module) -> None:
    fused, split = compress(dense, exact), compress(dense, separate)
    assert isinstance(split.matrices["weight_ih_l0" if isinstance(dense, nn.RNNBase) else "weight_ih"], Stack)
    x = torch.randn(BATCH, INPUT) if isinstance(dense, nn.RNNCellBase) else torch.randn(STEPS, BATCH, INPUT)
    assert_same(split(x), fused(x))


def test_kcp_on_an_exactly_representable_weight() -> None:
    """A weight that is exactly a rank-2 KCP (order 2): the kcp layer reproduces the dense LSTM."""
    torch.manual_seed(8)
    dense = nn.LSTM(8, HIDDEN)
    tz = KCP.default_tensorization(4 * HIDDEN, 8, out_modes=(8, 2), in_modes=(2, 4), out_group=4)
    source = KCP(tz, 2)
    for factor in source.factors:
        nn.init.normal_(factor)
    with torch.no_grad():
        dense.weight_ih_l0.copy_(source.reconstruct())

    def build(name: str, weight: Tensor, gates: int) -> nn.Module:
        return KCP.fit(weight, tz, 2) if name == "weight_ih_l0" else fit(Dense, weight)

    layer = compress(dense, build)
    assert isinstance(layer.matrices["weight_ih_l0"], KCP)
    x = torch.randn(STEPS, BATCH, 8)
    assert_same(layer(x), dense(x))


def test_proj_size_is_refused() -> None:
    with pytest.raises(KCompressError, match="proj_size=2") as info:
        compress(nn.LSTM(INPUT, HIDDEN, proj_size=2))
    assert "\n" not in str(info.value)


def test_from_dense_checks_the_module_type() -> None:
    with pytest.raises(KCompressError, match="nn.GRU"):
        CompressedGRU.from_dense(nn.LSTM(INPUT, HIDDEN), exact)


def test_shape_errors_as_torch() -> None:
    layer = compress(nn.GRU(INPUT, HIDDEN))
    with pytest.raises(ValueError, match="2D or 3D"):
        layer(torch.randn(1, 2, 3, INPUT))
    with pytest.raises(RuntimeError, match="input_size"):
        layer(torch.randn(STEPS, BATCH, INPUT + 1))
    with pytest.raises(RuntimeError, match="hidden"):
        layer(torch.randn(STEPS, BATCH, INPUT), torch.zeros(1, BATCH + 1, HIDDEN))
    with pytest.raises(ValueError, match="1D or 2D"):
        compress(nn.LSTMCell(INPUT, HIDDEN))(torch.randn(1, 2, INPUT))


def kcp_or_separate(name: str, weight: Tensor, gates: int) -> nn.Module:
    """kcp on fused input matrices, per-gate svd stacks on recurrent ones (rebuild must restore both)."""
    if name.startswith("weight_hh"):
        return Stack([fit(SVD, block) for block in weight.chunk(gates, dim=0)])
    tz = KCP.default_tensorization(*weight.shape, order=2, out_group=gates)
    return KCP.fit(weight, tz, 2)


REBUILD_CASES: list[Callable[[], nn.Module]] = [
    lambda: nn.LSTM(INPUT + 3, HIDDEN, num_layers=2, bidirectional=True, batch_first=True),
    lambda: nn.GRU(INPUT + 3, HIDDEN, bias=False),
    lambda: nn.LSTMCell(INPUT + 3, HIDDEN),
    lambda: nn.GRUCell(INPUT + 3, HIDDEN),
    lambda: nn.Linear(INPUT + 3, HIDDEN * 2),
]


@pytest.mark.parametrize("make", REBUILD_CASES)
def test_rebuild_and_load_state_dict_reproduce_outputs(make: Callable[[], nn.Module]) -> None:
    torch.manual_seed(9)
    dense = make()
    layer = compress(dense, kcp_or_separate)
    copy = rebuild(layer.layer_config(), {name: m.config() for name, m in layer.matrices.items()})
    assert type(copy) is type(layer)
    copy.load_state_dict(layer.state_dict())
    assert all(not p.is_meta for p in copy.parameters())
    x = torch.randn(BATCH, INPUT + 3) if not isinstance(dense, nn.RNNBase) else torch.randn(BATCH, STEPS, INPUT + 3)
    assert_same(copy(x), layer(x), atol=0)


def test_rebuild_reports_bad_configs() -> None:
    layer = compress(nn.GRUCell(INPUT, HIDDEN))
    configs = {name: m.config() for name, m in layer.matrices.items()}
    with pytest.raises(KCompressError, match="unknown layer type"):
        rebuild({"type": "Conv3d", "kwargs": {}}, configs)
    with pytest.raises(KCompressError, match="weight_hh"):
        rebuild(layer.layer_config(), {"weight_ih": configs["weight_ih"]})
