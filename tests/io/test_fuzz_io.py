"""Fuzzing load_checkpoint with random bytes and with truncated or damaged valid files (torch.save zip and
legacy pickle, safetensors, kcompress artifact): it must return a checkpoint or raise KCompressError,
never another exception, and never hang (each call runs under an alarm). Then the same for artifact
metadata (mutated keys, types, sizes, nesting) and tensors, ``load(model=...)`` into models of other shapes,
evaluation data files, and the write path; artifact loads also run with a bounded address space."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import pathlib
import re
import resource
import signal
import stat
import time
import warnings
from typing import Any, Iterator, Optional

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from kcompress import KCompressError, compress, compress_file, evaluate, finetune, load_data_file
from kcompress.io import (
    Checkpoint,
    atomic_write,
    check_output_paths,
    load,
    load_checkpoint,
    model_from_state_dict,
    save_artifact,
)
from kcompress.io.files import available_memory
from kcompress.io.models import SequenceClassifier
from kcompress.tuning.evaluate import EvalSpec, load_evaluation

SECONDS_PER_CALL = 10
FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Hang(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise Hang(f"load_checkpoint ran for more than {SECONDS_PER_CALL} s")


def _valid_files(folder: pathlib.Path) -> dict[str, bytes]:
    """The bytes of one valid file of each kind, made from one small classifier."""
    model = SequenceClassifier(3, 4, 2)
    torch.save(model.state_dict(), folder / "zip.pt")
    torch.save(model.state_dict(), folder / "legacy.pt", _use_new_zipfile_serialization=False)
    safetensors.torch.save_file(model.state_dict(), folder / "plain.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressed, report = compress(model, "kcp", rank=2, include=["*"], check_speed=False)
    save_artifact(compressed, report, folder / "artifact.safetensors")
    return {path.name: path.read_bytes() for path in folder.iterdir()}


#: the files of :func:`_valid_files` and the kind each loads as
KINDS = {"zip.pt": "state_dict", "legacy.pt": "state_dict", "plain.safetensors": "safetensors",
         "artifact.safetensors": "artifact"}


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return _valid_files(tmp_path_factory.mktemp("valid"))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("fuzz") / "input.bin"


@pytest.fixture(autouse=True)
def _alarm_handler() -> Iterator[None]:
    previous = signal.signal(signal.SIGALRM, _alarm)
    yield
    signal.signal(signal.SIGALRM, previous)


def load_or_refuse(path: pathlib.Path, data: bytes) -> None:
    """Write ``data`` and load it: a Checkpoint or a one-line KCompressError, within the time limit."""
    path.write_bytes(data)
    signal.alarm(SECONDS_PER_CALL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = load_checkpoint(path)
        assert isinstance(result, Checkpoint)
    except KCompressError as error:
        assert "\n" not in str(error) and str(path) in str(error)
    finally:
        signal.alarm(0)


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes(scratch: pathlib.Path, data: bytes) -> None:
    load_or_refuse(scratch, data)


@FUZZ
@given(prefix=st.sampled_from([b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95", b"\x10\x00\x00\x00\x00\x00\x00\x00{"]),
       rest=st.binary(max_size=2048))
def test_random_bytes_behind_each_magic_number(scratch: pathlib.Path, prefix: bytes, rest: bytes) -> None:
    load_or_refuse(scratch, prefix + rest)


@FUZZ
@given(name=st.sampled_from(sorted(KINDS)), fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_valid_files(scratch: pathlib.Path, valid: dict[str, bytes], name: str, fraction: float) -> None:
    data = valid[name]
    load_or_refuse(scratch, data[: int(len(data) * fraction)])


@FUZZ
@given(name=st.sampled_from(sorted(KINDS)), value=st.integers(0, 255),
       positions=st.lists(st.floats(0.0, 1.0, exclude_max=True), min_size=1, max_size=4))
def test_damaged_valid_files(scratch: pathlib.Path, valid: dict[str, bytes], name: str, value: int,
                             positions: list[float]) -> None:
    data = bytearray(valid[name])
    for position in positions:
        data[int(len(data) * position)] = value
    load_or_refuse(scratch, bytes(data))


def test_every_valid_file_loads(scratch: pathlib.Path, valid: dict[str, bytes]) -> None:
    assert sorted(valid) == sorted(KINDS)
    for name, data in valid.items():
        scratch.write_bytes(data)
        assert load_checkpoint(scratch).kind == KINDS[name]


# ---------------------------------------------------------------------- artifact metadata, load(model=...)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
#: what the mutations may set a size-like value to
SIZES = st.sampled_from([-1, 0, 1, 3, 7, 40000, 200000, 2**31, 2**62])


@contextlib.contextmanager
def bounded_memory(extra: int = 2 << 30) -> Iterator[None]:
    """Address space limited to what the process uses now plus ``extra`` bytes: an attempt to allocate what
    a crafted file declares fails at once instead of swapping (the test then sees it in the message)."""
    used = int(re.search(r"VmSize:\s+(\d+) kB", pathlib.Path("/proc/self/status").read_text()).group(1)) * 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (used + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value in a JSON tree."""
    found = [prefix]
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in items:
        found += _paths(child, prefix + (key,))
    return found


