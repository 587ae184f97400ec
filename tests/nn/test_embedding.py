"""CompressedEmbedding: every lookup equals nn.Embedding with the reconstructed table, on both execution paths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kcompress import formats
from kcompress.errors import KCompressError
from kcompress.nn import COMPRESSED_TYPES, CompressedEmbedding, rebuild, set_execution
from tests.conftest import trained_like

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FORMATS = ("svd", "kcp", "tt", "ht", "adtn")


def _fitted(dense: nn.Embedding, name: str, rank: int = 3) -> CompressedEmbedding:
    fmt = formats.get_format(name)

    def build(_: str, weight: torch.Tensor, gates: int) -> nn.Module:
        tz = fmt.default_tensorization(*weight.shape)
        return fmt.fit(weight, tz, 1 if name == "adtn" else rank)

    return CompressedEmbedding.from_dense(dense, build)


def _dense(num: int = 60, dim: int = 12, **kwargs) -> nn.Embedding:
    dense = nn.Embedding(num, dim, **kwargs)
    with torch.no_grad():
        dense.weight.copy_(trained_like(num, dim))
    return dense


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("path", ["factorized", "materialized"])
def test_every_index_equals_embedding_with_reconstructed_table(name: str, path: str) -> None:
    layer = _fitted(_dense(padding_idx=5), name)
    set_execution(layer, path)
    reference = nn.Embedding.from_pretrained(layer.matrices["weight"].reconstruct().detach(), freeze=False,
                                             padding_idx=5)
    every = torch.arange(layer.num_embeddings).reshape(6, 10)
    with torch.no_grad():
        torch.testing.assert_close(layer(every), reference(every), rtol=1e-5, atol=1e-6)
        padded = torch.tensor([[5, 5, 1], [0, 5, 59]])
        torch.testing.assert_close(layer(padded), reference(padded), rtol=1e-5, atol=1e-6)
        assert layer(torch.tensor(7)).shape == (layer.embedding_dim,)


@pytest.mark.parametrize("path", ["factorized", "materialized"])
def test_padding_row_gets_no_gradient_and_max_norm_matches_torch(path: str) -> None:
    layer = _fitted(_dense(padding_idx=2, max_norm=0.5), "svd")
    set_execution(layer, path)
    reference = nn.Embedding.from_pretrained(layer.matrices["weight"].reconstruct().detach().clone(),
                                             freeze=False, padding_idx=2, max_norm=0.5)
    index = torch.tensor([[2, 3, 4], [2, 2, 9]])
    torch.testing.assert_close(layer(index), reference(index), rtol=1e-5, atol=1e-6)
    svd = layer.matrices["weight"]
    layer(torch.tensor([2, 2])).sum().backward()
    assert svd.left.grad is None or float(svd.left.grad.abs().sum()) == 0.0
    svd.zero_grad()
    layer(torch.tensor([3])).sum().backward()
    assert float(svd.left.grad[3].abs().sum()) > 0 and float(svd.left.grad[2].abs().sum()) == 0.0


def test_interface_and_refusals() -> None:
    layer = _fitted(_dense(40, 8, padding_idx=-1), "tt")
    assert COMPRESSED_TYPES[nn.Embedding] is CompressedEmbedding
    assert (layer.num_embeddings, layer.embedding_dim, layer.padding_idx) == (40, 8, 39)
    with pytest.raises(KCompressError, match="sparse"):
        _fitted(_dense(40, 8, sparse=True), "svd")
    with pytest.raises(KCompressError, match="scale_grad_by_freq"):
        _fitted(_dense(40, 8, scale_grad_by_freq=True), "svd")
    set_execution(layer, "factorized")
    with pytest.raises(KCompressError, match="out of range"):
        layer(torch.tensor([40]))
    with pytest.raises(KCompressError, match="integer"):
        layer(torch.tensor([1.0]))


def test_rebuild_and_state_dict_round_trip() -> None:
    layer = _fitted(_dense(padding_idx=0), "kcp")
    twin = rebuild(layer.layer_config(), {"weight": layer.matrices["weight"].config()})
    twin.load_state_dict(layer.state_dict())
    index = torch.randint(0, layer.num_embeddings, (4, 7))
    with torch.no_grad():
        torch.testing.assert_close(twin(index), layer(index))


def test_auto_plan_keeps_the_cached_table_unless_measured_faster() -> None:
    layer = _fitted(_dense(), "svd")
    assert set_execution(layer, "auto", measure=False) == {"": {"weight": "materialized"}}
    assert set_execution(layer, "auto")[""]["weight"] in ("materialized", "factorized")


def test_calibration_weights_rows_by_lookup_frequency() -> None:
    from kcompress.calibration.moments import TOKEN_PRIOR, collect_second_moments

    model = nn.Sequential(_dense(10, 4))
    tokens = torch.tensor([[1, 1, 1, 2], [1, 3, 3, 0], [1, 1, 2, 2], [4, 4, 4, 4]])
    moment = collect_second_moments(model, tokens, holdout=0.25, seed=0)["0.weight"]
    torch.testing.assert_close(moment.fit, torch.eye(4, dtype=torch.float64))  # a lookup's error is its row's
    torch.testing.assert_close(moment.holdout, torch.eye(4, dtype=torch.float64))
    candidates = []
    for held in range(4):  # the seeded split holds one sequence out: the weights are the others' counts
        counts = torch.bincount(tokens[[i for i in range(4) if i != held]].flatten(), minlength=10).double()
        candidates.append((counts + TOKEN_PRIOR) / (counts + TOKEN_PRIOR).mean())
    assert moment.rows == 12
    assert any(torch.allclose(moment.row_weights, expected) for expected in candidates)


def test_targets_select_embeddings_and_linear_layers() -> None:
    import kcompress

    model = nn.ModuleDict({"emb": _dense(60, 12), "rnn": nn.LSTM(12, 8), "head": nn.Linear(8, 3)})
    default, report = kcompress.compress(model, "svd", ratio=2, check_speed=False)
    assert type(default["emb"]) is nn.Embedding and {row.layer for row in report.matrices} == {"rnn"}
    only, report = kcompress.compress(model, "svd", ratio=2, targets="embedding", check_speed=False)
    assert isinstance(only["emb"], CompressedEmbedding) and type(only["rnn"]) is nn.LSTM
    every, report = kcompress.compress(model, "svd", ratio=2, targets="all", check_speed=False)
    assert {row.layer for row in report.matrices} == {"emb", "rnn", "head"} and report.skipped == []
