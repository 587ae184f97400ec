"""The text of a report: table cells, the speed column, caption lines and Markdown escaping (the data and
its JSON are :mod:`kcompress.report.record`; these only turn them into strings for rich and Markdown)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence, cast

from rich.table import Table

if TYPE_CHECKING:  # annotations only: the CLI's tables use this module without torch
    from kcompress.report.rows import MatrixReport, ReportRank


def times(ratio: float) -> str:
    return f"{ratio:.2f}×"


def rank_text(rank: ReportRank) -> str:
    if rank is None:
        return "—"
    return ",".join(map(str, rank)) if isinstance(rank, list) else str(rank)


def keep_numbers_whole(table: Table) -> Table:
    """``table`` with its right-justified (number) columns never narrower than their longest cell, where
    rich would otherwise cut a number to ``1170.2…`` on a narrow screen; the other columns fold their text
    onto more lines instead. Returns the same table."""
    for column in table.columns:
        if column.justify == "right":
            column.no_wrap = True
            column.min_width = max((len(str(cell)) for cell in column.cells), default=0)
        else:
            column.no_wrap, column.overflow = False, "fold"
    return table


def row_cells(m: MatrixReport) -> list[str]:
    """One table row: the columns of :data:`TABLE_HEADERS`."""
    rank = rank_text(m.rank_used)
    if m.clamped:
        rank = f"{rank_text(m.rank_requested)}→{rank}"
    return [
        m.layer or "(model)",
        m.matrix,
        f"{m.shape[0]}x{m.shape[1]}",
        m.format,
        m.modes,
        rank,
        f"{m.params_before:,}→{m.params_after:,}",
        times(m.compression_ratio),
        times(m.macs_ratio),
        speed_text(m),
        "—" if m.relative_error is None else f"{m.relative_error:.3g}",
        f"{m.fit_seconds:.2f} s",
    ]


def speed_text(m: MatrixReport) -> str:
    """``"2.10× ±4% fact."`` (measured, factorized), ``"= dense"`` (materialized) or ``"—"``."""
    if m.execution == "materialized":
        return "= dense"
    if m.measured_speedup is None:
        return "—"
    spread = "" if m.speed_spread is None else f" ±{m.speed_spread:.0%}"
    return f"{times(m.measured_speedup)}{spread} fact."


def calibration_lines(calibration: Mapping[str, Any], matrices: Sequence[MatrixReport]) -> list[str]:
    """The calibration caption: samples, each matrix's held-out output error (plain fit → data-aware fit;
    ``rel. error`` is the weight error, which may exceed 1) and the whole model's agreement with dense."""
    errors = ", ".join(f"{m.name} {m.output_error_before:.3g}→{m.output_error_after:.3g}" for m in matrices
                       if m.output_error_before is not None and m.output_error_after is not None)
    labels = cast("dict[Any, str]", {True: "on", False: "off"})  # looked up with any stored value
    chosen = {"ridge": calibration.get("ridge"), "gate-row weights": labels.get(
        calibration.get("gate_weights"))}
    settings = ", ".join(f"{label} {value}" for label, value in chosen.items() if value is not None)
    weighted = " (rows weighted by gate)" if calibration.get("gate_weights") else ""
    lines = [f"calibrated on {calibration.get('samples')} sequences ({calibration.get('holdout_samples')} more held "
             f"out{'; ' + settings if settings else ''}); output error on held-out inputs{weighted} "
             f"(plain fit→data-aware fit): {errors or '—'}"]
    record = calibration.get("distill") or {}
    if record.get("lr") is not None:
        lines.append(f"distilled {record.get('epochs_run')} epochs at learning rate {record['lr']:g}")
    for key, label in (("agreement_after_fit", "after fitting"), ("distill", "after distillation")):
        record = calibration.get(key) or {}
        record = record.get("agreement", record) if key == "distill" else record
        if "relative_error" in record:
            agreement = record.get("argmax_agreement")
            extra = "" if agreement is None else f", argmax agreement {agreement:.3f}"
            lines.append(f"whole model vs dense on held-out inputs {label}: output error "
                         f"{record['relative_error']:.3g}{extra}")
    return lines


def metrics_line(metrics: Mapping[str, Any]) -> str:
    """``accuracy: baseline 0.9 · compressed 0.85 · fine-tuned 0.89 · drop 0.01 (absolute, max 0.02) · PASS``."""
    parts = []
    for key, label in (("baseline", "baseline"), ("compressed", "compressed"), ("finetuned", "fine-tuned")):
        if metrics.get(key) is not None:
            parts.append(f"{label} {metrics[key]:.4g}")
    if metrics.get("drop") is not None:
        budget = f", max {metrics['max_drop']:g}" if metrics.get("max_drop") is not None else ""
        parts.append(f"drop {metrics['drop']:.4g} ({metrics.get('drop_type', 'absolute')}{budget})")
    if metrics.get("passed") is not None:
        parts.append("PASS" if metrics["passed"] else "FAIL")
    where = [f"{label} {metrics[key]}" for key, label in (("scored_on", "scored:"), ("finetuned_on", "fine-tuned on"))
             if metrics.get(key)]
    return f"{metrics.get('name') or 'metric'}: " + " · ".join(parts) + (f" ({'; '.join(where)})" if where else "")


def escape(cell: str) -> str:
    return cell.replace("|", "\\|")
