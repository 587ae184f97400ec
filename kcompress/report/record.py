"""The compression report: one set of dataclasses rendered as JSON (CI artifact), a rich table (terminal)
and Markdown (pull-request comment).

Counts are per matrix of every compressed layer, including matrices kept dense (``compressed`` False,
``rank_used is None``, e.g. hidden-to-hidden matrices with ``targets="ih"``), so the layer totals are
honest. Biases are left out of the per-matrix counts (they are never compressed) but are part of
``model_params_before/after``, which count every ``nn.Parameter`` of the model (buffers excluded).
``model_bytes_before/after`` count bytes: the dense model's state-dict tensors, and the tensors its artifact
stores (integers and scales where ``quantize`` is set), headers excluded.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Optional, Sequence, cast

from rich.table import Table

from kcompress.errors import KCompressError
from kcompress.report.allocation_table import markdown as allocation_markdown
from kcompress.report.rows import MatrixReport, SkippedLayer, ratio
from kcompress.report.text import (
    calibration_lines,
    escape,
    keep_numbers_whole,
    metrics_line,
    row_cells,
    times,
)

SCHEMA_VERSION = 1


@dataclass
class Report:
    """Everything one compression run did. ``metrics`` (when evaluation ran) holds ``name``, ``task``,
    ``higher_is_better``, ``baseline``, ``compressed``, ``finetuned``, ``drop``, ``drop_type``, ``max_drop``,
    ``passed``; ``source`` is filled by the file pipeline (input path, checksum); ``status`` is ``"ok"`` or
    set by the caller (e.g. ``"failed"`` when an accuracy budget is missed)."""

    schema_version: int = SCHEMA_VERSION
    format: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    matrices: list[MatrixReport] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"
    #: with ``allocate="auto"``: objective, budget, used, dense, formats and one row per matrix (format, rank,
    #: params, macs, estimated and measured relative output error, execution path); see kcompress.allocation.choose
    allocation: dict[str, Any] = field(default_factory=dict)
    #: after a budget search: max_drop, the trajectory (one entry per budget tried) and the chosen step
    search: dict[str, Any] = field(default_factory=dict)
    #: with calibration data: samples, holdout_samples, options, statistics_seconds, the whole model's
    #: agreement with dense on the held-out calibration inputs (``agreement_after_fit``) and ``distill``
    calibration: dict[str, Any] = field(default_factory=dict)
    #: ``"int8"``/``"int4"``: the artifact stores the factors and untouched tensors as integers (None: as they are)
    quantize: Optional[str] = None
    #: tensor bytes of the dense model's state dict, and of the tensors the artifact stores
    model_bytes_before: int = 0
    model_bytes_after: int = 0
    #: the size budget in bytes the artifact's tensors had to fit (``BudgetOptions.size``; None: no size budget)
    size_budget: Optional[int] = None

    # ------------------------------------------------------------------ totals
    def __repr__(self) -> str:
        """One line: format, matrices, ratios, worst fit error, metric and status (``rich_table()``,
        ``to_markdown()`` and ``to_dict()`` give everything)."""
        # cast: compressed rows of a report made here carry a float error (None only in some JSON read-backs)
        errors = cast("list[float]", [m.relative_error for m in self.matrices if m.compressed])
        worst = f", max relative error {max(errors):.3g}" if errors else ""
        metric = ""
        if self.metrics:
            values = [self.metrics.get(key) for key in ("baseline", "compressed", "finetuned")]
            shown = " -> ".join(f"{value:.4g}" for value in values if isinstance(value, (int, float)))
            metric = f", {self.metrics.get('name')} {shown}"
        size = f", bytes {self.model_bytes_ratio:.2f}x" if self.model_bytes_after else ""
        return (f"Report(format={self.format!r}, {len(self.matrices)} matrices, ratio {self.compression_ratio:.2f}x "
                f"(model {self.model_compression_ratio:.2f}x{size}){worst}{metric}, {len(self.warnings)} warnings, "
                f"status={self.status!r})")

    @property
    def compressed_params_before(self) -> int:
        """Dense parameters of the compressed layers' matrices."""
        return sum(m.params_before for m in self.matrices)

    @property
    def compressed_params_after(self) -> int:
        return sum(m.params_after for m in self.matrices)

    @property
    def compression_ratio(self) -> float:
        """Over the compressed layers' matrices (1.0 when nothing was compressed)."""
        return ratio(self.compressed_params_before, self.compressed_params_after)

    @property
    def model_compression_ratio(self) -> float:
        """Over every parameter of the model."""
        return ratio(self.model_params_before, self.model_params_after)

    @property
    def model_bytes_ratio(self) -> float:
        """Dense tensor bytes over the artifact's: the size a user compares."""
        return ratio(self.model_bytes_before, self.model_bytes_after)

    @property
    def predicted_speedup(self) -> float:
        """Dense over compressed matrix-vector MACs of the compressed layers (a prediction, not a timing)."""
        return ratio(sum(m.macs_before for m in self.matrices), sum(m.macs_after for m in self.matrices))

    def summary(self) -> dict[str, Any]:
        """The totals, as written under ``"summary"`` in the JSON."""
        return {
            "compressed_params_before": self.compressed_params_before,
            "compressed_params_after": self.compressed_params_after,
            "compression_ratio": self.compression_ratio,
            "model_compression_ratio": self.model_compression_ratio,
            "model_bytes_ratio": self.model_bytes_ratio,
            "predicted_speedup": self.predicted_speedup,
        }

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; ``"summary"`` holds the derived totals (ignored by :meth:`from_dict`)."""
        data = asdict(self)
        data["matrices"] = [m.to_dict() for m in self.matrices]
        data["summary"] = self.summary()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Report":
        """Inverse of :meth:`to_dict` (validated against :data:`REPORT_SCHEMA` first)."""
        validate_report_dict(data)
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        values["matrices"] = [MatrixReport.from_dict(m) for m in data["matrices"]]
        values["skipped"] = [SkippedLayer(s["name"], s["layer_type"], s["reason"]) for s in data["skipped"]]
        return cls(**values)

    def to_json(self, indent: Optional[int] = 2) -> str:
        """Stable, strict JSON: sorted keys; NaN and infinities (e.g. a diverged metric) written as null."""
        return json.dumps(json_finite(self.to_dict()), indent=indent, sort_keys=True, allow_nan=False)

    # ------------------------------------------------------------------ rendering
    def rich_table(self) -> Table:
        """Per-matrix rows, a totals row, and caption lines (ratios, metrics, skipped layers, status)."""
        caption = "\n".join(self._caption_lines())
        table = Table(title=f"kcompress: {self.format}", caption=caption, caption_justify="left")
        for header in TABLE_HEADERS:
            table.add_column(header, justify="right" if header in NUMERIC_HEADERS else "left", no_wrap=True)
        for matrix in self.matrices:
            table.add_row(*row_cells(matrix))
        if self.matrices:
            table.add_section()
            table.add_row(*self._total_cells(), style="bold")
        return keep_numbers_whole(table)

    def to_markdown(self) -> str:
        """GitHub-flavoured Markdown with the same content, plus the warnings (for a pull-request comment)."""
        align = ["---:" if header in NUMERIC_HEADERS else ":---" for header in TABLE_HEADERS]
        rows = [TABLE_HEADERS, align] + [row_cells(m) for m in self.matrices]
        if self.matrices:
            rows.append([f"**{cell}**" if cell else "" for cell in self._total_cells()])
        lines = [f"### kcompress: {self.format}", ""]
        lines += ["| " + " | ".join(escape(cell) for cell in row) + " |" for row in rows]
        lines += [""] + [f"- {escape(line)}" for line in self._caption_lines()]
        lines += [f"- warning: {escape(warning)}" for warning in self.warnings]
        extra = allocation_markdown(self)
        return "\n".join(lines) + "\n" + ("\n" + extra if extra else "")

    def _total_cells(self) -> list[str]:
        before, after = self.compressed_params_before, self.compressed_params_after
        seconds = sum(m.fit_seconds for m in self.matrices)
        return ["total", "", "", "", "", "", f"{before:,}→{after:,}", times(self.compression_ratio),
                times(self.predicted_speedup), "", "", f"{seconds:.2f} s"]

    def _speed_summary(self) -> str:
        """The predicted MACs speed-up and what actually runs: it holds only for matrices run factorized."""
        predicted = f"predicted MACs speed-up {times(self.predicted_speedup)}"
        materialized = sum(m.execution == "materialized" for m in self.matrices)
        if not materialized:
            return predicted
        if materialized == len(self.matrices):
            return (f"MACs {times(self.predicted_speedup)} fewer if run factorized, but every matrix runs "
                    "materialized ('= dense': dense speed)")
        return (f"{predicted} for the {len(self.matrices) - materialized} matrices run factorized; the other "
                f"{materialized} run materialized ('= dense')")

    def _caption_lines(self) -> list[str]:
        lines = [
            f"compressed layers: {self.compressed_params_before:,}→{self.compressed_params_after:,} params "
            f"({times(self.compression_ratio)}); whole model: {self.model_params_before:,}→"
            f"{self.model_params_after:,} params ({times(self.model_compression_ratio)}); {self._speed_summary()}"
        ]
        if self.model_bytes_after:
            stored = f", {self.quantize} storage" if self.quantize else ""
            if self.size_budget is not None:
                stored += f"; size budget {self.size_budget:,} bytes"
            lines.append(f"whole model in bytes: {self.model_bytes_before:,}→{self.model_bytes_after:,} tensor bytes "
                         f"({times(self.model_bytes_ratio)}{stored})")
        if any(m.execution for m in self.matrices):
            lines.append("speed: dense/compressed time of the matrix product at batch 16, measured (median of "
                         "interleaved runs ± interquartile spread) for factorized matrices; '= dense': materialized "
                         "(the reconstructed weight runs as the dense product, in torch's fused kernels)")
        if self.calibration:
            lines += calibration_lines(self.calibration, self.matrices)
        if self.metrics:
            lines.append(metrics_line(self.metrics))
        lines += [f"skipped {s.name or '(model)'} ({s.layer_type}): {s.reason}" for s in self.skipped]
        if self.status != "ok":
            lines.append(f"status: {self.status}")
        return lines


TABLE_HEADERS = ["layer", "matrix", "shape", "format", "modes", "rank", "params", "ratio", "MACs ratio",
                 "speed", "rel. error", "fit time"]
NUMERIC_HEADERS = {"params", "ratio", "MACs ratio", "speed", "rel. error", "fit time"}


def json_finite(value: Any) -> Any:
    """``value`` with every NaN or infinity inside it replaced by None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: json_finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_finite(item) for item in value]
    return value


