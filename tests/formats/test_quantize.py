"""int8/int4 storage: exact round trips of the integers and scales, half-step accuracy, bytes that match the file."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from torch import nn

import kcompress
from kcompress.errors import KCompressError
from kcompress.formats.quantize import pack_int4, quantize, unpack_int4
from kcompress.io.quantized import SCALE_SUFFIX
from kcompress.nn import CompressedEmbedding, CompressedLinear
from kcompress.nn.quantize import quantization_rules

pytestmark = pytest.mark.usefixtures("one_torch_thread", "steady_speed")


class Tagger(nn.Module):
    """An embedding holding most parameters, a GRU and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(120, 16, padding_idx=0)
        self.rnn = nn.GRU(16, 24, batch_first=True)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.emb(x))[0][:, -1])


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_quantization_is_idempotent_and_int8_within_half_a_step(bits: int, axis) -> None:
    tensor = torch.randn(37, 11) * torch.logspace(-4, 2, 11)  # columns of very different magnitudes
    first = quantize(tensor, bits, axis)
    again = quantize(first.dequantize(), bits, axis)
    assert torch.equal(again.values, first.values) and torch.equal(again.scale, first.scale)
    if bits == 8:
        step = first.scale.reshape(-1, 1) if axis == 0 else first.scale.reshape(1, -1) if axis == 1 else first.scale
        assert bool(((first.dequantize() - tensor).abs() <= step / 2 * (1 + 1e-5)).all())
    assert int(first.values.abs().max()) <= (127 if bits == 8 else 7)
    assert torch.equal(unpack_int4(pack_int4(first.values), tuple(tensor.shape)), first.values) or bits == 8


def _compressed(model: nn.Module, **settings) -> tuple[nn.Module, kcompress.Report]:
    tokens = torch.randint(0, 120, (48, 9), generator=torch.Generator().manual_seed(1))
    return kcompress.compress(model, "svd", ratio=3, targets="all", calibration=tokens, **settings)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_artifact_round_trip_is_exact_and_bytes_match_the_file(tmp_path, quantize: str) -> None:
    dense = Tagger()
    model, report = _compressed(dense, quantize=quantize)
    assert isinstance(model.emb, CompressedEmbedding) and isinstance(model.head, CompressedLinear)
    path = kcompress.save_artifact(model, report, tmp_path / "a.safetensors")
    stored = safetensors.torch.load_file(path)
    assert report.model_bytes_after == sum(t.numel() * t.element_size() for t in stored.values())
    assert report.model_bytes_before == sum(t.numel() * t.element_size() for t in dense.state_dict().values())
    integer = {key for key, t in stored.items() if t.dtype in (torch.int8, torch.uint8)}
    assert "emb.matrices.weight.left" in integer and "rnn.bias_ih_l0" in integer
    assert all(key + SCALE_SUFFIX in stored for key in integer)
    loaded = kcompress.load(path, model=Tagger())
    tokens = torch.randint(0, 120, (6, 9))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))  # the model computes with the stored values
    again = safetensors.torch.load_file(kcompress.save_artifact(loaded, report, tmp_path / "b.safetensors"))
    assert stored.keys() == again.keys()
    assert all(torch.equal(stored[key], again[key]) for key in stored)  # integers and scales, bit for bit


def test_dequantized_factors_within_half_a_step_of_the_fitted_ones() -> None:
    dense = Tagger()
    fitted, _ = _compressed(dense)
    quantized, report = _compressed(dense, quantize="int8")
    assert report.quantize == "int8" and report.model_bytes_ratio > 3.5
    contraction = quantization_rules(fitted, "int8")
    state, dequantized = fitted.state_dict(), quantized.state_dict()
    for key, spec in contraction.items():
        scale = quantize(state[key], spec.bits, spec.axis).scale
        shape = [1] * state[key].dim()
        if spec.axis is not None:
            shape[spec.axis] = -1
        half = scale.reshape(shape) / 2 if spec.axis is not None else scale / 2
        assert bool(((dequantized[key] - state[key]).abs() <= half * (1 + 1e-5)).all()), key


def test_unquantized_bytes_and_refusals(tmp_path) -> None:
    model, report = _compressed(Tagger())
    stored = safetensors.torch.load_file(kcompress.save_artifact(model, report, tmp_path / "a.safetensors"))
    assert report.model_bytes_after == sum(t.numel() * t.element_size() for t in stored.values())
    assert report.quantize is None and "bytes" in report.to_markdown()
    with pytest.raises(KCompressError, match="quantize must be"):
        _compressed(Tagger(), quantize="int3")
