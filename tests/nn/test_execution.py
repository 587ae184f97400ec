"""Execution paths: every path (factorized loop, fused kernel, fused kernel fed the input pre-activations,
materialized cells and Linear) computes what ``nn.LSTM``/``nn.GRU``/cells/Linear compute with the
reconstructed weights; gradients agree between paths; the weight cache follows the factors; ``auto``
follows the closed forms; plans survive an artifact round trip."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

import kcompress
from kcompress import formats
from kcompress.errors import KCompressError
from kcompress.formats.rows import in_row_chunks
from kcompress.nn import COMPRESSED_TYPES, CompressedLayer, auto_paths, set_execution
from kcompress.nn.execution import chunked_multiply

HIDDEN, STEPS, BATCH = 3, 5, 4
LENGTHS = torch.tensor([3, 5, 1, 4])  # unsorted: the PackedSequence carries sorted/unsorted indices
RTOL = 1e-5


def svd(name: str, weight: Tensor, gates: int) -> nn.Module:
    """A lossy rank-2 svd: the reconstructed weights differ from the dense ones."""
    return formats.SVD.fit(weight, formats.SVD.default_tensorization(*weight.shape), 2)


def reference(layer: CompressedLayer) -> nn.Module:
    """The torch module holding ``layer``'s reconstructed weights and its biases."""
    dense = layer.dense_type(**layer.layer_config()["kwargs"])
    with torch.no_grad():
        for name, matrix in layer.matrices.items():
            getattr(dense, name).copy_(matrix.reconstruct())
        for name, bias in layer.named_parameters(recurse=False):
            getattr(dense, name).copy_(bias)
    return dense.train(layer.training)


def close(actual: Any, expected: Any) -> None:
    """Tensors, PackedSequences and tuples of them equal to a relative 1e-5 (of the largest magnitude)."""
    if hasattr(expected, "batch_sizes"):
        assert torch.equal(actual.batch_sizes, expected.batch_sizes)
        actual, expected = actual.data, expected.data
    if isinstance(expected, Tensor):
        assert actual.shape == expected.shape
        scale = float(expected.detach().abs().max()) or 1.0
        torch.testing.assert_close(actual, expected, rtol=0, atol=RTOL * scale)
        return
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        close(a, e)


PLANS = ["factorized", "materialized", {"*weight_ih*": "factorized", "*weight_hh*": "materialized"}]
RNN_CASES = [  # (batch_first, num_layers, bidirectional, input kind, with_state)
    (False, 1, False, "padded", False),
    (True, 2, True, "padded", True),
    (False, 2, False, "packed", True),
    (True, 1, True, "packed", False),
    (True, 2, True, "unbatched", True),
]


def run_input(kind: str, batch_first: bool, features: int) -> Any:
    if kind == "unbatched":
        return torch.randn(STEPS, features)
    x = torch.randn(BATCH, STEPS, features) if batch_first else torch.randn(STEPS, BATCH, features)
    if kind == "packed":
        return pack_padded_sequence(x, LENGTHS, batch_first=batch_first, enforce_sorted=False)
    return x


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize(  # a wide input makes the mixed plan take the identity-fed fused kernel
    "plan, features", [(PLANS[0], 6), (PLANS[1], 6), (PLANS[2], 6), (PLANS[2], 128)],
    ids=["factorized", "materialized", "mixed-loop", "mixed-fused"],
)
@pytest.mark.parametrize("case", RNN_CASES)
def test_rnn_paths_match_torch(rnn: type, plan: Any, features: int, case: tuple) -> None:
    batch_first, num_layers, bidirectional, kind, with_state = case
    torch.manual_seed(0)
    dense = rnn(features, HIDDEN, num_layers=num_layers, batch_first=batch_first, bidirectional=bidirectional)
    layer = COMPRESSED_TYPES[rnn].from_dense(dense, svd)
    set_execution(layer, plan)
    x = run_input(kind, batch_first, features)
    state = None
    if with_state:
        shape = (num_layers * (2 if bidirectional else 1),) + (() if kind == "unbatched" else (BATCH,)) + (HIDDEN,)
        state = tuple(torch.randn(shape) for _ in range(2)) if rnn is nn.LSTM else torch.randn(shape)
    with torch.no_grad():
        close(layer(x, state), reference(layer)(x, state))