# ---------------------------------------------------------------------- schema
#: MatrixReport fields that rows written before they existed (or without calibration) lack
OPTIONAL_MATRIX_FIELDS = ("measured_speedup", "output_error_before", "output_error_after", "calibration_samples",
                          "data_fit_seconds", "speed_spread", "execution")
_RANK = {"type": ["integer", "array", "null"]}
MATRIX_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [f.name for f in fields(MatrixReport) if f.name not in OPTIONAL_MATRIX_FIELDS],
    "properties": {
        "layer": {"type": "string"},
        "layer_type": {"type": "string"},
        "matrix": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "format": {"type": "string"},
        "modes": {"type": "string"},
        "rank_requested": _RANK,
        "rank_used": _RANK,
        "params_before": {"type": "integer"},
        "params_after": {"type": "integer"},
        "macs_before": {"type": "integer"},
        "macs_after": {"type": "integer"},
        "relative_error": {"type": ["number", "null"]},
        "fit_seconds": {"type": "number"},
        "iterations": {"type": "integer"},
        "clamped": {"type": "boolean"},
        "measured_speedup": {"type": ["number", "null"]},
        "speed_spread": {"type": ["number", "null"]},
        "execution": {"type": ["string", "null"]},
        "output_error_before": {"type": ["number", "null"]},
        "output_error_after": {"type": ["number", "null"]},
        "calibration_samples": {"type": ["integer", "null"]},
        "data_fit_seconds": {"type": ["number", "null"]},
    },
}
SKIPPED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "layer_type", "reason"],
    "properties": {"name": {"type": "string"}, "layer_type": {"type": "string"}, "reason": {"type": "string"}},
}
#: Report fields that reports written before they existed lack
OPTIONAL_REPORT_FIELDS = ("allocation", "search", "calibration", "quantize", "model_bytes_before",
                          "model_bytes_after", "size_budget")
