"""kcompress.load: into the user's own model (what a state dict cannot know comes from it), and crafted or
inconsistent artifacts refused at load, fast, with one short line naming the key or tensor."""

from __future__ import annotations

import json
import pathlib
import struct
import time
from typing import Any, Callable

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from torch import nn

from kcompress import KCompressError, compress
from kcompress.cli.main import app
from kcompress.io import METADATA_KEY, load, model_from_state_dict, save_artifact
from kcompress.io.models import SequenceClassifier

pytestmark = pytest.mark.filterwarnings("ignore::kcompress.errors.KCompressWarning")


class TokenTagger(nn.Module):
    """Embedding + 2-layer bidirectional batch-first GRU + Linear: a tag per token."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(20, 8)
        self.gru = nn.GRU(8, 6, num_layers=2, bidirectional=True, batch_first=True, dropout=0.1)
        self.head = nn.Linear(12, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(self.embedding(tokens))[0])


def test_state_dict_artifact_from_the_cli_loads_into_the_users_model(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(0)
    trained = TokenTagger().eval()
    torch.save(trained.state_dict(), tmp_path / "tagger.pt")
    out = tmp_path / "tagger.svd.safetensors"
    result = CliRunner().invoke(app, ["compress", str(tmp_path / "tagger.pt"), "--format", "svd", "--rank", "2",
                                      "--targets", "ih,hh", "--include", "*", "--seed", "3", "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    fresh = TokenTagger()
    restored = load(out, model=fresh).eval()
    assert restored is fresh and restored.gru.batch_first and restored.gru.dropout == 0.1
    expected, _ = compress(trained, "svd", rank=2, targets="ih,hh", include=["*"], seed=3, check_speed=False)
    assert restored.state_dict().keys() == expected.state_dict().keys()
    assert all(torch.equal(value, expected.state_dict()[key]) for key, value in restored.state_dict().items())
    tokens = torch.randint(0, 20, (3, 7))  # the execution paths may differ (measured): equal up to rounding
    torch.testing.assert_close(restored(tokens), expected.eval()(tokens), rtol=0, atol=1e-6)


def test_user_model_must_agree_on_what_the_weights_determine(tmp_path: pathlib.Path) -> None:
    compressed, report = compress(model_from_state_dict(TokenTagger().state_dict()), "svd", rank=2,
                                  targets="ih,hh", check_speed=False)
    path = save_artifact(compressed, report, tmp_path / "a.safetensors")
    other = TokenTagger()
    other.gru = nn.GRU(8, 6, num_layers=2, bidirectional=False, batch_first=True)
    with pytest.raises(KCompressError, match=r"bidirectional=False, the artifact's bidirectional=True"):
        load(path, model=other)


# ---------------------------------------------------------------------- crafted and inconsistent artifacts
def _artifact(tmp_path: pathlib.Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and description of a small compressed SequenceClassifier artifact (head included)."""
    compressed, report = compress(SequenceClassifier(6, 8, 3), "svd", rank=2, include=["*"], check_speed=False)
    path = save_artifact(compressed, report, tmp_path / "good.safetensors")
    with safetensors.safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, json.loads(handle.metadata()[METADATA_KEY])


def _write(path: pathlib.Path, tensors: dict[str, torch.Tensor], metadata: str) -> pathlib.Path:
    path.write_bytes(safetensors.torch.save(tensors, metadata={METADATA_KEY: metadata}))
    return path


def _refused(path: pathlib.Path, *needles: str) -> str:
    start = time.perf_counter()
    with pytest.raises(KCompressError) as error:
        load(path)
    assert time.perf_counter() - start < 2.0  # well under a second on a quiet machine; bounded here
    message = str(error.value)
    assert "\n" not in message and len(message) < 500, message
    for needle in needles:
        assert needle in message, message
    return message


def _set(path: list[Any], value: Any) -> Callable[[dict], None]:
    def edit(description: dict) -> None:
        node = description
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


@pytest.mark.parametrize("edit, needles", [
    (_set(["layers", "rnn", "layer", "kwargs", "num_layers"], 200000), ["num_layers is 200000"]),
    (_set(["architecture", "kwargs", "num_layers"], 200000), ["architecture.kwargs.num_layers"]),
    (_set(["layers", "rnn", "layer", "kwargs", "hidden_size"], 40000), ["layers['rnn']"]),
    (_set(["architecture", "kwargs", "hidden_size"], 40000), ["architecture's Linear at head has in_features=40000"]),
    (_set(["layers", "head", "layer", "kwargs", "in_features"], 7), ["layers['head'].matrices.weight"]),
    (_set(["layers", "head", "layer", "kwargs", "out_features"], -3), ["out_features is -3"]),
    (_set(["layers", "head", "matrices", "weight", "rank"], 10**9), ["head.matrices.weight"]),
    (_set(["layers", "rnn", "layer", "type"], "Conv3d"), ["layers['rnn'].layer.type"]),
    (_set(["layers", "rnn", "matrices"], []), ["layers['rnn'].matrices is list"]),
    (_set(["layers"], "x"), ["layers is str"]),
], ids=["num_layers", "arch-num_layers", "hidden", "arch-hidden", "in_features", "negative", "rank", "type",
        "matrices-type", "layers-type"])
def test_crafted_metadata_is_refused_fast_in_one_line(tmp_path: pathlib.Path, edit: Callable, needles: list[str]):
    tensors, description = _artifact(tmp_path)
    edit(description)
    _refused(_write(tmp_path / "bad.safetensors", tensors, json.dumps(description)), *needles)


def test_inconsistent_tensors_are_refused_naming_the_tensor(tmp_path: pathlib.Path) -> None:
    tensors, description = _artifact(tmp_path)
    metadata = json.dumps(description)
    factor = next(k for k in tensors if k.startswith("head.matrices.weight."))
    nan = dict(tensors, **{factor: torch.full_like(tensors[factor], float("nan"))})
    _refused(_write(tmp_path / "nan.safetensors", nan, metadata), factor, "NaN")
    wide = dict(tensors, **{factor: tensors[factor].double()})
    _refused(_write(tmp_path / "f64.safetensors", wide, metadata), factor, "float64")
    ints = dict(tensors, **{"head.bias": tensors["head.bias"].long()})
    _refused(_write(tmp_path / "int.safetensors", ints, metadata), "head.bias", "int64")
    _refused(_write(tmp_path / "missing.safetensors", {k: v for k, v in tensors.items() if k != "head.bias"},
                    metadata), "head.bias", "missing")


def test_deeply_nested_metadata_is_a_kcompress_error(tmp_path: pathlib.Path) -> None:
    tensors, _ = _artifact(tmp_path)
    _refused(_write(tmp_path / "deep.safetensors", tensors, "[" * 100000 + "]" * 100000), "damaged")
    nested = '{"schema_version": 1, "report": ' + "[" * 50000 + "]" * 50000 + "}"
    _refused(_write(tmp_path / "deep2.safetensors", tensors, nested), "damaged")


def test_deeply_nested_safetensors_header_is_a_kcompress_error(tmp_path: pathlib.Path) -> None:
    header = b'{"__metadata__": {"kcompress": "{}"}, "x": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(KCompressError):
        load(path)
