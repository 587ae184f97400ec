"""compress_file: checkpoint in, artifact out; every refusal is one line naming the problem, happens before
any fit where it can, and leaves the folder exactly as it was."""

from __future__ import annotations

import argparse
import pathlib
from typing import Any, Callable

import pytest
import torch
from torch import nn

from kcompress import KCompressError, KCompressWarning
from kcompress.formats import Factorization
from kcompress.io import default_output_path, file_sha256, load
from kcompress.io.models import SequenceClassifier
from kcompress.runs.pipeline import compress_file
from tests.io.test_io import BAD_FILES, INCONSISTENT, PNG_HEADER, _broken, one_line

# warnings are asserted with pytest.warns where they matter (it records them whatever the filters say)
pytestmark = pytest.mark.filterwarnings("ignore::kcompress.errors.KCompressWarning")
FAST = {"check_speed": False}


def _listing(folder: pathlib.Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` (to prove nothing was written or changed)."""
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def checkpoint(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "model.pt"
    torch.save(SequenceClassifier(6, 8, 3).state_dict(), path)
    return path


def test_compress_file_writes_a_loadable_artifact_beside_the_input(checkpoint: pathlib.Path) -> None:
    before = file_sha256(checkpoint)
    path, report = compress_file(checkpoint, format="kcp", rank=2, include=["*"], **FAST)
    assert path == default_output_path(checkpoint, "kcp", rank=2) and path.is_file()
    assert report.source == {"path": str(checkpoint), "kind": "state_dict", "sha256": before}
    assert file_sha256(checkpoint) == before
    assert {m.name for m in report.matrices} == {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "head.weight"}
    model = load(path).eval()
    dense = SequenceClassifier(6, 8, 3)
    dense.load_state_dict(torch.load(checkpoint, weights_only=True))
    x = torch.randn(4, 5, 6)
    error = (model(x) - dense.eval()(x)).norm() / dense(x).norm()
    assert torch.isfinite(error) and error < 1.0
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == sorted([checkpoint.name, path.name])


def test_explicit_output_and_overwrite(checkpoint: pathlib.Path) -> None:
    target = checkpoint.with_name("out.safetensors")
    compress_file(checkpoint, target, format="svd", rank=2, **FAST)
    first = file_sha256(target)
    with pytest.raises(KCompressError) as error:
        compress_file(checkpoint, target, format="svd", rank=3, **FAST)
    one_line(error, str(target), "--overwrite")
    assert file_sha256(target) == first
    compress_file(checkpoint, target, format="svd", rank=3, overwrite=True, **FAST)
    assert file_sha256(target) != first


def test_a_recompressed_artifact_has_nothing_left_to_compress(checkpoint: pathlib.Path) -> None:
    path, _ = compress_file(checkpoint, format="svd", rank=2, **FAST)
    listing = _listing(checkpoint.parent)
    with pytest.raises(KCompressError) as error:
        compress_file(path, format="svd", rank=2, **FAST)
    one_line(error, str(path), "nothing to compress")
    assert _listing(checkpoint.parent) == listing


def test_clamped_rank_is_reported_and_warned(checkpoint: pathlib.Path) -> None:
    with pytest.warns(KCompressWarning, match="rank 1000 is above"):
        _, report = compress_file(checkpoint, format="svd", rank=1000, targets="ih", **FAST)
    (row,) = [m for m in report.matrices if m.format == "svd"]
    assert row.matrix == "weight_ih_l0" and row.rank_requested == 1000
    assert row.clamped and row.rank_used == min(row.shape) == 6


# ---------------------------------------------------------------------- bad inputs: nothing written
def _no_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any fit fail the test: the refusal must come before fitting."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a fit started before the error was found")

    monkeypatch.setattr(Factorization, "fit", classmethod(refuse))


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    make, needle = BAD_FILES[case]
    path = make(tmp_path)
    listing = _listing(tmp_path)
    _no_fits(monkeypatch)
    with pytest.raises(KCompressError) as error:
        compress_file(path, format="kcp", rank=2)
    one_line(error, str(path), needle)
    assert _listing(tmp_path) == listing


def _save(obj: Any) -> Callable[[pathlib.Path], pathlib.Path]:
    def make(folder: pathlib.Path) -> pathlib.Path:
        torch.save(obj, folder / "model.pt")
        return folder / "model.pt"

    return make


BAD_CONTENT: dict[str, tuple[Callable[[pathlib.Path], pathlib.Path], str]] = {
    "unsafe globals": (_save({"state_dict": {"w": torch.zeros(2)}, "args": argparse.Namespace(a=1)}),
                       "--trust-checkpoint"),
    "whole module": (_save(nn.Sequential(nn.LSTM(3, 4))), "--trust-checkpoint"),
    "no layers": (_save({"embedding.weight": torch.zeros(5, 3), "norm.weight": torch.ones(3)}),
                  "no LSTM, GRU, LSTMCell, GRUCell or Linear weights"),
    "only linears, none included": (_save(nn.Linear(4, 3).state_dict()), "nothing to compress"),
    **{case: (_save(_broken(mutate)), tensor) for case, (mutate, tensor) in INCONSISTENT.items()},
}


@pytest.mark.parametrize("case", list(BAD_CONTENT))
def test_bad_contents(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    make, needle = BAD_CONTENT[case]
    path = make(tmp_path)
    listing = _listing(tmp_path)
    _no_fits(monkeypatch)
    with pytest.raises(KCompressError) as error:
        compress_file(path, format="kcp", rank=2)
    one_line(error, needle)
    assert _listing(tmp_path) == listing


BAD_ARGUMENTS: dict[str, tuple[dict[str, Any], str]] = {
    "rank zero": ({"format": "kcp", "rank": 0}, "rank must be a positive integer"),
    "negative rank": ({"format": "tt", "rank": -3}, "rank must be a positive integer"),
    "unknown format": ({"format": "jpeg", "rank": 2}, "unknown format 'jpeg'"),
    "rank and ratio": ({"format": "kcp", "rank": 2, "ratio": 4.0}, "exactly one of rank and ratio"),
    "mode product": ({"format": "tt", "rank": 2, "modes": ([2, 2], [3, 5])}, "weight_ih_l0"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_are_refused_before_fitting(checkpoint: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                                                  case: str) -> None:
    kwargs, needle = BAD_ARGUMENTS[case]
    listing = _listing(checkpoint.parent)
    _no_fits(monkeypatch)
    with pytest.raises(KCompressError) as error:
        compress_file(checkpoint, checkpoint.with_name("out.safetensors"), **kwargs)
    one_line(error, needle)
    assert _listing(checkpoint.parent) == listing


def test_output_problems_are_found_before_loading(checkpoint: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kcompress.runs.pipeline as pipeline

    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the checkpoint was loaded before the output was checked")

    monkeypatch.setattr(pipeline, "load_checkpoint", no_loading)
    existing = checkpoint.with_name("exists.safetensors")
    existing.write_bytes(b"keep me")
    listing = _listing(checkpoint.parent)
    cases = [(checkpoint, {}, "is the input file"), (checkpoint, {"overwrite": True}, "is the input file"),
             (existing, {}, "--overwrite"), (checkpoint.parent / "no" / "out.safetensors", {}, "does not exist"),
             (checkpoint.parent, {"overwrite": True}, "is a directory")]
    for target, extra, needle in cases:
        with pytest.raises(KCompressError) as error:
            compress_file(checkpoint, target, format="kcp", rank=2, **extra)
        one_line(error, needle)
    assert _listing(checkpoint.parent) == listing


def test_a_failing_fit_writes_nothing(checkpoint: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def diverge(*args: Any, **kwargs: Any) -> None:
        raise KCompressError("the fit diverged")

    monkeypatch.setattr(Factorization, "fit", classmethod(diverge))
    listing = _listing(checkpoint.parent)
    with pytest.raises(KCompressError, match="diverged"):
        compress_file(checkpoint, format="kcp", rank=2, **FAST)
    assert _listing(checkpoint.parent) == listing


def test_a_failing_write_leaves_nothing(checkpoint: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    listing = _listing(checkpoint.parent)
    with pytest.raises(KCompressError) as error:
        compress_file(checkpoint, format="kcp", rank=2, **FAST)
    one_line(error, "No space left on device")
    assert _listing(checkpoint.parent) == listing


def test_png_named_like_a_checkpoint(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(PNG_HEADER + bytes(64))
    with pytest.raises(KCompressError) as error:
        compress_file(path, format="kcp", rank=2)
    one_line(error, str(path), "PNG image")
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
