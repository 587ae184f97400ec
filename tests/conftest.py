"""Shared fixtures: deterministic seeds, and small 'trained-like' weight matrices."""

from __future__ import annotations

import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE_LSTM = ROOT / "examples" / "japanese_vowels" / "lstm.pt"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def steady_speed(monkeypatch) -> None:
    """compress() times every compressed matrix against its dense product; on tiny matrices that is noise (and a
    ratio that rounds to 0 breaks the check), so in-process runs get a fixed one. Use with
    ``pytestmark = pytest.mark.usefixtures("steady_speed")``."""
    from kcompress.nn.speed import Speed

    monkeypatch.setattr("kcompress.runs.convert.measured_speedup", lambda matrix, *args, **kwargs: Speed(0.5, 0.0))


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for tests of tiny ops: a second one only adds contention on a shared 2-core machine.
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def trained_like(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A matrix with a decaying spectrum and smooth structure plus noise, as trained RNN weights have."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, min(rows, cols), generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, min(rows, cols), generator=generator, dtype=torch.float64))
    spectrum = 1.0 / (1.0 + torch.arange(min(rows, cols), dtype=torch.float64)) ** 0.8
    smooth = torch.outer(torch.linspace(-1, 1, rows, dtype=torch.float64), torch.linspace(0, 2, cols, dtype=torch.float64))
    return ((u * spectrum) @ v.T + 0.05 * torch.sin(3 * smooth)).float()