def test_the_wide_mixed_layer_takes_the_identity_fed_kernel() -> None:
    layer = COMPRESSED_TYPES[nn.LSTM].from_dense(nn.LSTM(64, HIDDEN, num_layers=2), svd)
    set_execution(layer, {"*weight_ih*": "factorized", "*weight_hh*": "materialized"})
    assert [layer.layer_path(k) for k in range(2)] == ["fused_input", "loop"]
    assert layer.layer_path(0, batch=10**6) == "loop"  # the identity's cost grows with the batch
    set_execution(layer, "materialized")
    assert [layer.layer_path(k) for k in range(2)] == ["fused", "fused"]
    set_execution(layer, {"*weight_hh_l1": "factorized"})
    assert [layer.layer_path(k) for k in range(2)] == ["fused", "loop"]


@pytest.mark.parametrize("cell", [nn.LSTMCell, nn.GRUCell])
@pytest.mark.parametrize("plan", PLANS[:2])
@pytest.mark.parametrize("batched, with_state", [(True, True), (False, False)])
def test_cell_paths_match_torch(cell: type, plan: str, batched: bool, with_state: bool) -> None:
    torch.manual_seed(1)
    layer = COMPRESSED_TYPES[cell].from_dense(cell(6, HIDDEN), svd)
    set_execution(layer, plan)
    x = torch.randn(BATCH, 6) if batched else torch.randn(6)
    state = None
    if with_state:
        state = (torch.randn(BATCH, HIDDEN),) * 2 if cell is nn.LSTMCell else torch.randn(BATCH, HIDDEN)
    with torch.no_grad():
        close(layer(x, state), reference(layer)(x, state))


@pytest.mark.parametrize("plan", PLANS[:2])
def test_linear_paths_match_torch(plan: str) -> None:
    layer = COMPRESSED_TYPES[nn.Linear].from_dense(nn.Linear(6, 5), svd)
    set_execution(layer, plan)
    x = torch.randn(2, 3, 6)
    with torch.no_grad():
        close(layer(x), reference(layer)(x))


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
def test_training_through_the_materialized_path_gives_the_factorized_loss_and_gradients(rnn: type) -> None:
    torch.manual_seed(2)
    dense = rnn(6, HIDDEN, num_layers=2, bidirectional=True, batch_first=True)
    layer = COMPRESSED_TYPES[rnn].from_dense(dense, svd).train()
    x = torch.randn(BATCH, STEPS, 6)
    results = []
    for plan in ("factorized", "materialized"):
        set_execution(layer, plan)
        layer.zero_grad()
        loss = layer(x)[0].square().mean()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in layer.parameters()]))
    (loss_f, grads_f), (loss_m, grads_m) = results
    close(loss_m, loss_f)
    assert all(g.abs().sum() > 0 for g in grads_m)
    for got, expected in zip(grads_m, grads_f):
        close(got, expected)


def test_the_weight_cache_follows_the_factors() -> None:
    layer = COMPRESSED_TYPES[nn.Linear].from_dense(nn.Linear(6, 5), svd)
    set_execution(layer, "materialized")
    x = torch.randn(2, 6)
    with torch.no_grad():
        before = layer(x)
        assert layer.weight("weight") is layer.weight("weight")  # cached without gradients
        layer.matrices["weight"].left.mul_(2.0)  # in place: the version counter moves
        after = layer(x)
    close(after - layer.bias, 2 * (before - layer.bias))
    assert layer.weight("weight").requires_grad  # grad enabled: rebuilt with its graph, not cached


def test_the_weight_cache_follows_a_replaced_factor() -> None:
    layer = COMPRESSED_TYPES[nn.Linear].from_dense(nn.Linear(6, 5), svd)
    set_execution(layer, "materialized")
    x = torch.randn(2, 6)
    with torch.no_grad():
        before = layer(x)
        matrix = layer.matrices["weight"]
        matrix.left = nn.Parameter(2.0 * matrix.left)  # a new tensor: id and data_ptr change, _version does not
        close(layer(x) - layer.bias, 2 * (before - layer.bias))


