"""compress(): layer selection, per-matrix settings, exactness against the dense model, and the report's
numbers checked against independent computation."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from kcompress import KCompressError, KCompressWarning, compress
from kcompress.fitting.planning import NOTHING_MATCHED
from kcompress.formats import FORMATS, Dense, Stack, get_format
from kcompress.formats.kcp import KCP
from kcompress.formats.svd import SVD
from kcompress.nn import CompressedGRU, CompressedGRUCell, CompressedLinear, CompressedLSTM, CompressedLSTMCell
from kcompress.nn.speed import Speed
from kcompress.report.record import validate_report_dict

# warnings are asserted with pytest.warns where they matter (it records them whatever the filters say)
pytestmark = pytest.mark.filterwarnings("ignore::kcompress.errors.KCompressWarning")


class Classifier(nn.Module):
    """tokens ``(B, T)`` -> embedding -> 2-layer LSTM -> Linear -> logits ``(B, 5)``."""

    def __init__(self, cell: type[nn.Module] = nn.LSTM, hidden: int = 24) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.rnn = cell(16, hidden, num_layers=2, batch_first=True, dropout=0.5)
        self.head = nn.Linear(hidden, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        output, _ = self.rnn(self.embed(tokens))
        return self.head(output[:, -1])


class Nested(nn.Module):
    """Two RNNs (LSTM, then bidirectional GRU) inside nested containers, and a head in a Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList([nn.LSTM(8, 16), nn.GRU(16, 12, bidirectional=True)])})
        self.decoder = nn.Sequential(nn.Linear(24, 6), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lstm, gru = self.encoder["layers"]
        x, _ = lstm(x)
        x, _ = gru(x)
        return self.decoder(x)


class Cells(nn.Module):
    """An LSTMCell and a GRUCell unrolled over ``x (T, B, 8)``."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm_cell = nn.LSTMCell(8, 12)
        self.gru_cell = nn.GRUCell(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state, h = None, None
        for step in x:
            state = self.lstm_cell(step, state)
            h = self.gru_cell(state[0], h)
        return h


def make(cls: type[nn.Module], *args: object) -> nn.Module:
    torch.manual_seed(0)
    return cls(*args).eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(1))


def rows_by_name(report) -> dict:
    return {row.name: row for row in report.matrices}


def param_numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------- exactness
@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("gates", ["fused", "separate"])
def test_full_rank_svd_reproduces_dense_outputs(cell: type[nn.Module], gates: str) -> None:
    model = make(Classifier, cell)
    compressed, report = compress(model, "svd", rank=1000, targets="ih,hh", include=["*"], gates=gates)
    assert isinstance(compressed.rnn, CompressedLSTM if cell is nn.LSTM else CompressedGRU)
    assert isinstance(compressed.head, CompressedLinear)
    assert compressed.embed is not model.embed and isinstance(compressed.embed, nn.Embedding)
    assert not compressed.rnn.training  # eval mode kept: the 0.5 dropout between layers stays off
    x = tokens()
    torch.testing.assert_close(compressed(x), model(x), atol=1e-4, rtol=0)
    assert len(report.matrices) == 5 and all(row.format == "svd" for row in report.matrices)


def test_cells_full_rank_svd_reproduces_dense_outputs() -> None:
    model = make(Cells)
    compressed, _ = compress(model, "svd", rank=100, targets=["ih", "hh"])
    assert isinstance(compressed.lstm_cell, CompressedLSTMCell) and isinstance(compressed.gru_cell, CompressedGRUCell)
    x = torch.randn(5, 2, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(compressed(x), model(x), atol=1e-4, rtol=0)


def kcp_representable(tz, rank: int, generator: torch.Generator) -> torch.Tensor:
    """``Σ_r kron(A_r, B_r)`` with ``A_r (m_1, n_1)``, ``B_r (m_2, n_2)``: exactly KCP rank ``rank``."""
    (m1, m2), (n1, n2) = tz.out_modes, tz.in_modes
    terms = [torch.kron(torch.randn(m1, n1, generator=generator), torch.randn(m2, n2, generator=generator))
             for _ in range(rank)]
    return 0.3 * torch.stack(terms).sum(0)


def test_kcp_on_exactly_representable_weight_reproduces_outputs() -> None:
    lstm = make(nn.LSTM, 16, 8)
    tz = KCP.default_tensorization(32, 16, out_group=4)
    assert tz.order == 2 and tz.padding == (0, 0)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(kcp_representable(tz, 3, torch.Generator().manual_seed(3)))
    compressed, report = compress(lstm, "kcp", rank=3, targets="ih")  # only ih is exactly representable
    assert isinstance(compressed, CompressedLSTM)  # the model itself was the layer
    row = rows_by_name(report)["weight_ih_l0"]
    assert row.modes == tz.describe() and row.rank_used == 3 and row.relative_error < 1e-6
    x = torch.randn(6, 2, 16, generator=torch.Generator().manual_seed(4))
    (out, (h, c)), (ref, (h_ref, c_ref)) = compressed(x), lstm(x)
    for got, want in ((out, ref), (h, h_ref), (c, c_ref)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------- the input model
def test_inplace_false_leaves_the_input_untouched() -> None:
    model = make(Classifier)
    before = copy.deepcopy(model.state_dict())
    compressed, _ = compress(model, "kcp", rank=2, include=["*"])
    assert compressed is not model
    assert type(model.rnn) is nn.LSTM and type(model.head) is nn.Linear
    assert model.state_dict().keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_inplace_true_replaces_in_the_given_model() -> None:
    model = make(Classifier)
    compressed, _ = compress(model, "svd", rank=4, inplace=True)
    assert compressed is model and isinstance(model.rnn, CompressedLSTM)


def test_shared_module_replaced_at_every_path() -> None:
    lstm = nn.LSTM(8, 8)
    model = nn.ModuleDict({"a": lstm, "b": nn.Sequential(lstm)})
    compressed, report = compress(model, "svd", rank=2)
    assert compressed["a"] is compressed["b"][0] and isinstance(compressed["a"], CompressedLSTM)
    assert [row.layer for row in report.matrices] == ["a", "a"]


# ---------------------------------------------------------------------- selection
def test_default_targets_are_every_recurrent_matrix() -> None:
    model = make(Classifier)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KCompressWarning)  # nothing left dense: no warning about it
        compressed, report = compress(model, "svd", rank=4, check_speed=False)
    assert {row.name: row.format for row in report.matrices} == {
        f"rnn.weight_{kind}_l{layer}": "svd" for kind in ("ih", "hh") for layer in range(2)
    }
    assert report.options["selection"]["targets"] == "ih,hh"


def test_warns_when_a_fit_explains_almost_nothing_or_the_output_grows() -> None:
    torch.manual_seed(0)
    noise = nn.Sequential(nn.Linear(128, 128))  # a Gaussian matrix: rank 1 explains ~3% of its energy
    with pytest.warns(KCompressWarning, match=r"0\.weight: the fit explains almost nothing \(relative error 0\.9"):
        compress(noise, "svd", rank=1, include=["*"], check_speed=False)
    small = nn.Sequential(nn.Linear(64, 64))
    with pytest.warns(KCompressWarning, match=r"compressed is larger than dense: 8,192 vs 4,096 parameters "
                                              r"\(0\.50x; grown: 0\.weight\)"):
        compress(small, "svd", rank=64, include=["*"], check_speed=False)


def test_targets_ih_keeps_hidden_to_hidden_dense_and_exact() -> None:
    model = make(Classifier)
    with pytest.warns(KCompressWarning, match=r"2 recurrent matrices left dense by targets='ih' \(.*parameters, "
                                              r"e\.g\. rnn\.weight_hh_l0\): the model ratio is"):
        compressed, report = compress(model, "kcp", rank=2, targets="ih")
    for layer in range(2):
        hh = compressed.rnn.matrices[f"weight_hh_l{layer}"]
        assert isinstance(hh, Dense) and torch.equal(hh.weight, getattr(model.rnn, f"weight_hh_l{layer}"))
        assert isinstance(compressed.rnn.matrices[f"weight_ih_l{layer}"], KCP)
    rows = rows_by_name(report)
    assert rows["rnn.weight_hh_l0"].format == "dense" and rows["rnn.weight_hh_l0"].rank_used is None
    assert rows["rnn.weight_hh_l0"].relative_error == 0.0 and rows["rnn.weight_ih_l0"].format == "kcp"


def test_linear_compressed_only_when_included() -> None:
    model = make(Classifier)
    default, report = compress(model, "svd", rank=3)
    assert type(default.head) is nn.Linear
    assert [(s.name, s.layer_type) for s in report.skipped] == [("head", "Linear")]
    assert "include" in report.skipped[0].reason
    included, report = compress(model, "svd", rank=3, include=["rnn", "head"])
    assert isinstance(included.head, CompressedLinear) and report.skipped == []


def test_nested_containers_two_rnns_include_exclude() -> None:
    model = make(Nested)
    compressed, report = compress(model, "svd", rank=4, include=["encoder.*", "decoder.*"], exclude=["*.1"])
    lstm, gru = compressed.encoder["layers"]
    assert isinstance(lstm, CompressedLSTM) and type(gru) is nn.GRU
    assert isinstance(compressed.decoder[0], CompressedLinear)
    assert {s.name: s.reason for s in report.skipped} == {"encoder.layers.1": "excluded by '*.1'"}
    assert {row.layer for row in report.matrices} == {"encoder.layers.0", "decoder.0"}


@pytest.mark.parametrize("gates", ["fused", "separate"])
def test_lstm_and_gru_gate_handling(gates: str) -> None:
    model = make(Nested)
    compressed, report = compress(model, "kcp", rank=2, gates=gates, targets="ih,hh")
    lstm, gru = compressed.encoder["layers"]
    expected = {"fused": (KCP, KCP), "separate": (Stack, Stack)}[gates]
    assert isinstance(lstm.matrices["weight_ih_l0"], expected[0])
    assert isinstance(gru.matrices["weight_hh_l0_reverse"], expected[1])
    if gates == "separate":
        assert len(lstm.matrices["weight_ih_l0"].parts) == 4 and len(gru.matrices["weight_ih_l0"].parts) == 3
        assert all(part.tensorization.out_features == 12 for part in gru.matrices["weight_hh_l0"].parts)
        assert rows_by_name(report)["encoder.layers.0.weight_ih_l0"].modes.startswith("4×")
    else:  # fused: the gate axis folded into the first output mode
        tz = lstm.matrices["weight_ih_l0"].tensorization
        assert tz.out_features == 64 and tz.out_modes[0] % 4 == 0
    assert len(report.matrices) == 2 + 4  # LSTM: ih, hh; bidirectional GRU: 2 per direction


def test_proj_size_lstm_skipped_with_reason() -> None:
    model = nn.ModuleDict({"proj": nn.LSTM(8, 16, proj_size=4), "gru": nn.GRU(8, 8)})
    with pytest.warns(KCompressWarning, match="proj_size"):
        compressed, report = compress(model, "svd", rank=2)
    assert type(compressed["proj"]) is nn.LSTM and isinstance(compressed["gru"], CompressedGRU)
    assert [s.name for s in report.skipped] == ["proj"] and "proj_size" in report.skipped[0].reason


def test_nothing_to_compress_is_reported_not_raised() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(KCompressWarning, match=NOTHING_MATCHED):
        compressed, report = compress(model, "kcp", rank=2)
    assert compressed is not model and type(compressed[0]) is nn.Linear
    assert report.matrices == [] and NOTHING_MATCHED in report.warnings
    assert [s.name for s in report.skipped] == ["0", "2"]
    assert report.model_params_before == report.model_params_after == param_numel(model)
    validate_report_dict(json.loads(report.to_json()))


# ---------------------------------------------------------------------- ranks and settings
def test_rank_clamping_warns_and_records() -> None:
    model = make(Classifier)
    tz = KCP.default_tensorization(96, 16, out_group=4)
    with pytest.warns(KCompressWarning, match=rf"rnn\.weight_ih_l0: rank 1000 .* using rank {KCP.max_rank(tz)}"):
        _, report = compress(model, "kcp", rank=1000)
    row = rows_by_name(report)["rnn.weight_ih_l0"]
    assert row.clamped and row.rank_requested == 1000 and row.rank_used == KCP.max_rank(tz)
    assert any("rank 1000" in w for w in report.warnings)


@pytest.mark.parametrize(("fmt", "ratio"), [("kcp", 3.0), ("svd", 2.5)])
def test_ratio_picks_largest_rank_within_budget(fmt: str, ratio: float) -> None:
    model = make(Classifier)
    compressed, report = compress(model, fmt, ratio=ratio, targets="ih,hh")
    cls = get_format(fmt)
    for row in report.matrices:
        budget = row.shape[0] * row.shape[1] / ratio
        matrix = getattr(compressed, row.layer).matrices[row.matrix]
        assert param_numel(matrix) <= budget
        tz = matrix.tensorization
        assert row.rank_used == cls.max_rank(tz) or cls.param_count(tz, row.rank_used + 1) > budget


def test_overrides_later_globs_win() -> None:
    model = make(Classifier)
    overrides = {
        "rnn": {"rank": 2},
        "rnn.weight_ih_l1": {"format": "svd", "rank": 5},
        "rnn.weight_hh_*": {"ratio": 4.0},
        "head": {"order": 3},
    }
    compressed, report = compress(model, "kcp", rank=3, targets="ih,hh", include=["*"], overrides=overrides)
    rows = rows_by_name(report)
    assert (rows["rnn.weight_ih_l0"].format, rows["rnn.weight_ih_l0"].rank_used) == ("kcp", 2)
    assert (rows["rnn.weight_ih_l1"].format, rows["rnn.weight_ih_l1"].rank_used) == ("svd", 5)
    assert isinstance(compressed.rnn.matrices["weight_ih_l1"], SVD)
    hh = compressed.rnn.matrices["weight_hh_l0"]
    assert rows["rnn.weight_hh_l0"].rank_used == KCP.rank_for_ratio(hh.tensorization, 4.0)
    assert compressed.head.matrices["weight"].tensorization.order == 3 and rows["head.weight"].rank_used == 3


def test_unused_override_and_include_globs_warn() -> None:
    with pytest.warns(KCompressWarning) as record:
        _, report = compress(make(Classifier), "svd", rank=2, include=["rnn", "typo"], overrides={"nope*": {"rank": 1}})
    messages = [str(w.message) for w in record]
    assert any("'typo'" in m for m in messages) and any("'nope*'" in m for m in messages)
    assert set(messages) <= set(report.warnings)


def test_explicit_modes_used() -> None:
    model = make(Classifier)
    overrides = {"rnn.weight_ih_l1": {"in_modes": [2, 3, 4]}}
    _, report = compress(model, "kcp", rank=2, modes=((4, 4, 6), (2, 2, 4)), overrides=overrides, targets="ih")
    rows = rows_by_name(report)
    assert rows["rnn.weight_ih_l0"].modes == "(4,4,6)x(2,2,4)" and rows["rnn.weight_ih_l1"].modes == "(4,4,6)x(2,3,4)"


# ---------------------------------------------------------------------- progress and determinism
def test_progress_events_in_order() -> None:
    events = []
    _, report = compress(make(Classifier), "kcp", rank=2, order=3, gates="separate", progress=events.append,
                         targets="ih")
    events = [event for event in events if event.stage != "step"]  # the fit's events (execution timing follows)
    targeted = [row.name for row in report.matrices if row.rank_used is not None]
    assert targeted == ["rnn.weight_ih_l0", "rnn.weight_ih_l1"]
    position = 0
    for index, name in enumerate(targeted, start=1):
        start = events[position]
        assert (start.stage, start.name, start.index, start.total) == ("layer", name, index, 2)
        position += 1
        while events[position].stage == "iteration":
            assert events[position].name == name and events[position].error is not None
            position += 1
        done = events[position]
        assert (done.stage, done.name, done.index) == ("done", name, index)
        assert done.error == pytest.approx(rows_by_name(report)[name].relative_error)
        position += 1
    assert position == len(events)
    gates_seen = {e.message for e in events if e.stage == "iteration"}
    assert gates_seen == {f"gate {g}/4" for g in range(1, 5)}


def test_seeded_determinism() -> None:
    model = make(Classifier)
    options = {"init": "random", "n_iter_max": 15}
    states = [compress(model, "kcp", rank=3, order=3, seed=seed, fit_options=options)[0].state_dict()
              for seed in (7, 7, 8)]
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])
    key = "rnn.matrices.weight_ih_l0.factors.0"
    assert not torch.equal(states[0][key], states[2][key])


# ---------------------------------------------------------------------- report numbers
@pytest.mark.parametrize("gates", ["fused", "separate"])
def test_report_counts_and_errors_match_independent_computation(gates: str) -> None:
    model = make(Classifier)
    compressed, report = compress(model, "kcp", rank=2, targets="ih,hh", include=["*"], gates=gates)
    for row in report.matrices:
        dense = getattr(getattr(model, row.layer), row.matrix).detach().double()
        matrix = getattr(compressed, row.layer).matrices[row.matrix]
        assert row.shape == tuple(dense.shape) and row.params_before == dense.numel()
        assert row.params_after == param_numel(matrix)
        approx = matrix.reconstruct().detach().double()
        expected = float(torch.linalg.norm(dense - approx) / torch.linalg.norm(dense))
        assert row.relative_error == pytest.approx(expected, rel=1e-6)
    assert report.model_params_before == param_numel(model)
    assert report.model_params_after == param_numel(compressed)
    biases = sum(p.numel() for n, p in compressed.named_parameters() if "bias" in n)
    others = param_numel(compressed.embed) + biases
    assert report.model_params_after == report.compressed_params_after + others


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_registered_format_reports_true_counts(fmt: str) -> None:
    model = nn.ModuleDict({"rnn": make(nn.GRU, 12, 16), "head": nn.Linear(16, 4)})
    compressed, report = compress(model, fmt, rank=2, targets="ih,hh", include=["*"], gates="separate")
    for row in report.matrices:
        matrix = compressed[row.layer].matrices[row.matrix]
        dense = getattr(model[row.layer], row.matrix).detach().double()
        assert row.format == fmt and row.params_after == param_numel(matrix)
        expected = float(torch.linalg.norm(dense - matrix.reconstruct().detach().double()) / torch.linalg.norm(dense))
        assert row.relative_error == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_report_metadata_and_slow_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("kcompress.runs.convert.measured_speedup", lambda matrix: Speed(0.5, 0.0))
    with pytest.warns(KCompressWarning, match="runs factorized because execution='factorized' asked for it; "
                                              r"measured 2.0x slower \(±0%\) than the dense product"):
        _, report = compress(make(Classifier), "svd", rank=16, overrides={"*": {"rank": 16}}, execution="factorized")
    assert all(row.measured_speedup == 0.5 for row in report.matrices if row.format != "dense")
    assert set(report.versions) >= {"kcompress", "torch", "tensorly"}
    assert report.format == "svd" and report.options["budget"]["rank"] == 16 and report.options["selection"]["targets"] == "ih,hh"
    assert report.options["overrides"] == {"*": {"rank": 16}} and "progress" not in report.options
    validate_report_dict(json.loads(report.to_json()))


# ---------------------------------------------------------------------- argument errors
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 2, "ratio": 2.0}, "exactly one of rank and ratio"),
        ({}, "exactly one of rank and ratio"),
        ({"rank": 0}, "positive"),
        ({"rank": -3}, "positive"),
        ({"rank": True}, "positive"),
        ({"ratio": 0.0}, "positive"),
        ({"rank": 2, "format": "nope"}, "unknown format"),
        ({"rank": 2, "targets": "ih,xx"}, "targets"),
        ({"rank": 2, "targets": []}, "targets"),
        ({"rank": 2, "gates": "split"}, "gates"),
        ({"rank": 2, "order": 0}, "order"),
        ({"rank": 2, "modes": ((2, 2), (2, 2))}, r"do not cover|weight_ih_l0"),
        ({"rank": 2, "modes": (4, 4)}, "out_modes"),
        ({"rank": 2, "overrides": {"rnn": {"rnak": 3}}}, "unknown key"),
        ({"rank": 2, "overrides": {"rnn": {"rank": 3, "ratio": 2.0}}}, "not both"),
        ({"rank": 2, "overrides": {"rnn": {"rank": None}}}, "null"),
        ({"rank": 2, "overrides": {"rnn*": {"rank": 0}}}, r"override 'rnn\*': rank must be a positive"),
        ({"rank": 2, "format": "kcp", "order": 1}, "kcp needs at least 2 modes"),
        ({"rank": 2, "include": 3}, "include"),
        ({"rank": 2, "fit_options": {"x": object()}}, "JSON"),
        ({"ratio": 1e9}, "ratio"),
    ],
)
def test_bad_arguments_raise_one_line_errors(kwargs: dict, message: str) -> None:
    model = make(Classifier)
    with pytest.raises(KCompressError, match=message) as info:
        compress(model, **kwargs)
    assert "\n" not in str(info.value)
    assert type(model.rnn) is nn.LSTM


def test_not_a_module_raises() -> None:
    with pytest.raises(KCompressError, match="nn.Module"):
        compress(np.zeros(3), rank=2)


def test_speed_is_measured_unless_disabled() -> None:
    _, report = compress(make(Classifier), "svd", rank=2, execution="factorized")
    measured = [row.measured_speedup for row in report.matrices if row.format != "dense"]
    assert measured and all(value > 0 for value in measured)
    _, unchecked = compress(make(Classifier), "svd", rank=2, check_speed=False)
    assert all(row.measured_speedup is None for row in unchecked.matrices)
