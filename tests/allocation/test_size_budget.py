"""A size budget in bytes: the allocation meets it with the whole artifact's tensor bytes, choosing the storage."""

from __future__ import annotations

import json
import pathlib

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from torch import nn

import kcompress
from kcompress.cli import app
from kcompress.config import BudgetOptions, CompressConfig
from kcompress.errors import KCompressError
from kcompress.nn.quantize import tensor_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class ConvTagger(nn.Module):
    """A convolution, an LSTM and a Linear head: every kind of matrix a size budget counts."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(6, 16, 3, padding=1)
        self.rnn = nn.LSTM(16, 24, batch_first=True)
        self.head = nn.Linear(24, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv(x)).transpose(1, 2)
        return self.norm(self.head(self.rnn(features)[0][:, -1]))


def _model() -> ConvTagger:
    torch.manual_seed(0)
    return ConvTagger().eval()


DATA = torch.randn(48, 6, 12, generator=torch.Generator().manual_seed(1))


def _compress(size: object, **settings: object) -> tuple[nn.Module, kcompress.Report]:
    return kcompress.compress(_model(), ["svd", "tt"], size=size, include=["*"], calibration=DATA,
                              check_speed=False, **settings)


def _file_bytes(model: nn.Module, report: kcompress.Report, path: pathlib.Path) -> int:
    stored = safetensors.torch.load_file(kcompress.save_artifact(model, report, path))
    return sum(t.numel() * t.element_size() for t in stored.values())


@pytest.mark.parametrize("quantize", [None, "none", ["none", "int8", "int4"]])
@pytest.mark.parametrize("fraction", [3, 9])
def test_the_artifact_s_tensor_bytes_meet_the_budget(tmp_path, quantize, fraction: int) -> None:
    dense = tensor_bytes(_model())
    size = dense // fraction
    model, report = _compress(size, quantize=quantize)
    assert report.size_budget == size and report.model_bytes_after <= size
    assert report.model_bytes_after == _file_bytes(model, report, tmp_path / "a.safetensors")
    assert report.model_bytes_after == report.allocation["used"]  # the allocation predicted the bytes exactly
    assert report.allocation["objective"] == "bytes" and report.model_bytes_before == dense
    assert {row.layer for row in report.matrices} == {"conv", "rnn", "head"}
    assert report.quantize in ({None, "int8"} if quantize is None else {None, "int8", "int4"})
    assert f"size budget {size:,} bytes" in report.to_markdown()
    if quantize == "none":
        assert report.quantize is None


def test_the_kept_storage_has_the_lowest_estimated_error() -> None:
    size = tensor_bytes(_model()) // 3
    errors = {}
    for storage in ("none", "int8"):
        _, report = _compress(size, quantize=storage)
        errors[report.quantize] = sum(r["estimated_error"] ** 2 * r["energy"] for r in report.allocation["rows"])
    _, chosen = _compress(size)
    assert chosen.quantize == min(errors, key=errors.__getitem__)


def test_sizes_and_their_refusals() -> None:
    assert [BudgetOptions(size=value).size for value in (4096, "200KB", "1.5 MiB", "10kib", "7B")] == \
        [4096, 200_000, 1_572_864, 10_240, 7]
    for bad in ("200XB", "0KB", -1, "KB", True, 2.5):
        with pytest.raises(KCompressError, match="^size must be a positive number of bytes"):
            BudgetOptions(size=bad)
    with pytest.raises(KCompressError, match="give one budget"):
        CompressConfig.from_keywords(size="1MB", ratio=4)
    with pytest.raises(KCompressError, match="needs a size budget"):
        CompressConfig.from_keywords(ratio=4, quantize=["none", "int8"])
    with pytest.raises(KCompressError, match="quantize must be"):
        CompressConfig.from_keywords(size="1MB", quantize=["int8", "int2"])
    config = CompressConfig.from_keywords(["svd"], size="2KiB", quantize=["none", "int4"])
    assert config.allocated and CompressConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.storage.choices() == (None, "int4") and config.budget.size == 2048


def test_a_budget_below_the_untouched_tensors_names_both_sizes() -> None:
    with pytest.raises(KCompressError) as caught:
        kcompress.compress(_model(), ["svd"], size=100, include=["rnn"], calibration=DATA, check_speed=False)
    message = str(caught.value)
    assert "\n" not in message and "100 bytes" in message and "left uncompressed alone need" in message
    assert "(int8)" in message  # the smaller of the storages allowed
    with pytest.raises(KCompressError, match=r"^the size budget of 1,000 bytes is below the smallest allocation: "):
        _compress(1000, quantize="none")


def test_the_command_line_meets_a_size(tmp_path) -> None:
    source = tmp_path / "lstm.pt"
    torch.save(nn.LSTM(8, 32).state_dict(), source)
    size = tensor_bytes(nn.LSTM(8, 32)) // 6
    out, report_path = tmp_path / "small.safetensors", tmp_path / "report.json"
    result = CliRunner().invoke(app, [str(source), "--formats", "svd", "--size", f"{size}B", "--quantize",
                                      "none,int8,int4", "-o", str(out), "--report", str(report_path), "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["size_budget"] == size and report["model_bytes_after"] <= size
    stored = safetensors.torch.load_file(out)
    assert report["model_bytes_after"] == sum(t.numel() * t.element_size() for t in stored.values())
    bad = CliRunner().invoke(app, [str(source), "--size", "12XB", "-o", str(tmp_path / "b.safetensors")])
    assert bad.exit_code == 2 and "size must be a positive number of bytes" in bad.output
