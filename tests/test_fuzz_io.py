"""Fuzzing load_checkpoint with random bytes and with truncated or damaged valid files (torch.save zip and
legacy pickle, safetensors, kcompress artifact): it must return a checkpoint or raise KCompressError,
never another exception, and never hang (each call runs under an alarm)."""

from __future__ import annotations

import pathlib
import signal
import warnings
from typing import Iterator

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kcompress import KCompressError, compress
from kcompress.io import Checkpoint, load_checkpoint, save_artifact
from kcompress.models import SequenceClassifier

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
