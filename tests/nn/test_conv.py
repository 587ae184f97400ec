"""CompressedConv1d/2d: every path equals torch's convolution with the reconstructed kernel, over a grid of
stride, padding, dilation and padding mode; selection, calibration (streamed patch moments), planning,
artifacts, TorchScript and ONNX, and ``inspect``."""

from __future__ import annotations

import itertools
import json
import pathlib

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import Tensor, nn

import kcompress
from kcompress import formats
from kcompress.calibration.conv_inputs import patch_rows
from kcompress.calibration.moments import collect_second_moments
from kcompress.cli.main import app
from kcompress.errors import KCompressError
from kcompress.nn import CompressedConv1d, CompressedConv2d, execution_of, set_execution
from kcompress.nn.conv import CompressedConv
from tests.conftest import trained_like

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FORMATS = ("svd", "kcp", "tt", "tr", "ht", "bt", "adtn")
IN, OUT = 4, 6
MODES = ("zeros", "reflect", "replicate", "circular")


def _matrix(fmt_name: str, rows: int, cols: int) -> nn.Module:
    fmt = formats.get_format(fmt_name)
    tz = fmt.default_tensorization(rows, cols)
    options = {"steps": 20} if fmt_name == "adtn" else {}
    return fmt.fit(trained_like(rows, cols), tz, 1 if fmt_name == "adtn" else 2, options=options)


def _layer(dims: int, matrix: nn.Module, kernel: tuple[int, ...], **kwargs: object) -> CompressedConv:
    """A compressed convolution with ``matrix`` as its kernel and the constructor kwargs of torch's."""
    cls = CompressedConv1d if dims == 1 else CompressedConv2d
    dense = cls.dense_type(IN, OUT, kernel, **kwargs, device="meta")  # type: ignore[call-arg]
    bias = torch.randn(OUT) if kwargs.get("bias", True) else None
    return cls(cls.dense_config(dense), {"weight": matrix}, {"bias": bias})


def _reference(layer: CompressedConv, x: Tensor) -> Tensor:
    """torch's own module with the reconstructed kernel."""
    dense = layer.dense_type(**layer.layer_config()["kwargs"])
    with torch.no_grad():
        dense.weight.copy_(layer.kernel())
        if dense.bias is not None:
            dense.bias.copy_(layer.bias)
    return dense(x)


GRID = [(stride, padding, dilation, mode) for stride, padding, dilation, mode
        in itertools.product((1, 2), (0, 1, 2, "same", "valid"), (1, 2), MODES)
        if not (padding == "same" and stride != 1) and not (mode != "zeros" and isinstance(padding, str))]


@pytest.mark.parametrize("dims", (1, 2))
@pytest.mark.parametrize("fmt_name", FORMATS)
def test_every_path_equals_torch_convolution_with_the_reconstructed_kernel(dims: int, fmt_name: str) -> None:
    kernel = (3,) if dims == 1 else (3, 2)
    matrix = _matrix(fmt_name, OUT, IN * (3 if dims == 1 else 6))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, IN, *((11,) if dims == 1 else (9, 8)), generator=generator)
    for stride, padding, dilation, mode in GRID:
        layer = _layer(dims, matrix, kernel, stride=stride, padding=padding, dilation=dilation, padding_mode=mode)
        expected = _reference(layer, x)
        for path in ("materialized", "factorized"):
            layer.set_execution({"weight": path})
            with torch.no_grad():
                out, single = layer(x), layer(x[1])
            where = f"{fmt_name} {path} stride={stride} padding={padding} dilation={dilation} mode={mode}"
            assert out.shape == expected.shape, where
            assert float((out - expected).norm() / expected.norm()) < 1e-5, where
            assert float((single - expected[1]).norm() / expected[1].norm()) < 1e-5, where


def test_the_interface_is_torch_s_and_gradients_reach_the_factors() -> None:
    dense = nn.Conv2d(IN, OUT, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=False)
    layer = CompressedConv2d.from_dense(dense, lambda name, weight, gates: _matrix("svd", *weight.shape))
    for key in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                "padding_mode"):
        assert getattr(layer, key) == getattr(dense, key), key
    assert layer.bias is None
    for path in ("materialized", "factorized"):
        layer.set_execution({"weight": path})
        layer.zero_grad()
        layer(torch.randn(2, IN, 7, 7)).square().sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.matrices["weight"].parameters())


