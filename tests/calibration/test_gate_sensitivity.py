"""Gate-row weights of the data-aware objective (kcompress.calibration.gate_sensitivity), checked against autograd on the
cell equations (streamed through nn.LSTM/nn.GRU: tests/calibration/test_calibrate.py; through cells: here); the weighted
closed form and the weighted report."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from kcompress import compress
from kcompress.calibration.gate_sensitivity import gru_sensitivities, lstm_sensitivities
from kcompress.calibration.moments import calibration_set, collect_second_moments
from kcompress.formats import output_error, whitened_svd
from kcompress.io.models import SequenceClassifier


def _lstm_step(pre: torch.Tensor, cell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_t, tanh-free h_t parts)``: torch's LSTM cell equations on pre-activations ``(B, 4H)``."""
    i, f, g, o = pre.chunk(4, dim=-1)
    new_cell = f.sigmoid() * cell + i.sigmoid() * g.tanh()
    return new_cell, o.sigmoid() * new_cell.detach().tanh()


def autograd_lstm(pre: torch.Tensor, cell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's sensitivities by autograd: ``d c_t / d z`` for the i, f, g rows, ``d h_t / d z`` (c_t held)
    for the o rows (each unit's rows move only that unit); and ``c_t``."""
    pre = pre.detach().requires_grad_(True)
    new_cell, hidden = _lstm_step(pre, cell)
    (through_cell,) = torch.autograd.grad(new_cell.sum(), pre)
    (through_hidden,) = torch.autograd.grad(hidden.sum(), pre)
    size = cell.shape[-1]
    return torch.cat([through_cell[:, : 3 * size], through_hidden[:, 3 * size :]], dim=-1), new_cell.detach()


def autograd_gru(pre_ih: torch.Tensor, pre_hh: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``d h' / d pre_ih`` and ``d h' / d pre_hh`` by autograd on torch's GRU cell equations."""
    pre_ih, pre_hh = pre_ih.detach().requires_grad_(True), pre_hh.detach().requires_grad_(True)
    a_r, a_z, a_n = pre_ih.chunk(3, dim=-1)
    b_r, b_z, b_n = pre_hh.chunk(3, dim=-1)
    reset, update = (a_r + b_r).sigmoid(), (a_z + b_z).sigmoid()
    new = (a_n + reset * b_n).tanh()
    output = (1 - update) * new + update * hidden
    return torch.autograd.grad(output.sum(), (pre_ih, pre_hh))


def test_lstm_sensitivities_are_the_one_step_derivatives() -> None:
    generator = torch.Generator().manual_seed(0)
    pre = 2 * torch.randn(5, 3, 16, generator=generator, dtype=torch.float64)
    c0 = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    cell, expected = c0, []
    for step in range(5):
        slopes, cell = autograd_lstm(pre[step], cell)
        expected.append(slopes.square())
    torch.testing.assert_close(lstm_sensitivities(pre, c0), torch.stack(expected))


def test_gru_sensitivities_are_the_one_step_derivatives() -> None:
    generator = torch.Generator().manual_seed(1)
    pre_ih, pre_hh = (2 * torch.randn(7, 12, generator=generator, dtype=torch.float64) for _ in range(2))
    hidden = torch.randn(7, 4, generator=generator, dtype=torch.float64)
    ih, hh = gru_sensitivities(pre_ih, pre_hh, hidden)
    expected_ih, expected_hh = autograd_gru(pre_ih, pre_hh, hidden)
    torch.testing.assert_close(ih, expected_ih.square())
    torch.testing.assert_close(hh, expected_hh.square())
    assert not torch.allclose(ih, hh)  # the reset gate scales W_hh's n rows only


def test_weighted_whitened_svd_is_the_optimum() -> None:
    """Eckart–Young on the row-weighted outputs ``D^{1/2} W X``."""
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(12, 8, generator=generator, dtype=torch.float64)
    inputs = torch.randn(200, 8, generator=generator, dtype=torch.float64) @ torch.diag(torch.logspace(0, -2, 8, dtype=torch.float64))
    moment = inputs.T @ inputs / len(inputs)
    rows = torch.logspace(-2, 1, 12, dtype=torch.float64)
    for rank in (1, 3, 5):
        left, right = whitened_svd(weight, moment, rank, row_weights=rows)
        outputs = rows.sqrt()[:, None] * weight @ inputs.T
        u, s, vh = torch.linalg.svd(outputs, full_matrices=False)
        best = torch.linalg.norm(outputs - (u[:, :rank] * s[:rank]) @ vh[:rank]) / torch.linalg.norm(outputs)
        assert output_error(weight, left @ right, moment, rows) == pytest.approx(float(best), rel=1e-8, abs=1e-10)
        unweighted = whitened_svd(weight, moment, rank)
        assert output_error(weight, unweighted[0] @ unweighted[1], moment, rows) > float(best)


@pytest.mark.parametrize("gate_weights", [True, False])
def test_report_errors_are_the_weighted_output_errors(gate_weights: bool) -> None:
    torch.manual_seed(0)
    model = SequenceClassifier(6, 8, 3, cell="gru")
    lengths = torch.randint(2, 9, (40,))
    data = (torch.randn(40, 8, 6) * (torch.arange(8)[None, :, None] < lengths[:, None, None]), lengths)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressed, report = compress(model, "tt", ratio=2, targets="ih,hh", check_speed=False, calibration=data,
                                      calibrate_samples=32, calibrate_options={"iterations": 20, "ridge": 1.0,
                                                                               "gate_weights": gate_weights})
    moments = collect_second_moments(model, data, ["rnn"], samples=32)
    for row in report.matrices:
        moment = moments[f"rnn.{row.matrix}"]
        approximation = compressed.rnn.matrices[row.matrix].reconstruct()
        rows = moment.row_weights if gate_weights else None
        expected = output_error(getattr(model.rnn, row.matrix), approximation, moment.holdout, rows)
        assert row.output_error_after == pytest.approx(expected, rel=1e-5)
        assert row.output_error_after <= row.output_error_before
    caption = report.to_markdown()
    assert f"ridge 1.0, gate-row weights {'on' if gate_weights else 'off'}" in caption
    assert ("(rows weighted by gate)" in caption) == gate_weights


class _Stepped(nn.Module):
    """An ``nn.LSTMCell`` or ``nn.GRUCell`` stepped through ``x (B, T, F)`` by hand."""

    def __init__(self, cell: nn.RNNCellBase) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = None
        for step in range(x.shape[1]):
            state = self.cell(x[:, step], state)
        return state[0] if isinstance(state, tuple) else state


@pytest.mark.parametrize("kind", [nn.LSTMCell, nn.GRUCell])
def test_cells_row_weights_match_their_steps(kind: type) -> None:
    torch.manual_seed(2)
    model = _Stepped(kind(3, 4))
    data = torch.randn(12, 5, 3)
    calibration = calibration_set(data, samples=64, holdout=0.25, seed=0)
    moments = collect_second_moments(model, calibration)
    cell = model.cell
    total = {"weight_ih": 0, "weight_hh": 0}
    count = 0
    with torch.no_grad():
        for (x,) in calibration.fit:
            h = torch.zeros(x.shape[0], 4)
            c = torch.zeros_like(h)
            for step in range(x.shape[1]):
                pre_ih = x[:, step] @ cell.weight_ih.T + cell.bias_ih
                pre_hh = h @ cell.weight_hh.T + cell.bias_hh
                if kind is nn.LSTMCell:
                    with torch.enable_grad():
                        slopes, _ = autograd_lstm(pre_ih + pre_hh, c)
                    per_matrix = (slopes, slopes)
                    h, c = cell(x[:, step], (h, c))
                else:
                    with torch.enable_grad():
                        per_matrix = autograd_gru(pre_ih, pre_hh, h)
                    h = cell(x[:, step], h)
                for name, slopes in zip(total, per_matrix):
                    total[name] = total[name] + slopes.square().sum(0)
                count += x.shape[0]
    for name, value in total.items():
        expected = value / count
        torch.testing.assert_close(moments[f"cell.{name}"].row_weights, (expected / expected.mean()).double(),
                                   atol=1e-5, rtol=1e-4)
