"""Compressed models (kcp with explicit modes, svd and dense matrices) through ``torch.jit.trace`` and
``torch.onnx.export`` + onnxruntime; PackedSequence input is refused with a clear error (see
``kcompress.nn.recurrent``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from kcompress.errors import KCompressError
from kcompress.formats import KCP, SVD, Dense
from kcompress.nn import COMPRESSED_TYPES, CompressedLinear

INPUT, HIDDEN, CLASSES, BATCH, STEPS = 16, 8, 5, 3, 6


pytestmark = pytest.mark.slow  # examples, subprocesses or exports: seconds each


def mixed(name: str, weight: Tensor, gates: int) -> nn.Module:
    """kcp with explicit modes on the first input matrix, truncated svd on the others and the head, dense hh."""
    if name == "weight_ih_l0":
        tz = KCP.default_tensorization(*weight.shape, out_modes=(2 * gates, 4), in_modes=(4, 4), out_group=gates)
        return KCP.fit(weight, tz, 3)
    if name.startswith("weight_hh"):
        return Dense.fit(weight, Dense.default_tensorization(*weight.shape), 1)
    return SVD.fit(weight, SVD.default_tensorization(*weight.shape), 4)


class Tagger(nn.Module):
    """``x (B, T, F)`` [+ initial state] -> per-step logits ``(B, T, C)`` and the final state tensors."""

    def __init__(self, rnn: type[nn.RNNBase]) -> None:
        super().__init__()
        dense = rnn(INPUT, HIDDEN, num_layers=2, batch_first=True, bidirectional=True)
        self.rnn = COMPRESSED_TYPES[rnn].from_dense(dense, mixed)
        self.head = CompressedLinear.from_dense(nn.Linear(2 * HIDDEN, CLASSES), mixed)

    def forward(self, x: Tensor, h0: Tensor, c0: Optional[Tensor] = None) -> tuple[Tensor, ...]:
        output, hx = self.rnn(x, h0 if c0 is None else (h0, c0))
        return (self.head(output),) + (hx if isinstance(hx, tuple) else (hx,))


def inputs(rnn: type[nn.RNNBase]) -> tuple[Tensor, ...]:
    """Input and initial state(s) for :class:`Tagger`."""
    state = [torch.randn(4, BATCH, HIDDEN) for _ in range(2 if rnn is nn.LSTM else 1)]
    return (torch.randn(BATCH, STEPS, INPUT), *state)


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
def test_jit_trace_matches_eager(rnn: type[nn.RNNBase]) -> None:
    torch.manual_seed(0)
    model = Tagger(rnn).eval()
    traced = torch.jit.trace(model, inputs(rnn))
    fresh = inputs(rnn)  # same shapes, other values than the trace's
    with torch.no_grad():
        for got, expected in zip(traced(*fresh), model(*fresh)):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
def test_onnx_export_runs_in_onnxruntime(rnn: type[nn.RNNBase], tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(1)
    model = Tagger(rnn).eval()
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, inputs(rnn), path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    fresh = inputs(rnn)
    got = session.run(None, {arg.name: value.numpy() for arg, value in zip(session.get_inputs(), fresh)})
    with torch.no_grad():
        expected = model(*fresh)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e.numpy(), atol=1e-4, rtol=0)


class PackingTagger(nn.Module):
    """Packs its input by length before the RNN (as ``kcompress.io.models.SequenceClassifier`` does)."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = COMPRESSED_TYPES[nn.LSTM].from_dense(nn.LSTM(INPUT, HIDDEN), mixed)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        output, _ = self.rnn(pack_padded_sequence(x, lengths, enforce_sorted=False))
        return pad_packed_sequence(output)[0]


def causes(error: BaseException) -> list[BaseException]:
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    return chain


def test_packed_sequence_is_refused_by_trace_and_onnx_export(tmp_path: Path) -> None:
    model = PackingTagger().eval()
    args = (torch.randn(STEPS, BATCH, INPUT), torch.tensor([6, 2, 4]))
    with pytest.raises(KCompressError, match="PackedSequence input cannot be traced or exported"):
        torch.jit.trace(model, args)
    with pytest.raises(Exception) as info:
        torch.onnx.export(model, args, tmp_path / "packed.onnx")
    assert any(isinstance(error, KCompressError) for error in causes(info.value)), info.value
    assert model(*args).shape == (STEPS, BATCH, HIDDEN)  # eager use is unaffected
