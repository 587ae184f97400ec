"""Report: JSON round trip and schema, totals, Markdown and the rich table."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from rich.console import Console
from torch import nn

from kcompress import KCompressError, KCompressWarning, Report, compress
from kcompress.report.record import REPORT_SCHEMA, validate_report_dict
from kcompress.report.rows import MatrixReport, SkippedLayer


def matrix(
    layer: str, name: str, shape: tuple[int, int], params_after: int, macs_after: int, **extra: object
) -> MatrixReport:
    """A report row of a dense-shaped ``shape`` matrix; ``extra`` overrides any field."""
    values = dict(layer=layer, layer_type="LSTM", matrix=name, shape=shape, format="kcp", modes="(8,4)x(4,4)",
                  rank_requested=8, rank_used=8, params_before=shape[0] * shape[1], params_after=params_after,
                  macs_before=shape[0] * shape[1], macs_after=macs_after, relative_error=0.0123,
                  fit_seconds=0.5, iterations=12, clamped=False)
    values.update(extra)
    return MatrixReport(**values)


@pytest.fixture
def report() -> Report:
    return Report(
        format="kcp",
        options={"format": "kcp", "rank": 8, "targets": "ih", "modes": None},
        matrices=[
            matrix("encoder.rnn", "weight_ih_l0", (128, 64), 800, 1600, rank_requested=8, rank_used=5, clamped=True),
            matrix("encoder.rnn", "weight_hh_l0", (128, 32), 4096, 4096, format="dense", modes="(128)x(32)",
                   rank_requested=None, rank_used=None, relative_error=0.0, iterations=0),
            matrix("", "weight", (10, 32), 84, 120, format="tt", rank_requested=[2, 3], rank_used=[2, 3]),
        ],
        skipped=[SkippedLayer("proj", "LSTM", "LSTM with proj_size=4 is not supported")],
        model_params_before=20_000,
        model_params_after=12_000,
        metrics={"name": "accuracy", "task": "classification", "higher_is_better": True, "baseline": 0.91,
                 "compressed": 0.85, "finetuned": 0.895, "drop": 0.015, "drop_type": "absolute",
                 "max_drop": 0.01, "passed": False},
        warnings=["encoder.rnn.weight_ih_l0: rank 8 is above the largest kcp rank; using rank 5"],
        versions={"kcompress": "0.1.0", "torch": "2.x"},
        source={"path": "model.pt", "sha256": "ab" * 32},
        status="failed",
    )


def test_totals_from_the_rows(report: Report) -> None:
    before, after = 128 * 64 + 128 * 32 + 10 * 32, 800 + 4096 + 84
    assert (report.compressed_params_before, report.compressed_params_after) == (before, after)
    assert report.compression_ratio == pytest.approx(before / after)
    assert report.model_compression_ratio == pytest.approx(20_000 / 12_000)
    assert report.predicted_speedup == pytest.approx(before / (1600 + 4096 + 120))
    assert Report().compression_ratio == 1.0 and Report().predicted_speedup == 1.0


def test_json_round_trip_and_stable_keys(report: Report) -> None:
    text = report.to_json()
    data = json.loads(text)
    assert data["schema_version"] == 1
    assert data["matrices"][0]["shape"] == [128, 64] and data["matrices"][2]["rank_used"] == [2, 3]
    assert data["summary"]["compression_ratio"] == pytest.approx(report.compression_ratio)
    assert text == json.dumps(data, indent=2, sort_keys=True)
    assert Report.from_dict(data) == report
    assert Report.from_dict(report.to_dict()) == report
    assert Report.from_dict(data).to_json() == text


def test_json_is_strict_with_non_finite_numbers(report: Report) -> None:
    report.metrics["finetuned"] = float("nan")
    report.matrices[0].relative_error = float("inf")
    data = json.loads(report.to_json())
    assert data["metrics"]["finetuned"] is None and data["matrices"][0]["relative_error"] is None
    text = rendered(Report.from_dict(data))
    assert "fine-tuned" not in text and "baseline 0.91" in text


def test_schema_accepts_reports_and_names_problems(report: Report) -> None:
    validate_report_dict(report.to_dict())
    assert set(REPORT_SCHEMA["required"]) <= set(report.to_dict())
    broken = copy.deepcopy(report.to_dict())
    del broken["matrices"][1]["params_after"]
    broken["model_params_before"] = "many"
    broken["matrices"][0]["clamped"] = 1
    with pytest.raises(KCompressError) as info:
        validate_report_dict(broken)
    message = str(info.value)
    assert "report.matrices[1] lacks 'params_after'" in message
    assert "report.model_params_before should be integer" in message
    assert "report.matrices[0].clamped should be boolean" in message
    for key, value in (("schema_version", 2), ("model_params_after", True), ("warnings", [1])):
        with pytest.raises(KCompressError, match=key):
            validate_report_dict({**report.to_dict(), key: value})
    with pytest.raises(KCompressError, match="lacks 'skipped'"):
        Report.from_dict({k: v for k, v in report.to_dict().items() if k != "skipped"})


def rendered(report: Report) -> str:
    console = Console(record=True, width=200)
    console.print(report.rich_table())
    return console.export_text()


def test_rich_table_renders_rows_totals_and_metrics(report: Report) -> None:
    text = rendered(report)
    for expected in ("encoder.rnn", "weight_ih_l0", "weight_hh_l0", "(model)", "128x64", "(8,4)x(4,4)", "8→5", "2,3",
                     "8,192→800", "10.24×", "0.0123", "dense", "tt", "total", "12,608→4,980", "2.53×",
                     "whole model: 20,000→12,000", "1.67×", "baseline 0.91", "compressed 0.85", "fine-tuned 0.895",
                     "drop 0.015 (absolute, max 0.01)", "FAIL", "skipped proj (LSTM)", "status: failed"):
        assert expected in text, expected


def test_markdown_has_a_row_per_matrix(report: Report) -> None:
    text = report.to_markdown()
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| layer |"))
    assert lines[header + 1].startswith("| :--- |")
    rows = lines[header + 2 : header + 2 + len(report.matrices) + 1]
    first = "| encoder.rnn | weight_ih_l0 | 128x64 | kcp | (8,4)x(4,4) | 8→5 | 8,192→800 | 10.24× |"
    assert rows[0].startswith(first)
    assert rows[1].startswith("| encoder.rnn | weight_hh_l0 |") and "| — |" in rows[1]
    assert rows[2].startswith("| (model) | weight |") and rows[3].startswith("| **total** |")
    assert all(row.count("|") == 13 for row in rows)
    for expected in ("FAIL", "skipped proj", "- warning: encoder.rnn.weight_ih_l0: rank 8"):
        assert expected in text


def test_markdown_escapes_pipes() -> None:
    report = Report(format="svd", matrices=[matrix("a|b", "weight", (4, 4), 8, 8)])
    assert "| a\\|b | weight |" in report.to_markdown()


def test_report_from_a_real_run_renders_and_validates() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({"rnn": nn.LSTM(8, 16)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KCompressWarning)
        _, report = compress(model, "kcp", rank=2)
    data = json.loads(report.to_json())
    validate_report_dict(data)
    assert Report.from_dict(data) == report
    text = rendered(report)
    assert [(row.layer, row.matrix) for row in report.matrices] == [("rnn", "weight_ih_l0"), ("rnn", "weight_hh_l0")]
    assert all(f"{row.params_before:,}→{row.params_after:,}" in text for row in report.matrices)
