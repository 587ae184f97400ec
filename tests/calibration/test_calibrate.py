"""Calibration: streamed second moments, data-aware fits, layer-ordered calibration and unlabeled distillation."""

from __future__ import annotations

import warnings
from typing import Optional

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kcompress import compress
from kcompress.calibration.moments import calibration_set, collect_second_moments
from kcompress.errors import KCompressError
from kcompress.formats import DataFitSettings, get_format, output_error, whitened_svd
from kcompress.io.models import SequenceClassifier
from kcompress.tuning.agreement import best_index
from kcompress.tuning.data import SequenceData
from tests.calibration.test_gate_sensitivity import autograd_gru, autograd_lstm


def _correlated(rows: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(size, size, generator=generator, dtype=torch.float64) * torch.logspace(0, -2, size)
    return torch.randn(rows, size, generator=generator, dtype=torch.float64) @ mixing


def test_whitened_svd_is_the_optimum() -> None:
    """Eckart–Young on the outputs: the best rank-r ``Ŵ X`` is the truncated SVD of ``W X``."""
    weight = torch.randn(12, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    inputs = _correlated(200, 8, 1)
    moment = inputs.T @ inputs / len(inputs)
    for rank in (1, 3, 5):
        left, right = whitened_svd(weight, moment, rank)
        outputs = weight @ inputs.T
        u, s, vh = torch.linalg.svd(outputs, full_matrices=False)
        best = torch.linalg.norm(outputs - (u[:, :rank] * s[:rank]) @ vh[:rank]) / torch.linalg.norm(outputs)
        assert output_error(weight, left @ right, moment) == pytest.approx(float(best), rel=1e-8, abs=1e-10)
        plain = torch.linalg.svd(weight)  # the plain truncation is worse on these inputs
        approx = (plain.U[:, :rank] * plain.S[:rank]) @ plain.Vh[:rank]
        assert output_error(weight, approx, moment) > float(best)


@pytest.mark.parametrize("name", ["svd", "kcp", "tt", "ht"])
def test_refinement_never_raises_the_held_out_error(name: str) -> None:
    weight = torch.randn(16, 16, generator=torch.Generator().manual_seed(2))
    fit_inputs, other = _correlated(300, 16, 3), _correlated(300, 16, 4)
    moment = fit_inputs.T @ fit_inputs / 300
    fmt = get_format(name)
    tz = fmt.default_tensorization(16, 16)
    for holdout in (moment, other.T @ other / 300):  # same distribution, and a different one
        module = fmt.fit(weight, tz, fmt.rank_for_ratio(tz, 3))
        info = module.fit_to_data(weight, moment, holdout, DataFitSettings(iterations=30))
        assert info.after <= info.before
        assert output_error(weight, module.reconstruct(), holdout) == pytest.approx(info.after, rel=1e-5)
        assert module.reconstruct().dtype == torch.float32
    assert info.method == ("closed form" if name == "svd" else "auto")


def _direct_moments(rnn: nn.RNNBase, calls: list) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``Σ x xᵀ`` and ``Σ s²`` (gate-row sensitivities by autograd on the cell equations) per matrix by stepping
    torch cells through each sequence's real steps."""
    cell_type = nn.LSTMCell if isinstance(rnn, nn.LSTM) else nn.GRUCell
    sums: dict[str, torch.Tensor] = {}
    sensitivities: dict[str, torch.Tensor] = {}
    suffixes = ("", "_reverse") if rnn.bidirectional else ("",)
    for call in calls:
        x = call[0]  # batch first
        lengths = call[1] if len(call) > 1 else torch.full((x.shape[0],), x.shape[1])
        for b in range(x.shape[0]):
            sequence = x[b, : lengths[b]].double()
            for layer in range(rnn.num_layers):
                outputs = []
                for suffix in suffixes:
                    cell = cell_type(sequence.shape[1], rnn.hidden_size).double()
                    for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                        getattr(cell, kind).data = getattr(rnn, f"{kind}_l{layer}{suffix}").data.double()
                    steps = sequence.flip(0) if suffix else sequence
                    h = torch.zeros(1, rnn.hidden_size, dtype=torch.float64)
                    state = (h, torch.zeros_like(h)) if cell_type is nn.LSTMCell else h
                    hidden = []
                    for t in range(len(steps)):
                        pre_ih = steps[t : t + 1] @ cell.weight_ih.T + cell.bias_ih
                        pre_hh = h @ cell.weight_hh.T + cell.bias_hh
                        if cell_type is nn.LSTMCell:
                            slopes = autograd_lstm(pre_ih + pre_hh, state[1])[0]
                            per_matrix = (slopes, slopes)
                        else:
                            per_matrix = autograd_gru(pre_ih, pre_hh, h)
                        for kind, vector, slopes in zip(("weight_ih", "weight_hh"), (steps[t : t + 1], h), per_matrix):
                            key = f"rnn.{kind}_l{layer}{suffix}"
                            sums[key] = sums.get(key, 0) + vector.T @ vector
                            sensitivities[key] = sensitivities.get(key, 0) + slopes[0].square()
                        state = cell(steps[t : t + 1], state)
                        h = state[0] if cell_type is nn.LSTMCell else state
                        hidden.append(h[0])
                    hidden_t = torch.stack(hidden)
                    outputs.append(hidden_t.flip(0) if suffix else hidden_t)
                sequence = torch.cat(outputs, dim=1).detach()
    return sums, sensitivities


class _Padded(nn.Module):
    """A batch-first RNN run on padded input (every step real)."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("packed", [True, False])
def test_statistics_match_a_direct_computation(cell: str, packed: bool) -> None:
    """Second moments and gate-row weights (packed sequences: only real steps count; 2 layers, both
    directions)."""
    torch.manual_seed(5)
    if packed:
        model = SequenceClassifier(3, 4, 2, num_layers=2, cell=cell, bidirectional=True)
        x = torch.randn(10, 6, 3)
        lengths = torch.randint(1, 7, (10,))
        data = (x * (torch.arange(6)[None, :, None] < lengths[:, None, None]), lengths)
    else:
        model = _Padded((nn.LSTM if cell == "lstm" else nn.GRU)(3, 4, num_layers=2, bidirectional=True,
                                                               batch_first=True))
        data = torch.randn(10, 5, 3)
    calibration = calibration_set(data, samples=64, holdout=0.3, seed=1)
    moments = collect_second_moments(model, calibration, ["rnn"])
    direct, sensitivities = _direct_moments(model.rnn, calibration.fit)
    assert set(direct) == set(moments)
    for name, value in direct.items():
        rows = moments[name].rows
        torch.testing.assert_close(moments[name].fit, value / rows, atol=1e-5, rtol=1e-4)
        assert moments[name].fit.dtype == torch.float64
        weights, expected = moments[name].row_weights, sensitivities[name] / rows
        assert weights is not None and weights.shape == (4 * (4 if cell == "lstm" else 3),)
        torch.testing.assert_close(weights, expected / expected.mean(), atol=1e-5, rtol=1e-4)


def _classifier() -> tuple[SequenceClassifier, SequenceData]:
    torch.manual_seed(0)
    model = SequenceClassifier(6, 8, 3)
    lengths = torch.randint(2, 9, (40,))
    x = torch.randn(40, 8, 6) * (torch.arange(8)[None, :, None] < lengths[:, None, None])
    return model, SequenceData(x, torch.zeros(40, dtype=torch.long), lengths)


def _compress(model: nn.Module, data: object, fmt: str = "kcp", options: Optional[dict] = None,
              **kwargs: object) -> tuple:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compress(model, fmt, ratio=2, targets="ih,hh", check_speed=False, calibration=data,
                        calibrate_samples=32, calibrate_options={"iterations": 20, "ridge": 1.0, **(options or {})},
                        **kwargs)


def test_calibration_without_labels_from_each_data_form() -> None:
    model, data = _classifier()
    forms = {
        "sequence data": data,
        "tuple of inputs": (data.inputs, data.lengths),
        "tensor": data.inputs,
        "loader of (inputs, targets)": DataLoader(TensorDataset(data.inputs, data.lengths, data.targets),
                                                  batch_size=8, collate_fn=lambda b: ((torch.stack([s[0] for s in b]),
                                                  torch.stack([s[1] for s in b])), torch.stack([s[2] for s in b]))),
        "iterable of inputs": [data.inputs[i : i + 10] for i in range(0, 40, 10)],
    }
    for form, value in forms.items():
        _, report = _compress(model, value, fmt="svd")
        assert report.calibration["samples"] + report.calibration["holdout_samples"] == 32, form
        for row in report.matrices:
            assert row.output_error_after <= row.output_error_before, form
            assert row.calibration_samples == report.calibration["samples"]


def test_same_seed_same_factors_and_separate_gates() -> None:
    model, data = _classifier()
    first, _ = _compress(model, data, fmt="tt", seed=3)
    second, _ = _compress(model, data, fmt="tt", seed=3)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    stacked, report = _compress(model, data, fmt="svd", gates="separate")
    assert all(row.output_error_after <= row.output_error_before for row in report.matrices)
    assert stacked.rnn.matrices["weight_hh_l0"].parts[0].left.dtype == torch.float32


def test_layer_ordered_and_dense_sources_and_distillation() -> None:
    torch.manual_seed(1)
    model = SequenceClassifier(6, 8, 3, num_layers=2)
    _, data = _classifier()
    _, ordered = _compress(model, data, fmt="svd", options={"source": "compressed"})
    _, dense = _compress(model, data, fmt="svd")
    # layer 0 sees the same inputs either way; layer 1's inputs come from the compressed layer 0 or not
    assert ordered.matrices[0].output_error_after == pytest.approx(dense.matrices[0].output_error_after)
    assert ordered.matrices[2].output_error_before != pytest.approx(dense.matrices[2].output_error_before)
    compressed, report = _compress(model, data, fmt="svd", distill_epochs=2, options={"ridge": "auto"})
    candidates = report.calibration["fit_candidates"]  # every ridge with and without gate-row weights
    grid = [(g, r) for g in (True, False) for r in (1, 0.1, 0.01)]  # then the best again if it was screened
    assert [(c["gate_weights"], c["ridge"]) for c in candidates][:6] == grid
    chosen = candidates[best_index(candidates)]  # the held-out decisions, then the logit error
    assert (report.calibration["ridge"], report.calibration["gate_weights"]) == (chosen["ridge"], chosen["gate_weights"])
    record = report.calibration["distill"]
    assert record["epochs_run"] >= 1 and "argmax_agreement" in record["agreement"]
    assert compressed.rnn.matrices["weight_ih_l0"].left.requires_grad


def test_calibration_errors_are_one_line() -> None:
    model, data = _classifier()
    with pytest.raises(KCompressError, match="distill_epochs needs calibration"):
        compress(model, "svd", ratio=2, distill_epochs=1)
    with pytest.raises(KCompressError, match="unknown calibrate_options"):
        _compress(model, data, options={"steps": 3})
    with pytest.raises(KCompressError, match="at least 2"):
        calibration_set(data.inputs[:1])
    with pytest.raises(KCompressError, match="calibration data must be"):
        calibration_set(3)


def test_cli_calibrates_a_plain_state_dict_from_an_unlabeled_file(tmp_path) -> None:
    import json

    import numpy as np
    from click.testing import CliRunner

    from kcompress.cli.main import app

    model, data = _classifier()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    np.savez(tmp_path / "inputs.npz", inputs=data.inputs.numpy(), lengths=data.lengths.numpy())  # no targets
    result = CliRunner().invoke(app, [
        str(tmp_path / "model.pt"), "--format", "svd", "--ratio", "2", "--targets", "ih,hh", "--calibrate",
        str(tmp_path / "inputs.npz"), "--calibrate-samples", "20", "--distill-epochs", "1", "--distill-lr", "0.05", "-q",
        "--report", str(tmp_path / "report.json"), "-o", str(tmp_path / "out.safetensors")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["calibration"]["samples"] + report["calibration"]["holdout_samples"] == 20
    assert report["calibration"]["distill"]["epochs_run"] == 1
    assert report["options"]["calibration"]["distill_lr"] == 0.05
    assert all(row["output_error_after"] is not None for row in report["matrices"])
    usage = CliRunner().invoke(app, [str(tmp_path / "model.pt"), "--format", "svd", "--ratio", "2",
                                     "--distill-epochs", "1"])
    assert usage.exit_code == 2 and "--calibrate" in usage.output
    for rate in ("0", "-1", "nan", "fast"):
        bad = CliRunner().invoke(app, [str(tmp_path / "model.pt"), "--format", "svd", "--ratio", "2", "--calibrate",
                                       str(tmp_path / "inputs.npz"), "--distill-epochs", "1", "--distill-lr", rate])
        assert bad.exit_code == 2 and "is not a positive number or 'auto'" in bad.output
    result = CliRunner().invoke(app, [
        str(tmp_path / "model.pt"), "--format", "svd", "--ratio", "2", "--targets", "ih,hh", "--calibrate",
        str(tmp_path / "inputs.npz"), "--calibrate-samples", "20", "--distill-epochs", "1", "-q", "--report",
        str(tmp_path / "auto.json"), "-o", str(tmp_path / "auto.safetensors")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "auto.json").read_text())
    assert report["options"]["calibration"]["distill_lr"] == "auto"
    assert [c["lr"] for c in report["calibration"]["distill"]["lr_candidates"]] == [1e-3, 1e-2]