#: JSON-schema subset (type, required, properties, items, const) describing :meth:`Report.to_dict`
REPORT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [f.name for f in fields(Report) if f.name not in OPTIONAL_REPORT_FIELDS],
    "properties": {
        "schema_version": {"type": "integer", "const": SCHEMA_VERSION},
        "format": {"type": "string"},
        "options": {"type": "object"},
        "matrices": {"type": "array", "items": MATRIX_SCHEMA},
        "skipped": {"type": "array", "items": SKIPPED_SCHEMA},
        "model_params_before": {"type": "integer"},
        "model_params_after": {"type": "integer"},
        "metrics": {"type": "object"},
        "warnings": {"type": "array", "items": {"type": "string"}},
        "versions": {"type": "object"},
        "source": {"type": "object"},
        "status": {"type": "string"},
        "allocation": {"type": "object"},
        "search": {"type": "object"},
        "calibration": {"type": "object"},
        "quantize": {"type": ["string", "null"]},
        "model_bytes_before": {"type": "integer"},
        "model_bytes_after": {"type": "integer"},
        "size_budget": {"type": ["integer", "null"]},
        "summary": {"type": "object"},
    },
}

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list, tuple),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def validate_report_dict(data: Any) -> None:
    """Raise :class:`KCompressError` listing every place where ``data`` does not follow :data:`REPORT_SCHEMA`."""
    problems = _check(data, REPORT_SCHEMA, "report")
    if problems:
        raise KCompressError("invalid report: " + "; ".join(problems))


def _check(value: Any, schema: Mapping[str, Any], where: str) -> list[str]:
    """Problems of ``value`` against one schema node (recursing into properties and items)."""
    kinds: Sequence[str] = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    if not any(_is_type(value, kind) for kind in kinds):
        return [f"{where} should be {' or '.join(kinds)}, got {type(value).__name__}"]
    if "const" in schema and value != schema["const"]:
        return [f"{where} should be {schema['const']!r}, got {value!r}"]
    problems = [f"{where} lacks {key!r}" for key in schema.get("required", []) if key not in value]
    for key, sub in schema.get("properties", {}).items():
        if isinstance(value, dict) and key in value:
            problems += _check(value[key], sub, f"{where}.{key}")
    if "items" in schema and isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            problems += _check(item, schema["items"], f"{where}[{index}]")
    return problems


def _is_type(value: Any, kind: str) -> bool:
    if isinstance(value, bool) and kind in ("integer", "number"):
        return False
    return isinstance(value, _TYPES[kind])