def test_grouped_and_depthwise_convolutions_are_refused_in_one_line() -> None:
    for cls, dense, kind in ((CompressedConv2d, nn.Conv2d(4, 8, 3, groups=2), "grouped"),
                             (CompressedConv1d, nn.Conv1d(4, 4, 3, groups=4), "depthwise")):
        with pytest.raises(KCompressError, match=f"{kind} convolution; only groups=1") as error:
            cls.from_dense(dense, lambda name, weight, gates: _matrix("svd", *weight.shape))
        assert "\n" not in str(error.value)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 8, 3))
    with pytest.warns(kcompress.KCompressWarning, match="grouped convolution"):
        compressed, report = kcompress.compress(model, format="svd", rank=2, include=["*"])
    assert isinstance(compressed[0], nn.Conv2d) and isinstance(compressed[1], CompressedConv2d)
    assert [row.layer for row in report.matrices] == ["1"]


class CRNN(nn.Module):
    """Two convolutions (1-D over time, reflect padding) feeding a GRU and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(5, 12, 3, padding=1, padding_mode="reflect")
        self.conv2 = nn.Conv1d(12, 16, 5, stride=2, padding=2, dilation=1)
        self.rnn = nn.GRU(16, 12, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        features = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(self.rnn(features.transpose(1, 2))[0])


def _crnn() -> CRNN:
    torch.manual_seed(0)
    return CRNN().eval()


def test_include_globs_select_convolutions() -> None:
    model = _crnn()
    compressed, report = kcompress.compress(model, format="svd", rank=2)
    assert isinstance(compressed.conv1, nn.Conv1d) and {row.layer for row in report.matrices} == {"rnn"}
    assert any(s.name == "conv1" and "include glob" in s.reason for s in report.skipped)
    compressed, report = kcompress.compress(model, format="svd", rank=2, include=["conv*", "rnn"])
    assert isinstance(compressed.conv2, CompressedConv1d) and isinstance(compressed.head, nn.Linear)
    conv2 = next(row for row in report.matrices if row.layer == "conv2")
    assert conv2.shape == (16, 12 * 5) and conv2.params_after == 2 * (16 + 60)


def test_patch_moments_are_streamed_and_equal_the_full_unfold() -> None:
    conv = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), padding_mode="replicate")
    x = torch.randn(7, 3, 10, 9, dtype=torch.float64)
    padded = F.pad(x, conv._reversed_padding_repeated_twice, mode="replicate")
    full = F.unfold(padded, conv.kernel_size, dilation=conv.dilation, stride=conv.stride).transpose(1, 2)
    full = full.reshape(-1, full.shape[-1])
    chunks = list(patch_rows(conv, x, budget=3 * full.numel() * 8 // 7))  # 3 samples per chunk
    assert len(chunks) == 3 and [c.shape[0] for c in chunks] == [3 * full.shape[0] // 7] * 2 + [full.shape[0] // 7]
    streamed = sum(c.T @ c for c in chunks)
    torch.testing.assert_close(streamed, full.T @ full)

    model, data = _crnn(), torch.randn(40, 5, 30)
    moments = collect_second_moments(model, data, samples=40, holdout=0.25)
    fit_rows = [i for i in range(40) if i not in _held(40)]
    inputs = data[fit_rows].double()
    padded = F.pad(inputs, model.conv1._reversed_padding_repeated_twice, mode="reflect")
    rows = F.unfold(padded.unsqueeze(2), (1, 3)).transpose(1, 2).reshape(-1, 15)
    torch.testing.assert_close(moments["conv1.weight"].fit, rows.T @ rows / rows.shape[0])
    assert moments["conv1.weight"].rows == rows.shape[0] and moments["conv2.weight"].fit.shape == (60, 60)


def _held(total: int) -> list[int]:
    """The held-out rows :func:`calibration_set` draws for seed 0 and a quarter held out."""
    held = round(0.25 * total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(0))[:held].tolist()


def test_calibration_fits_convolutions_to_their_patches() -> None:
    model, data = _crnn(), torch.randn(64, 5, 30)
    reference = model(data)

    def error(compressed: nn.Module) -> float:
        with torch.no_grad():
            return float((compressed(data) - reference).norm() / reference.norm())

    plain, _ = kcompress.compress(model, format="svd", rank=3, include=["conv*"])
    calibrated, report = kcompress.compress(model, format="svd", rank=3, include=["conv*"], calibration=data)
    rows = {row.layer: row for row in report.matrices}
    assert rows["conv2"].output_error_after < rows["conv2"].output_error_before
    assert error(calibrated) < error(plain)


def test_the_allocator_budgets_convolutions_with_the_recurrent_matrices() -> None:
    model, data = _crnn(), torch.randn(32, 5, 30)
    compressed, report = kcompress.compress(model, format=["svd"], ratio=3, allocate="auto", include=["*"],
                                            calibration=data)
    assert {row.layer for row in report.matrices} == {"conv1", "conv2", "rnn", "head"}
    assert report.compression_ratio == pytest.approx(3, rel=0.2)


def test_planning_materializes_unless_the_factors_are_clearly_or_measurably_faster() -> None:
    small = _layer(2, _matrix("svd", OUT, IN * 9), (3, 3), padding=1)
    assert set_execution(small, "auto", measure=False) == {"": {"weight": "materialized"}}
    set_execution(small, "auto")  # measured: either path, the choice recorded as "auto"
    assert small.requested == {"weight": "auto"}
    big = nn.Conv2d(512, 512, 3, padding=1)
    layer = CompressedConv2d.from_dense(big, lambda name, weight, gates: formats.SVD.fit(
        weight, formats.SVD.default_tensorization(*weight.shape), 8))
    assert set_execution(layer, "auto", measure=False) == {"": {"weight": "factorized"}}  # 1/37 of the MACs


@pytest.mark.slow
def test_artifacts_load_trace_and_onnx(tmp_path: pathlib.Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    model, data = _crnn(), torch.randn(4, 5, 30)
    compressed, report = kcompress.compress(model, format="svd", rank=3, include=["conv*"],
                                            overrides={"conv2": {"format": "kcp", "rank": 2}})  # im2col path
    compressed.conv1.set_execution({"weight": "factorized"})
    compressed.conv2.set_execution({"weight": "materialized"})
    path = kcompress.io.save_artifact(compressed, report, tmp_path / "crnn.safetensors")
    loaded = kcompress.load(path, model=_crnn())
    assert isinstance(loaded.conv2, CompressedConv1d) and loaded.conv1.padding_mode == "reflect"
    expected = compressed(data)
    torch.testing.assert_close(loaded(data), expected)
    assert execution_of(loaded)["conv1"] == {"weight": "factorized"}
    for plan in ("factorized", "materialized"):
        set_execution(loaded, plan)
        traced = torch.jit.trace(loaded, data)
        torch.testing.assert_close(traced(data), expected, rtol=1e-5, atol=1e-5)
        onnx_path = tmp_path / f"{plan}.onnx"
        torch.onnx.export(loaded, (data,), str(onnx_path), dynamo=False)
        session = onnxruntime.InferenceSession(str(onnx_path))
        out = session.run(None, {session.get_inputs()[0].name: data.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(KCompressError, match="conv2"):
        wrong = _crnn()
        wrong.conv2 = nn.Conv1d(12, 16, 5, stride=2, padding=2, dilation=2)
        kcompress.load(path, model=wrong)


def test_inspect_lists_convolutions_with_parameters_and_macs(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "crnn.pt"
    torch.save(_crnn(), path)
    result = CliRunner().invoke(app, ["inspect", str(path), "--trust-checkpoint", "--json", "--formats", "svd",
                                      "--ranks", "2"])
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    conv2 = next(layer for layer in listing["layers"] if layer["name"] == "conv2")
    assert conv2["type"] == "Conv1d" and conv2["default"] == "with --include" and conv2["params"] == 16 * 60 + 16
    matrix = next(m for m in listing["matrices"] if m["name"] == "conv2.weight")
    assert matrix["shape"] == [16, 60] and not matrix["default"] and "per output position" in matrix["title"]
    assert matrix["options"][0]["params"] == 2 * (16 + 60) and matrix["options"][0]["macs"] == 2 * (16 + 60)