def test_chunked_multiply_equals_one_multiply() -> None:
    matrix = formats.KCP.fit(torch.randn(16, 16), formats.KCP.default_tensorization(16, 16, order=2), 3)
    x = torch.randn(50, 16)
    close(chunked_multiply(matrix, x, budget=64), matrix.multiply(x))
    with torch.no_grad():  # the no-grad path writes chunks into one buffer
        close(chunked_multiply(matrix, x, budget=64), matrix.multiply(x))


@pytest.mark.parametrize("chunk", [1, 7, 50, 64])
def test_row_chunks_match_one_run_with_and_without_gradients(chunk: int) -> None:
    weight = torch.randn(5, 3, requires_grad=True)
    rows = torch.randn(50, 3)
    with torch.no_grad():
        close(in_row_chunks(lambda part: part @ weight.T, rows, chunk), rows @ weight.T)
    in_row_chunks(lambda part: part @ weight.T, rows, chunk).square().sum().backward()
    close(weight.grad, 2 * (rows @ weight.T).T @ rows)


def kcp_at(rank: int) -> Any:
    def build(name: str, weight: Tensor, gates: int) -> nn.Module:
        tz = formats.KCP.default_tensorization(*weight.shape, order=2)
        return formats.KCP.fit(weight, tz, rank)

    return build


def test_auto_materializes_a_kcp_matrix_with_more_macs_than_dense() -> None:
    layer = COMPRESSED_TYPES[nn.LSTM].from_dense(nn.LSTM(16, 16), kcp_at(8))
    assert all(m.macs_per_vector() >= 64 * 16 for m in layer.matrices.values())
    for measure in (False, True):
        set_execution(layer, "factorized")
        assert set(auto_paths(layer, measure=measure).values()) == {"materialized"}


def test_auto_keeps_a_clearly_cheaper_product_factorized() -> None:
    unfitted = lambda name, w, g: formats.KCP(formats.KCP.default_tensorization(*w.shape, order=2), 1)  # noqa: E731
    layer = COMPRESSED_TYPES[nn.Linear].from_dense(nn.Linear(2048, 1024, device="meta"), unfitted)
    assert layer.matrices["weight"].macs_per_vector() * 16 <= 2048 * 1024
    assert auto_paths(layer, measure=False) == {"weight": "factorized"}


def test_auto_measures_unclear_layers_and_returns_a_valid_plan() -> None:
    layer = COMPRESSED_TYPES[nn.GRU].from_dense(nn.GRU(16, 8, bidirectional=True), kcp_at(1))
    plan = set_execution(layer, "auto")[""]
    assert set(plan) == set(layer.matrices) and set(plan.values()) <= {"factorized", "materialized"}
    assert auto_paths(layer, measure=False) == dict.fromkeys(layer.matrices, "materialized")


def test_set_execution_globs_and_errors() -> None:
    model = nn.Sequential(nn.LSTM(6, HIDDEN), nn.Linear(HIDDEN, 2))
    model[0] = COMPRESSED_TYPES[nn.LSTM].from_dense(model[0], svd)
    model[1] = COMPRESSED_TYPES[nn.Linear].from_dense(model[1], svd)
    plans = set_execution(model, {"*": "factorized", "0.weight_hh*": "materialized"})
    assert plans == {"0": {"weight_ih_l0": "factorized", "weight_hh_l0": "materialized"}, "1": {"weight": "factorized"}}
    with pytest.raises(KCompressError, match="matched no compressed matrix"):
        set_execution(model, {"nothing*": "materialized"})
    with pytest.raises(KCompressError, match="'factorized' or 'materialized'"):
        set_execution(model, "fast")


def test_a_dense_matrix_is_always_materialized() -> None:
    dense = lambda name, w, g: formats.Dense.fit(w, formats.Dense.default_tensorization(*w.shape), 1)  # noqa: E731
    layer = COMPRESSED_TYPES[nn.GRU].from_dense(nn.GRU(6, HIDDEN), dense)
    set_execution(layer, "factorized")
    assert set(layer.execution.values()) == {"materialized"} and layer.layer_path(0) == "fused"


