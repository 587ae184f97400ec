"""Rendering of ``Report.allocation`` (the automatic allocation) and ``Report.search`` (the budget search
trajectory) as rich tables and Markdown, beside the per-matrix table of :mod:`kcompress.report.record`."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from rich.table import Table

ALLOCATION_HEADERS = ["matrix", "format", "rank", "params", "MACs", "est. output error", "output error", "path"]
SEARCH_HEADERS = ["step", "ratio asked", "budget", "used", "ratio", "after fit", "recovery", "metric", "drop", "result",
                  "seconds"]


def allocation_rows(allocation: Mapping[str, Any]) -> list[list[str]]:
    """One row per matrix (:data:`ALLOCATION_HEADERS`)."""
    return [[row["matrix"], row["format"], str(row["rank"]), f"{row['dense_params']:,}→{row['params']:,}",
             f"{row['macs']:,}", _number(row.get("estimated_error")), _number(row.get("measured_error")),
             row.get("path") or "—"] for row in allocation.get("rows", [])]


def allocation_caption(allocation: Mapping[str, Any]) -> str:
    unit = {"size": "parameters", "bytes": "tensor bytes"}.get(allocation["objective"], "MACs per vector")
    ratio = allocation["dense"] / allocation["used"] if allocation["used"] else float("inf")
    return (f"allocation ({allocation['objective']}, formats {', '.join(allocation['formats'])}): budget "
            f"{allocation['budget']:,} {unit}, used {allocation['used']:,} of {allocation['dense']:,} dense "
            f"({ratio:.2f}×); output errors are relative, ‖(W − Ŵ)X‖/‖WX‖ on calibration inputs "
            f"(estimated before fitting, measured on the held-out part after)")


def search_rows(search: Mapping[str, Any]) -> list[list[str]]:
    """One row per step of the trajectory (:data:`SEARCH_HEADERS`); the chosen one marked ``*``."""
    rows = []
    for index, step in enumerate(search.get("steps", [])):
        mark = "*" if index == search.get("chosen") else ""
        rows.append([f"{index + 1}{mark}", f"{step['ratio']:.3g}×", f"{step['budget']:,}", f"{step['used']:,}",
                     f"{step['achieved_ratio']:.2f}×", _number(step.get("fitted_metric"), 4), recovery_label(step),
                     _number(step["metric"], 4), _number(step["drop"], 4), "pass" if step["passed"] else "fail",
                     f"{step['seconds']:.1f}"])
    return rows


def recovery_label(step: Mapping[str, Any]) -> str:
    """What ran after the step's fit: ``reused N`` (an earlier step's model), distill / finetune, or —."""
    if step.get("reused") is not None:
        return f"reused {step['reused'] + 1}"
    return "+".join(step.get("recovery") or []) or "—"


def search_caption(search: Mapping[str, Any]) -> str:
    verdict = "found" if search.get("passed") else "no budget passed; the closest (*) is written, marked failed"
    return (f"budget search: max drop {search['max_drop']:g} ({search['drop_type']}): {verdict}; "
            f"* = the step written")


def rich_tables(report: Any) -> list[Table]:
    """The allocation table and the search table of ``report`` (those it has)."""
    tables = []
    for data, headers, rows, caption, title in (
        (report.allocation, ALLOCATION_HEADERS, allocation_rows, allocation_caption, "allocation"),
        (report.search, SEARCH_HEADERS, search_rows, search_caption, "budget search"),
    ):
        if data:
            table = Table(title=f"kcompress: {title}", caption=caption(data), caption_justify="left")
            for header in headers:
                table.add_column(header, no_wrap=True)
            for row in rows(data):
                table.add_row(*row)
            tables.append(table)
    return tables


def markdown(report: Any) -> str:
    """Markdown sections for the allocation and the search ("" when the report has neither)."""
    parts = []
    for data, headers, rows, caption, title in (
        (report.allocation, ALLOCATION_HEADERS, allocation_rows, allocation_caption, "Allocation"),
        (report.search, SEARCH_HEADERS, search_rows, search_caption, "Budget search"),
    ):
        if data:
            lines = [f"#### {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows(data)]
            parts.append("\n".join(lines + ["", caption(data), ""]))
    return "\n".join(parts)


def _number(value: Optional[float], digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}g}"