def _mutated(description: dict, data: st.DataObject) -> dict:
    description = copy.deepcopy(description)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(description)[1:]))
        parent = description
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["size", "value", "delete", "nest"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "nest":
            parent[path[-1]] = json.loads("[" * 200 + "]" * 200)
        else:
            parent[path[-1]] = data.draw(SIZES if action == "size" else JSON_VALUES)
    return description


def load_artifact_or_refuse(path: pathlib.Path, model: Optional[nn.Module] = None) -> None:
    """``load`` returns a module or raises a one-line KCompressError, in time, without a large allocation."""
    before = None if model is None else copy.deepcopy(model.state_dict())
    signal.alarm(SECONDS_PER_CALL)
    try:
        with warnings.catch_warnings(), bounded_memory():
            warnings.simplefilter("ignore")
            assert isinstance(load(path, model), nn.Module)
    except KCompressError as error:
        message = str(error)
        assert "\n" not in message and len(message) < 700 and "allocate" not in message, message
        if before is not None:  # a refused load leaves the user's model as it was
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    finally:
        signal.alarm(0)


@pytest.fixture(scope="module")
def artifact(valid: dict[str, bytes]) -> tuple[dict[str, torch.Tensor], dict]:
    data = valid["artifact.safetensors"]
    tensors = safetensors.torch.load(data)
    size = int.from_bytes(data[:8], "little")
    return tensors, json.loads(json.loads(data[8:8 + size])["__metadata__"]["kcompress"])


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_mutated_artifact_metadata(scratch: pathlib.Path, artifact: tuple, data: st.DataObject) -> None:
    tensors, description = artifact
    metadata = json.dumps(_mutated(description, data))
    scratch.write_bytes(safetensors.torch.save(tensors, metadata={"kcompress": metadata}))
    load_artifact_or_refuse(scratch)


@FUZZ
@given(keep=st.lists(st.booleans(), min_size=12, max_size=12),
       dtype=st.sampled_from([None, torch.float64, torch.int32]),
       scale=st.sampled_from([1.0, float("nan"), float("inf")]))
def test_artifact_tensors_dropped_retyped_or_poisoned(scratch: pathlib.Path, artifact: tuple, keep: list[bool],
                                                      dtype: Optional[torch.dtype], scale: float) -> None:
    tensors, description = artifact
    names = sorted(tensors)
    changed = {n: t for i, (n, t) in enumerate(tensors.items()) if keep[i % len(keep)] or i % 5}
    victim = names[sum(keep) % len(names)]
    if victim in changed:
        changed[victim] = (changed[victim] * scale).to(dtype or changed[victim].dtype)
    scratch.write_bytes(safetensors.torch.save(changed, metadata={"kcompress": json.dumps(description)}))
    load_artifact_or_refuse(scratch)


@FUZZ
@given(hidden=st.sampled_from([3, 4, 5]), layers=st.integers(1, 2), cell=st.sampled_from(["lstm", "gru"]),
       bidirectional=st.booleans(), classes=st.sampled_from([1, 2, 3]), features=st.sampled_from([2, 3]))
def test_load_into_any_user_model(scratch: pathlib.Path, valid: dict[str, bytes], hidden: int, layers: int, cell: str,
                                  bidirectional: bool, classes: int, features: int) -> None:
    scratch.write_bytes(valid["artifact.safetensors"])
    load_artifact_or_refuse(scratch, SequenceClassifier(features, hidden, classes, layers, cell, bidirectional))


# ---------------------------------------------------------------------- evaluation data files
ARRAYS = st.sampled_from([np.float32, np.float64, np.int64, np.int8, np.bool_]).flatmap(
    lambda dtype: st.lists(st.integers(0, 4), min_size=0, max_size=4).map(
        lambda shape: (np.arange(int(np.prod(shape))) % 7 - 2).reshape(shape).astype(dtype)))


@FUZZ
@given(inputs=ARRAYS, targets=ARRAYS, lengths=st.none() | ARRAYS, poison=st.sampled_from([None, np.nan, np.inf]))
def test_evaluation_data_files(scratch: pathlib.Path, inputs: np.ndarray, targets: np.ndarray,
                               lengths: Optional[np.ndarray], poison: Optional[float]) -> None:
    if poison is not None and inputs.dtype.kind == "f" and inputs.size:
        inputs = inputs.copy()
        inputs.flat[0] = poison
    path = scratch.with_suffix(".npz")
    np.savez(path, inputs=inputs, targets=targets, **({} if lengths is None else {"lengths": lengths}))
    signal.alarm(SECONDS_PER_CALL)
    try:
        score = evaluate(SequenceClassifier(3, 4, 2), load_data_file(path))
        assert 0.0 <= score <= 1.0
    except KCompressError as error:
        assert "\n" not in str(error)
    finally:
        signal.alarm(0)


# ---------------------------------------------------------------------- the write path
SEGMENTS = st.sampled_from(["a", "b", "file", "missing", "..", ".", "d ir", "ü", "x.safetensors"])


@FUZZ
@given(segments=st.lists(SEGMENTS, min_size=1, max_size=3), overwrite=st.booleans(), report=st.booleans())
def test_write_path(tmp_path_factory: pytest.TempPathFactory, valid: dict[str, bytes], segments: list[str],
                    overwrite: bool, report: bool) -> None:
    root = tmp_path_factory.mktemp("write")
    (root / "a").mkdir()
    (root / "a" / "x.safetensors").write_bytes(b"old")
    (root / "file").write_bytes(b"a file")
    source = root / "a" / "input.pt"
    source.write_bytes(b"input")
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    target = root.joinpath(*segments)
    outputs = {"--output": target, "--report": root / "a" / "r.json" if report else None}
    try:
        check_output_paths(outputs, overwrite=overwrite, source=source)
        atomic_write(target, b"new", overwrite)
    except KCompressError as error:
        assert "\n" not in str(error)
        assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    else:
        assert target.read_bytes() == b"new" and source.read_bytes() == b"input"
    assert not [p for p in root.rglob("*") if p.name.endswith(".kcompress-tmp")]


# ---------------------------------------------------------------------- hardening round 2 (issue 29)
def _best_of(runs: int, action: Any) -> float:
    """The shortest of ``runs`` timings of ``action()`` (seconds): the least disturbed by a busy machine."""
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        timings.append(time.perf_counter() - start)
    return min(timings)


def test_recognition_is_linear_in_the_number_of_tensors() -> None:
    """8 times the tensors take about 8 times as long (64 times when quadratic, as it was)."""
    def build(count: int) -> Any:
        state = {f"l{i}.weight": torch.zeros(2, 2) for i in range(count)}
        return lambda: model_from_state_dict(state)

    small, large = _best_of(2, build(500)), _best_of(2, build(4000))
    assert large < 30 * small + 0.2, (small, large)


@pytest.mark.parametrize("kind", ["zip", "safetensors"])
def test_a_checkpoint_with_too_many_tensors_is_refused_before_loading(tmp_path: pathlib.Path, kind: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kcompress.io.checkpoint.MAX_TENSORS", 40)
    state = {f"l{i}.weight": torch.zeros(1) for i in range(41)}
    path = tmp_path / f"many.{kind}"
    torch.save(state, path) if kind == "zip" else safetensors.torch.save_file(state, path)
    with pytest.raises(KCompressError, match=r"holds 41 tensors, more than the 40"):
        load_checkpoint(path)


def _sparse(path: pathlib.Path, size: int, head: bytes = b"") -> pathlib.Path:
    """A file of ``size`` bytes that takes no disk space: ``head``, then zeros."""
    with open(path, "wb") as handle:
        handle.write(head)
        handle.truncate(size)
    return path


def test_a_large_file_is_told_from_its_first_bytes(tmp_path: pathlib.Path) -> None:
    """A 3 GB file of zeros is no checkpoint and no artifact, known from its first bytes: read with 64 MB of
    address space to spare, in well under a second."""
    path = _sparse(tmp_path / "zeros.pt", 3 << 30)
    start = time.perf_counter()
    with bounded_memory(64 << 20):
        with pytest.raises(KCompressError, match="not a checkpoint"):
            load_checkpoint(path)
        with pytest.raises(KCompressError, match="not a kcompress artifact"):
            load(path)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("head", [b"\x80\x02", b"PK\x03\x04", b"\x20\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 30])
def test_a_checkpoint_larger_than_the_memory_left_is_refused_unread(tmp_path: pathlib.Path, head: bytes) -> None:
    """10 GB that start like a checkpoint, under an address-space limit of 1 GB more than in use: one line,
    nothing allocated (an unexpected MemoryError before)."""
    path = _sparse(tmp_path / "big.pt", 10 << 30, head)
    with bounded_memory(1 << 30), pytest.raises(KCompressError) as refused:
        load_checkpoint(path)
    message = str(refused.value)
    assert "\n" not in message and ("memory available" in message or "corrupt" in message), message


def test_available_memory_follows_the_address_space_limit() -> None:
    with bounded_memory(256 << 20):
        assert available_memory() <= 300 << 20


def _legacy(path: pathlib.Path, obj: Any, protocol: int = 2) -> pathlib.Path:
    torch.save(obj, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    return path


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("nested", [False, True], ids=["module", "under-state_dict"])
def test_legacy_pickles_are_refused_naming_their_globals(tmp_path: pathlib.Path, protocol: int, nested: bool) -> None:
    """torch's pre-zip format, a whole module or one under ``state_dict``: the refusal lists the globals, also
    through compress_file; protocol 4 (which torch's weights-only loader cannot read at all) too."""
    path = _legacy(tmp_path / "legacy.pt", {"state_dict": nn.LSTM(3, 4)} if nested else nn.LSTM(3, 4), protocol)
    for attempt in (lambda: load_checkpoint(path), lambda: compress_file(path, tmp_path / "out.safetensors", rank=2)):
        with pytest.raises(KCompressError) as refused:
            attempt()
        message = str(refused.value)
        assert "needs the Python globals torch.nn.modules.rnn.LSTM" in message and "\n" not in message, message
        assert "UnpicklingError" not in message and "corrupt" not in message
    assert load_checkpoint(path, trust_checkpoint=True).kind == "module"
    assert not (tmp_path / "out.safetensors").exists()


def test_a_protocol_4_legacy_state_dict_gets_the_reason_not_corrupt(tmp_path: pathlib.Path) -> None:
    path = _legacy(tmp_path / "weights.pt", nn.LSTM(3, 4).state_dict(), protocol=4)
    with pytest.raises(KCompressError, match=r"weights-only loader cannot read it \(Unsupported operand 149 "
                                             r"\(pickle protocol 4"):
        load_checkpoint(path)
    assert load_checkpoint(path, trust_checkpoint=True).kind == "state_dict"


@pytest.mark.parametrize("state", [
    {"rnn.weight_ih_l0": torch.zeros(256, 0), "rnn.weight_hh_l0": torch.zeros(256, 64)},
    {"weight_ih": torch.zeros(48, 0), "weight_hh": torch.zeros(48, 16)},
    {"rnn.weight_ih_l0": torch.zeros(0, 3), "rnn.weight_hh_l0": torch.zeros(0, 0)},
], ids=["lstm", "cell", "no-hidden"])
def test_empty_layer_matrices_are_one_line(tmp_path: pathlib.Path, state: dict) -> None:
    path = tmp_path / "empty.pt"
    torch.save(state, path)
    for attempt in (lambda: model_from_state_dict(state),
                    lambda: compress_file(path, tmp_path / "o.safetensors", rank=2)):
        with pytest.raises(KCompressError, match=r"cannot be empty"):
            attempt()


def test_nan_in_an_untouched_tensor_of_an_artifact_is_refused(tmp_path: pathlib.Path) -> None:
    """The classifier head is not compressed; NaN in it was accepted by load (and `kcompress eval`)."""
    compressed, report = compress(SequenceClassifier(3, 4, 2), "svd", rank=1, check_speed=False)
    path = save_artifact(compressed, report, tmp_path / "a.safetensors")
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    tensors = safetensors.torch.load(data)
    tensors["head.weight"] = torch.full_like(tensors["head.weight"], float("nan"))
    metadata = json.loads(data[8:8 + size])["__metadata__"]
    path.write_bytes(safetensors.torch.save(tensors, metadata=metadata))
    with pytest.raises(KCompressError, match=r"head\.weight contains NaN or Inf values"):
        load(path)
    with pytest.raises(KCompressError, match=r"head\.weight contains NaN"):
        load_checkpoint(path)


def test_special_files_are_never_replaced(tmp_path: pathlib.Path) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    for target in (fifo, pathlib.Path("/dev/null")):
        with pytest.raises(KCompressError, match="not a regular file"):
            check_output_paths({"--output": target}, overwrite=True)
    with pytest.raises(KCompressError, match="is a FIFO, not a regular file"):
        atomic_write(fifo, b"data", overwrite=True)
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and _names_in(tmp_path) == ["pipe.safetensors"]


def _names_in(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_an_npz_that_inflates_beyond_the_memory_left_is_refused_before_inflating(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """8 MB of zeros stored in a few kB, with 4 MB to spare: one line from the declared sizes; and an .npy
    header that claims more than its member holds."""
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, inputs=np.zeros((1000, 50, 40), np.float32), targets=np.zeros(1000, np.int64))
    assert path.stat().st_size < 100_000
    monkeypatch.setattr("kcompress.io.files.available_memory", lambda: 4 << 20)
    with pytest.raises(KCompressError, match=r"the data takes 8\.0 MB.*more than the 4\.2 MB of memory available"):
        load_data_file(path)
    monkeypatch.undo()
    lying = tmp_path / "lying.npz"
    np.savez(lying, inputs=np.zeros((2, 3, 4), np.float32), targets=np.zeros(2, np.int64))
    lying.write_bytes(lying.read_bytes().replace(b"(2, 3, 4)", b"(2, 3, 9999)"))
    with pytest.raises(KCompressError, match="declares|cannot read data file"):
        load_data_file(lying)


def test_fractional_lengths_are_refused(tmp_path: pathlib.Path) -> None:
    inputs, targets = np.zeros((3, 8, 2), np.float32), np.zeros(3, np.int64)
    np.savez(tmp_path / "frac.npz", inputs=inputs, targets=targets, lengths=np.array([8.0, 7.5, 2.0]))
    with pytest.raises(KCompressError, match=r"lengths must be whole numbers of time steps, got 7\.5 \(sample 1\)"):
        load_data_file(tmp_path / "frac.npz")
    np.savez(tmp_path / "whole.npz", inputs=inputs, targets=targets, lengths=np.array([8.0, 7.0, 2.0]))
    assert load_data_file(tmp_path / "whole.npz").lengths.tolist() == [8, 7, 2]


class _Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.rnn, self.head = nn.Embedding(50, 8), nn.GRU(8, 16, batch_first=True), nn.Linear(16, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.emb(tokens))[0][:, -1])


@pytest.mark.parametrize("model, inputs, needle", [
    (_Tagger(), np.arange(60).reshape(10, 6) % 57, r"token ids go up to 56, but the model's Embedding has 50 entries"),
    (_Tagger(), np.zeros((10, 6, 8), np.float32), r"holds float features \(batch, time, 8\), but the model starts "
                                                  r"with an Embedding \(50 entries\): it takes integer token ids"),
    (SequenceClassifier(8, 16, 3), np.ones((10, 6), np.int64), r"holds integer token ids \(batch, time\), but the "
                                                               r"model takes float features \(batch, time, 8\)"),
    (SequenceClassifier(8, 16, 3), np.zeros((10, 6, 13), np.float32), r"holds float features \(batch, time, 13\)"),
], ids=["ids-beyond-vocabulary", "floats-into-embedding", "ids-into-float-model", "wrong-width"])
def test_data_that_does_not_fit_the_model_is_one_line(tmp_path: pathlib.Path, model: nn.Module, inputs: np.ndarray,
                                                      needle: str) -> None:
    path = tmp_path / "data.npz"
    np.savez(path, inputs=inputs, targets=np.zeros(10, np.int64))
    with pytest.raises(KCompressError, match=needle):
        finetune(model, load_data_file(path), epochs=1)
    evaluation = load_evaluation(EvalSpec(data=str(path)))
    with pytest.raises(KCompressError, match=f"^{re.escape(str(path))}: |^{re.escape(str(path))} holds"):
        evaluation.measure(model)
    with pytest.raises(KCompressError, match=needle) as error:  # kcompress.evaluate called directly
        evaluate(model, load_data_file(path))
    assert "\n" not in str(error.value)


def test_kcp_never_stopping_early_runs_every_iteration() -> None:
    """``min_error_change=0`` (documented: never stop early) ran into TensorLy's UnboundLocalError."""
    _, report = compress(nn.LSTM(12, 16), "kcp", rank=2, order=3, check_speed=False,
                         fit_options={"min_error_change": 0, "max_iterations": 7})
    assert [row.iterations for row in report.matrices] == [7, 7]


def test_finetune_data_is_used_with_a_builtin_dataset(tmp_path: pathlib.Path) -> None:
    """``--finetune-data FILE`` with ``--eval japanese-vowels``: the file is the fine-tuning data (it was the
    built-in train split, silently), and a file that does not fit the model is refused before any fit."""
    path = tmp_path / "train.npz"
    np.savez(path, inputs=np.zeros((7, 5, 13), np.float32), targets=np.zeros(7, np.int64))
    evaluation = load_evaluation(EvalSpec(data="japanese-vowels", finetune_data=str(path)))
    assert len(evaluation.train_data) == 7 and evaluation.train_description == str(path)
    with pytest.raises(KCompressError, match=f"^{re.escape(str(path))} holds float features \\(batch, time, 13\\)"):
        evaluation.measure(SequenceClassifier(12, 16, 9))
