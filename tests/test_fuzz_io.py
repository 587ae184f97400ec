"""Fuzzing load_checkpoint with random bytes and with truncated or damaged valid files (torch.save zip and
legacy pickle, safetensors, kcompress artifact): it must return a checkpoint or raise KCompressError,
never another exception, and never hang (each call runs under an alarm). Then the same for artifact
metadata (mutated keys, types, sizes, nesting) and tensors, ``load(model=...)`` into models of other shapes,
evaluation data files, and the write path; artifact loads also run with a bounded address space."""

from __future__ import annotations

import contextlib
import copy
import json
import pathlib
import re
import resource
import signal
import warnings
from typing import Any, Iterator, Optional

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torch import nn

from kcompress import KCompressError, compress, evaluate, load_data_file
from kcompress.io import Checkpoint, atomic_write, check_output_paths, load, load_checkpoint, save_artifact
from kcompress.io.models import SequenceClassifier

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