@pytest.mark.parametrize("rnn", [nn.GRU])
def test_the_fused_path_traces(rnn: type) -> None:
    layer = COMPRESSED_TYPES[rnn].from_dense(rnn(6, HIDDEN, num_layers=2, bidirectional=True), svd).eval()
    set_execution(layer, "materialized")
    x = torch.randn(STEPS, BATCH, 6)
    traced = torch.jit.trace(layer, (x,))
    fresh = torch.randn(STEPS, BATCH, 6)
    with torch.no_grad():
        close(traced(fresh), layer(fresh))


def test_artifacts_round_trip_their_plan(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.GRU(6, HIDDEN))
    compressed, report = kcompress.compress(model, "svd", rank=2, targets="ih,hh", check_speed=False,
                                            execution="materialized")
    assert compressed[0].execution == {"weight_ih_l0": "materialized", "weight_hh_l0": "materialized"}
    set_execution(compressed, {"*weight_ih*": "factorized"})
    path = kcompress.save_artifact(compressed, report, tmp_path / "m.safetensors")
    loaded = kcompress.load(path, model=nn.Sequential(nn.GRU(6, HIDDEN)))
    assert loaded[0].execution == compressed[0].execution
    x = torch.randn(STEPS, 2, 6)
    with torch.no_grad():
        close(loaded(x), compressed(x))
    set_execution(loaded, "materialized")
    assert set(loaded[0].execution.values()) == {"materialized"}


def test_finetune_trains_materialized_and_restores_the_plan() -> None:
    torch.manual_seed(4)
    layer = COMPRESSED_TYPES[nn.GRU].from_dense(nn.GRU(6, HIDDEN, batch_first=True), svd)
    seen: list[dict[str, str]] = []
    layer.register_forward_hook(lambda module, args, output: seen.append(dict(module.execution)))

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.out = layer, nn.Linear(HIDDEN, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.out(self.rnn(x)[0][:, -1])

    model = Head()
    set_execution(model, "factorized")
    data = [(torch.randn(4, STEPS, 6), torch.randint(0, 2, (4,))) for _ in range(2)]
    kcompress.finetune(model, data, epochs=1, val_data=data, patience=None)
    assert seen and all(set(plan.values()) == {"materialized"} for plan in seen)
    assert set(layer.execution.values()) == {"factorized"}


def test_training_keeps_what_auto_left_factorized() -> None:
    torch.manual_seed(5)
    layer = COMPRESSED_TYPES[nn.LSTM].from_dense(nn.LSTM(6, HIDDEN), svd)
    layer.set_execution({"weight_ih_l0": "factorized", "weight_hh_l0": "factorized"},
                        requested={"weight_ih_l0": "auto", "weight_hh_l0": "factorized"})
    with kcompress.nn.trained(layer):
        assert layer.execution == {"weight_ih_l0": "factorized", "weight_hh_l0": "materialized"}
        assert layer.requested == {"weight_ih_l0": "auto", "weight_hh_l0": "factorized"}
    assert layer.execution == {"weight_ih_l0": "factorized", "weight_hh_l0": "factorized"}
    assert layer.requested == {"weight_ih_l0": "auto", "weight_hh_l0": "factorized"}


@pytest.mark.slow
def test_the_fused_path_exports_to_onnx(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    layer = COMPRESSED_TYPES[nn.LSTM].from_dense(nn.LSTM(6, HIDDEN, num_layers=2, bidirectional=True), svd).eval()
    set_execution(layer, "materialized")
    x = torch.randn(STEPS, BATCH, 6)
    torch.onnx.export(layer, (x,), tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    fresh = torch.randn(STEPS, BATCH, 6)
    got = session.run(None, {session.get_inputs()[0].name: fresh.numpy()})
    with torch.no_grad():
        expected = layer(fresh)
    close(torch.from_numpy(got[0]), expected[0])
