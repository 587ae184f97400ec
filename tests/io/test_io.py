"""kcompress.io: every checkpoint kind in, layers recognised from names and shapes, models built from state
dicts, artifacts written atomically and loaded back to identical outputs, and each bad input refused with
one line naming the file."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import re
import stat
import zipfile
from typing import Any, Callable

import pytest
import safetensors.torch
import torch
from torch import nn

from kcompress import KCompressError, compress
from kcompress.io import (
    METADATA_KEY,
    WEIGHTS_ONLY,
    LayerSpec,
    StandaloneModel,
    check_output_path,
    default_output_path,
    file_sha256,
    find_layers,
    load,
    load_checkpoint,
    model_from_checkpoint,
    model_from_state_dict,
    save_artifact,
)
from kcompress.io.models import SequenceClassifier
from kcompress.nn import CompressedGRU, CompressedLinear, CompressedLSTM, CompressedLSTMCell

pytestmark = pytest.mark.filterwarnings("ignore::kcompress.errors.KCompressWarning")

PNG_HEADER = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10"


class Net(nn.Module):
    """A user model: embedding, a 2-layer bidirectional GRU inside a Sequential, a norm, a head and a cell."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.encoder = nn.Sequential(nn.GRU(6, 8, num_layers=2, bidirectional=True))
        self.norm = nn.LayerNorm(16)
        self.conv = nn.Conv1d(16, 4, 1)
        self.fc = nn.Linear(16, 4)
        self.cell = nn.LSTMCell(4, 5, bias=False)
        self.register_buffer("scale", torch.tensor([2.0]))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens ``(T, B)`` -> ``(B, 5)``."""
        output, _ = self.encoder[0](self.embed(tokens))
        return self.cell(self.fc(self.norm(output[-1])) * self.scale)[0]


class Encoder(nn.Module):
    """``x (T, B, 4)`` -> LSTM -> GRU -> ``(T, B, 3)`` (scriptable)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 6)
        self.gru = nn.GRU(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gru(self.lstm(x)[0])[0]


def one_line(error: pytest.ExceptionInfo, *needles: str) -> str:
    """The error message, checked to be one line containing every needle."""
    message = str(error.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def classifier_file(path: pathlib.Path, **kwargs: Any) -> pathlib.Path:
    torch.save(SequenceClassifier(6, 8, 3, **kwargs).state_dict(), path)
    return path


def small_compressed(model: nn.Module, **kwargs: Any) -> tuple[nn.Module, Any]:
    return compress(model, "kcp", rank=2, check_speed=False, **kwargs)


# ====================================================================== kinds in
@pytest.mark.parametrize(
    "wrap",
    [lambda sd: sd, lambda sd: {"state_dict": sd, "epoch": 3}, lambda sd: {"model": sd},
     lambda sd: {"model_state_dict": sd, "optimizer": {"lr": 0.1}}, lambda sd: {"model": {"state_dict": sd}},
     lambda sd: {f"module.{k}": v for k, v in sd.items()}],
    ids=["bare", "state_dict", "model", "model_state_dict", "nested", "dataparallel"],
)
def test_torch_state_dict_and_its_nestings(tmp_path: pathlib.Path, wrap: Callable[[dict], Any]) -> None:
    model = SequenceClassifier(6, 8, 3)
    path = tmp_path / "weights.bin"
    torch.save(wrap(model.state_dict()), path)
    checkpoint = load_checkpoint(path)
    assert checkpoint.kind == "state_dict" and checkpoint.module is None and checkpoint.path == path
    assert checkpoint.sha256 == file_sha256(path)
    assert checkpoint.state_dict.keys() == model.state_dict().keys()
    assert all(torch.equal(checkpoint.state_dict[k], v) for k, v in model.state_dict().items())


def test_legacy_pickle_format_and_kind_by_content(tmp_path: pathlib.Path) -> None:
    model = SequenceClassifier(6, 8, 3)
    legacy = tmp_path / "legacy.safetensors"  # the extension lies: content decides
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    assert load_checkpoint(legacy).kind == "state_dict"
    disguised = tmp_path / "weights.pt"
    safetensors.torch.save_file(model.state_dict(), disguised)
    checkpoint = load_checkpoint(disguised)
    assert checkpoint.kind == "safetensors" and checkpoint.state_dict.keys() == model.state_dict().keys()


def test_whole_module_needs_trust_and_the_refusal_lists_its_globals(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(Net(), path)
    with pytest.raises(KCompressError) as error:
        load_checkpoint(path)
    one_line(error, str(path), "--trust-checkpoint", "torch.nn.modules.rnn.GRU", f"{__name__}.Net")
    checkpoint = load_checkpoint(path, trust_checkpoint=True)
    assert checkpoint.kind == "module" and isinstance(checkpoint.module, Net)
    assert model_from_checkpoint(checkpoint) is checkpoint.module


def test_legacy_pickled_module_refused_too(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(nn.Sequential(nn.LSTM(3, 4)), path, _use_new_zipfile_serialization=False)
    with pytest.raises(KCompressError) as error:
        load_checkpoint(path)
    one_line(error, "--trust-checkpoint", "torch.nn.modules.container.Sequential")
    assert load_checkpoint(path, trust_checkpoint=True).kind == "module"


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_torchscript_needs_trust_then_compresses_through_its_state_dict(tmp_path: pathlib.Path) -> None:
    model = SequenceClassifier(6, 8, 3).eval()
    path = tmp_path / "traced.pt"
    torch.jit.save(torch.jit.trace(model, torch.randn(2, 5, 6)), path)
    with pytest.raises(KCompressError) as error:
        load_checkpoint(path)
    one_line(error, str(path), "TorchScript", "--trust-checkpoint")
    checkpoint = load_checkpoint(path, trust_checkpoint=True)
    assert checkpoint.kind == "torchscript" and checkpoint.module is not None
    rebuilt = model_from_checkpoint(checkpoint)
    assert isinstance(rebuilt, SequenceClassifier)
    x = torch.randn(2, 5, 6)
    assert torch.equal(rebuilt.eval()(x), model(x))

    scripted = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(Encoder()), scripted)
    standalone = model_from_checkpoint(load_checkpoint(scripted, trust_checkpoint=True))
    assert isinstance(standalone, StandaloneModel)
    assert [type(standalone.get_submodule(n)) for n in ("lstm", "gru")] == [nn.LSTM, nn.GRU]


def test_artifact_kind_gives_the_runnable_model(tmp_path: pathlib.Path) -> None:
    compressed, report = small_compressed(SequenceClassifier(6, 8, 3))
    path = save_artifact(compressed, report, tmp_path / "a.safetensors")
    checkpoint = load_checkpoint(path)
    assert checkpoint.kind == "artifact" and isinstance(checkpoint.module, SequenceClassifier)
    assert model_from_checkpoint(checkpoint) is checkpoint.module
    assert checkpoint.state_dict.keys() == compressed.state_dict().keys()


# ====================================================================== bad files
def _write(path: pathlib.Path, data: bytes) -> pathlib.Path:
    path.write_bytes(data)
    return path


def _directory(folder: pathlib.Path) -> pathlib.Path:
    (folder / "dir.pt").mkdir()
    return folder / "dir.pt"


def _truncated(folder: pathlib.Path) -> pathlib.Path:
    whole = classifier_file(folder / "whole.pt")
    data = whole.read_bytes()
    whole.unlink()
    return _write(folder / "cut.pt", data[: len(data) // 2])


def _zip_without_torch(folder: pathlib.Path) -> pathlib.Path:
    path = folder / "archive.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    return path


#: case -> (make the file in a folder, what the message says)
BAD_FILES: dict[str, tuple[Callable[[pathlib.Path], pathlib.Path], str]] = {
    "missing": (lambda d: d / "nope.pt", "no such file"),
    "directory": (_directory, "directory"),
    "empty": (lambda d: _write(d / "empty.pt", b""), "empty"),
    "truncated": (_truncated, "truncated or corrupt"),
    "text": (lambda d: _write(d / "notes.pt", b"just some notes\n"), "text file"),
    "png": (lambda d: _write(d / "image.pt", PNG_HEADER), "PNG image"),
    "foreign zip": (_zip_without_torch, "not a torch checkpoint"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_one_line_naming_the_file(tmp_path: pathlib.Path, case: str) -> None:
    make, needle = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(KCompressError) as error:
        load_checkpoint(path)
    one_line(error, str(path), needle)


def test_pickle_needing_other_globals_is_refused(tmp_path: pathlib.Path) -> None:
    import argparse

    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": SequenceClassifier(6, 8, 3).state_dict(), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(KCompressError) as error:
        load_checkpoint(path)
    one_line(error, "argparse.Namespace", "--trust-checkpoint")
    assert load_checkpoint(path, trust_checkpoint=True).kind == "state_dict"


def test_a_pickle_without_any_state_dict(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "numbers.pt"
    torch.save({"epoch": 3, "loss": 0.5}, path)
    with pytest.raises(KCompressError) as error:
        load_checkpoint(path)
    one_line(error, str(path), "no state dict found", "'epoch'")


# ====================================================================== recognising layers
def _specs(module: nn.Module) -> dict[str, LayerSpec]:
    return {spec.name: spec for spec in find_layers(module.state_dict())}


def test_find_layers_recognises_each_torch_layer_with_its_configuration() -> None:
    layers = {
        "lstm": nn.LSTM(5, 7, num_layers=3, bidirectional=True),
        "gru": nn.GRU(5, 4, bias=False),
        "lstm_cell": nn.LSTMCell(3, 6),
        "gru_cell": nn.GRUCell(6, 2, bias=False),
        "linear": nn.Linear(9, 3),
        "linear_nobias": nn.Linear(3, 9, bias=False),
    }
    specs = _specs(nn.ModuleDict(layers))
    assert list(specs) == list(layers)
    for name, layer in layers.items():
        rebuilt = specs[name].build()
        assert type(rebuilt) is type(layer)
        shapes = {k: v.shape for k, v in layer.state_dict().items()}
        assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    assert specs["lstm"].kwargs == {"input_size": 5, "hidden_size": 7, "num_layers": 3, "bias": True,
                                    "batch_first": False, "bidirectional": True}


def test_find_layers_leaves_non_layers_as_tensors() -> None:
    model = nn.ModuleDict({
        "embed": nn.Embedding(10, 4), "tok_emb": nn.Linear(4, 4), "conv": nn.Conv1d(4, 4, 1),
        "norm": nn.LayerNorm(4), "bn": nn.BatchNorm1d(4), "vanilla": nn.RNN(4, 4),
        "projected": nn.LSTM(4, 8, proj_size=3), "cell": nn.RNNCell(4, 4),
    })
    assert find_layers(model.state_dict()) == []


def test_a_module_with_extra_tensors_or_submodules_is_not_a_layer() -> None:
    state = nn.Linear(4, 3).state_dict()
    extra = {**{f"fc.{k}": v for k, v in state.items()}, "fc.scale": torch.ones(3)}
    deeper = {**{f"fc.{k}": v for k, v in state.items()}, "fc.inner.weight": torch.ones(3, 3)}
    assert [s.name for s in find_layers(extra)] == []
    assert [s.name for s in find_layers(deeper)] == ["fc.inner"]


def _broken(mutate: Callable[[dict], None]) -> dict:
    state = {f"rnn.{k}": v for k, v in nn.LSTM(4, 6, num_layers=2).state_dict().items()}
    state.update({f"head.{k}": v for k, v in nn.Linear(6, 3).state_dict().items()})
    mutate(state)
    return state


INCONSISTENT: dict[str, tuple[Callable[[dict], None], str]] = {
    "weight_hh rows": (lambda s: s.update({"rnn.weight_hh_l0": torch.zeros(23, 6)}), "rnn.weight_hh_l0"),
    "weight_hh cols": (lambda s: s.update({"rnn.weight_hh_l1": torch.zeros(24, 5)}), "rnn.weight_hh_l1"),
    "bias length": (lambda s: s.update({"rnn.bias_ih_l1": torch.zeros(23)}), "rnn.bias_ih_l1"),
    "layer input": (lambda s: s.update({"rnn.weight_ih_l1": torch.zeros(24, 5)}), "rnn.weight_ih_l1"),
    "missing bias": (lambda s: s.pop("rnn.bias_hh_l0"), "rnn.bias_hh_l0"),
    "missing layer": (lambda s: [s.pop(k) for k in list(s) if k.startswith("rnn.") and k.endswith("_l0")],
                      "rnn.weight_ih_l0"),
    "linear bias": (lambda s: s.update({"head.bias": torch.zeros(4)}), "head.bias"),
    "nan": (lambda s: s["rnn.weight_ih_l1"].__setitem__((0, 0), float("nan")), "rnn.weight_ih_l1"),
    "inf": (lambda s: s["head.bias"].__setitem__(0, float("-inf")), "head.bias"),
}


@pytest.mark.parametrize("case", list(INCONSISTENT))
def test_inconsistent_or_non_finite_layers_name_the_tensor(case: str) -> None:
    mutate, tensor = INCONSISTENT[case]
    with pytest.raises(KCompressError) as error:
        find_layers(_broken(mutate))
    one_line(error, tensor)


def test_ambiguous_gate_count_is_an_error() -> None:
    state = {"weight_ih": torch.zeros(10, 3), "weight_hh": torch.zeros(10, 5)}  # 2 gates: neither
    with pytest.raises(KCompressError) as error:
        find_layers(state)
    one_line(error, "weight_hh", "(G·H, H)")


# ====================================================================== models from state dicts
def test_rnn_head_state_dict_becomes_a_sequence_classifier() -> None:
    for kwargs in ({}, {"cell": "gru", "num_layers": 2, "bidirectional": True}):
        dense = SequenceClassifier(6, 8, 3, **kwargs).eval()
        model = model_from_state_dict(dense.state_dict()).eval()
        assert type(model) is SequenceClassifier
        x = torch.randn(2, 5, 6)
        assert torch.equal(model(x), dense(x))


def test_standalone_model_keeps_every_key_value_and_dtype() -> None:
    state = {k: v.double() if k.startswith("fc") else v for k, v in Net().state_dict().items()}
    model = model_from_state_dict(state)
    assert isinstance(model, StandaloneModel)
    rebuilt = model.state_dict()
    assert rebuilt.keys() == state.keys()
    for key, value in state.items():
        assert rebuilt[key].dtype == value.dtype and torch.equal(rebuilt[key], value), key
    gru = model.get_submodule("encoder.0")
    assert isinstance(gru, nn.GRU) and gru.batch_first is False and gru.bidirectional and gru.num_layers == 2
    assert isinstance(model.get_submodule("cell"), nn.LSTMCell) and model.get_submodule("cell").bias is False
    assert "embed.weight" in dict(model.named_buffers())
    with pytest.raises(KCompressError, match=re.escape(WEIGHTS_ONLY)):
        model(torch.zeros(3, 2, dtype=torch.long))


def test_a_single_layer_state_dict_becomes_that_layer() -> None:
    lstm = nn.LSTM(3, 5, num_layers=2)
    model = model_from_state_dict(lstm.state_dict())
    assert type(model) is nn.LSTM and model.num_layers == 2
    x = torch.randn(4, 2, 3)
    assert torch.equal(model(x)[0], lstm(x)[0])


def test_no_layers_found_is_an_error_naming_the_source() -> None:
    with pytest.raises(KCompressError) as error:
        model_from_state_dict(nn.ModuleDict({"embedding": nn.Embedding(5, 3), "norm": nn.LayerNorm(3)}).state_dict(),
                              "emb.pt")
    one_line(error, "emb.pt", "no LSTM, GRU, LSTMCell, GRUCell or Linear weights")


def test_pickled_module_with_nan_weights_is_refused(tmp_path: pathlib.Path) -> None:
    net = Net()
    with torch.no_grad():
        net.encoder[0].weight_hh_l1[0, 0] = float("inf")
    path = tmp_path / "whole.pt"
    torch.save(net, path)
    with pytest.raises(KCompressError) as error:
        model_from_checkpoint(load_checkpoint(path, trust_checkpoint=True))
    one_line(error, str(path), "encoder.0.weight_hh_l1", "NaN or Inf")


# ====================================================================== artifacts out and back
def _roundtrip(tmp_path: pathlib.Path, compressed: nn.Module, report: Any, model: Any = None) -> nn.Module:
    path = save_artifact(compressed, report, tmp_path / "model.safetensors")
    return load(path, model)


@pytest.mark.parametrize("kwargs", [{}, {"cell": "gru", "num_layers": 2, "bidirectional": True}])
def test_sequence_classifier_roundtrip_is_exact_with_and_without_a_model(tmp_path: pathlib.Path, kwargs: dict) -> None:
    dense = SequenceClassifier(6, 8, 3, **kwargs)
    compressed, report = small_compressed(dense, include=["*"], targets="ih,hh")
    compressed.eval()
    x, lengths = torch.randn(3, 5, 6), torch.tensor([5, 2, 4])
    expected = compressed(x, lengths)
    rebuilt = _roundtrip(tmp_path, compressed, report).eval()
    assert type(rebuilt) is SequenceClassifier and isinstance(rebuilt.head, CompressedLinear)
    assert torch.equal(rebuilt(x, lengths), expected)
    given = SequenceClassifier(6, 8, 3, **kwargs)
    restored = load(tmp_path / "model.safetensors", given).eval()
    assert restored is given and torch.equal(restored(x, lengths), expected)


def test_standalone_roundtrip_keeps_buffers_and_compressed_layers(tmp_path: pathlib.Path) -> None:
    state = Net().state_dict()
    compressed, report = small_compressed(model_from_state_dict(state), include=["*"])
    rebuilt = _roundtrip(tmp_path, compressed, report)
    assert isinstance(rebuilt, StandaloneModel)
    assert isinstance(rebuilt.get_submodule("encoder.0"), CompressedGRU)
    assert isinstance(rebuilt.get_submodule("cell"), CompressedLSTMCell)
    assert rebuilt.state_dict().keys() == compressed.state_dict().keys()
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in compressed.state_dict().items())
    x = torch.randn(4, 2, 6)
    assert torch.equal(rebuilt.get_submodule("encoder.0")(x)[0], compressed.get_submodule("encoder.0")(x)[0])


def test_user_model_roundtrip_and_weights_only_without_it(tmp_path: pathlib.Path) -> None:
    dense = Net().eval()
    compressed, report = small_compressed(dense, include=["encoder.0", "fc"])
    compressed.eval()
    tokens = torch.randint(0, 10, (5, 3))
    restored = _roundtrip(tmp_path, compressed, report, Net()).eval()
    assert torch.equal(restored(tokens), compressed(tokens))
    weights_only = load(tmp_path / "model.safetensors")
    assert isinstance(weights_only, StandaloneModel) and isinstance(weights_only.fc, CompressedLinear)
    assert weights_only.state_dict().keys() == compressed.state_dict().keys()
    with pytest.raises(KCompressError, match=re.escape(WEIGHTS_ONLY)):
        weights_only(tokens)


def test_root_layer_and_float64_roundtrip(tmp_path: pathlib.Path) -> None:
    lstm = nn.LSTM(4, 6, batch_first=True).double()
    compressed, report = small_compressed(lstm, targets="ih,hh")
    assert isinstance(compressed, CompressedLSTM)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    rebuilt = _roundtrip(tmp_path, compressed, report)
    assert isinstance(rebuilt, CompressedLSTM) and rebuilt.batch_first
    assert torch.equal(rebuilt(x)[0], compressed(x)[0])
    assert torch.equal(load(tmp_path / "model.safetensors", nn.LSTM(4, 6, batch_first=True))(x)[0], compressed(x)[0])


def test_shared_tensors_are_saved(tmp_path: pathlib.Path) -> None:
    model = nn.Sequential(nn.LSTM(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    model[2].weight = model[1].weight  # tied
    compressed, report = small_compressed(model)
    rebuilt = load(save_artifact(compressed, report, tmp_path / "tied.safetensors"), copy.deepcopy(model))
    assert torch.equal(rebuilt[2].weight, model[1].weight)


def test_metadata_describes_everything(tmp_path: pathlib.Path) -> None:
    source = classifier_file(tmp_path / "model.pt")
    compressed, report = compress(model_from_checkpoint(load_checkpoint(source)), "svd", rank=2, seed=7,
                                  check_speed=False)
    report.status = "failed"
    path = save_artifact(compressed, report, tmp_path / "out.safetensors", source_path=source)
    with safetensors.safe_open(str(path), "pt") as handle:
        description = json.loads(handle.metadata()[METADATA_KEY])
    assert description["versions"]["torch"] == torch.__version__ and "kcompress" in description["versions"]
    assert description["format"] == "svd" and description["seed"] == 7 and description["options"]["budget"]["rank"] == 2
    assert description["source"]["sha256"] == file_sha256(source) == report.source["sha256"]
    assert description["architecture"] == {"kind": "sequence_classifier", "kwargs": {
        "input_size": 6, "hidden_size": 8, "num_classes": 3, "num_layers": 1, "cell": "lstm",
        "bidirectional": False, "dropout": 0.0}}
    layer = description["layers"]["rnn"]
    assert layer["layer"] == compressed.rnn.layer_config()
    assert layer["matrices"]["weight_ih_l0"] == compressed.rnn.matrices["weight_ih_l0"].config()
    assert description["status"] == "failed" and description["report"]["status"] == "failed"
    assert description["report"]["matrices"][0]["matrix"] == "weight_ih_l0"


def test_load_refuses_a_model_that_does_not_fit_and_leaves_it_untouched(tmp_path: pathlib.Path) -> None:
    compressed, report = small_compressed(SequenceClassifier(6, 8, 3))
    path = save_artifact(compressed, report, tmp_path / "a.safetensors")
    for other, needle in ((SequenceClassifier(6, 8, 3, cell="gru"), "GRU"),
                          (SequenceClassifier(6, 9, 3), "hidden_size"),
                          (nn.Sequential(nn.LSTM(6, 8)), "nothing at rnn"),
                          (SequenceClassifier(6, 8, 4), "head.bias")):
        before = copy.deepcopy(other.state_dict())
        with pytest.raises(KCompressError) as error:
            load(path, other)
        one_line(error, str(path), needle)
        assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
        assert other.state_dict().keys() == before.keys()


def test_load_refuses_files_that_are_no_artifact(tmp_path: pathlib.Path) -> None:
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(KCompressError) as error:
        load(plain)
    one_line(error, str(plain), "not a kcompress artifact")
    damaged = tmp_path / "damaged.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, damaged, metadata={METADATA_KEY: '{"schema_version": 1}'})
    with pytest.raises(KCompressError) as error:
        load(damaged)
    one_line(error, str(damaged), "damaged")


# ====================================================================== atomic, never clobbering
def _artifact_inputs() -> tuple[nn.Module, Any]:
    return small_compressed(SequenceClassifier(6, 8, 3))


def test_existing_output_is_kept_unless_overwrite(tmp_path: pathlib.Path) -> None:
    compressed, report = _artifact_inputs()
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(KCompressError) as error:
        save_artifact(compressed, report, path)
    one_line(error, str(path), "--overwrite")
    assert path.read_bytes() == b"precious"
    os.chmod(path, 0o640)
    save_artifact(compressed, report, path, overwrite=True)
    assert load_checkpoint(path).kind == "artifact" and stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_new_files_get_the_umask_mode(tmp_path: pathlib.Path) -> None:
    compressed, report = _artifact_inputs()
    old = os.umask(0o027)
    try:
        path = save_artifact(compressed, report, tmp_path / "new.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_the_input_is_never_the_output(tmp_path: pathlib.Path) -> None:
    compressed, report = _artifact_inputs()
    source = classifier_file(tmp_path / "model.pt")
    before = source.read_bytes()
    link = tmp_path / "link.safetensors"
    link.symlink_to(source)
    for target in (source, tmp_path / "." / "model.pt", link):
        with pytest.raises(KCompressError) as error:
            save_artifact(compressed, report, target, overwrite=True, source_path=source)
        one_line(error, "is the input file")
    assert source.read_bytes() == before


def test_failed_write_leaves_nothing(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compressed, report = _artifact_inputs()

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(KCompressError) as error:
        save_artifact(compressed, report, tmp_path / "out.safetensors")
    one_line(error, "No space left on device")
    existing = tmp_path / "old.safetensors"
    existing.write_bytes(b"old")
    with pytest.raises(KCompressError):
        save_artifact(compressed, report, existing, overwrite=True)
    assert existing.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.safetensors"]


def test_interrupted_write_leaves_nothing(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    compressed, report = _artifact_inputs()

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "link", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_artifact(compressed, report, tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_output_directory_must_exist(tmp_path: pathlib.Path) -> None:
    compressed, report = _artifact_inputs()
    with pytest.raises(KCompressError) as error:
        save_artifact(compressed, report, tmp_path / "missing" / "out.safetensors")
    one_line(error, "does not exist")
    with pytest.raises(KCompressError) as error:
        check_output_path(tmp_path)
    one_line(error, "is a directory")
    assert list(tmp_path.iterdir()) == []


def test_output_directory_must_be_writable(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: make the check see what a user would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if pathlib.Path(p) == locked else real_access(p, mode))
    compressed, report = _artifact_inputs()
    with pytest.raises(KCompressError) as error:
        save_artifact(compressed, report, locked / "out.safetensors")
    one_line(error, str(locked), "not writable")
    assert list(locked.iterdir()) == []


def test_default_output_path_is_beside_the_input_and_never_it(tmp_path: pathlib.Path) -> None:
    source = tmp_path / "model.pt"
    assert default_output_path(source, "kcp", rank=8) == tmp_path / "model.kcp-r8.safetensors"
    assert default_output_path(source, "TT", ratio=100) == tmp_path / "model.tt-x100.safetensors"
    assert default_output_path(source, "tt", ratio=2.5) == tmp_path / "model.tt-x2.5.safetensors"
    assert default_output_path(source, "tt", rank=[2, 4]) == tmp_path / "model.tt-r2_4.safetensors"
    artifact = tmp_path / "model.kcp-r8.safetensors"
    assert default_output_path(artifact, "kcp", rank=8) != artifact
