"""The compression report: one set of dataclasses rendered as JSON (CI artifact), a rich table (terminal)
and Markdown (pull-request comment).

Counts are per matrix of every compressed layer, including matrices kept dense (``format == "dense"``,
``rank_used is None``, e.g. hidden-to-hidden matrices with ``targets="ih"``), so the layer totals are
honest. Biases are left out of the per-matrix counts (they are never compressed) but are part of
``model_params_before/after``, which count every ``nn.Parameter`` of the model (buffers excluded).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Optional, Sequence, Union

from rich.table import Table

from .errors import KCompressError

SCHEMA_VERSION = 1
#: rank as stored: one int, a list of per-bond ints, or None for matrices kept dense
ReportRank = Union[int, list, None]


@dataclass
class MatrixReport:
    """One matrix of a compressed layer: ``shape`` is the dense ``(M, N)``; MACs are per input vector."""

    layer: str
    layer_type: str
    matrix: str
    shape: tuple[int, int]
    format: str
    modes: str
    rank_requested: ReportRank
    rank_used: ReportRank
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    relative_error: Optional[float]  # None only when read back from JSON where it was not finite
    fit_seconds: float
    iterations: int
    clamped: bool
    #: measured ``time(x @ W.T) / time(multiply)`` at batch 16 on the machine that compressed (None: not measured)
    measured_speedup: Optional[float] = None

    @property
    def name(self) -> str:
        """``"layer.matrix"`` (just the matrix for a model that is itself the layer)."""
        return qualified_name(self.layer, self.matrix)

    @property
    def compression_ratio(self) -> float:
        return _ratio(self.params_before, self.params_after)

    @property
    def macs_ratio(self) -> float:
        """Dense MACs over compressed MACs: above 1 is predicted faster."""
        return _ratio(self.macs_before, self.macs_after)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = list(self.shape)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MatrixReport":
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        values["shape"] = tuple(int(size) for size in values["shape"])
        return cls(**values)


@dataclass
class SkippedLayer:
    """A recurrent or linear layer left as it was, and why."""

    name: str
    layer_type: str
    reason: str


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

    # ------------------------------------------------------------------ totals
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
        return _ratio(self.compressed_params_before, self.compressed_params_after)

    @property
    def model_compression_ratio(self) -> float:
        """Over every parameter of the model."""
        return _ratio(self.model_params_before, self.model_params_after)

    @property
    def predicted_speedup(self) -> float:
        """Dense over compressed matrix-vector MACs of the compressed layers (a prediction, not a timing)."""
        return _ratio(sum(m.macs_before for m in self.matrices), sum(m.macs_after for m in self.matrices))

    def summary(self) -> dict[str, Any]:
        """The totals, as written under ``"summary"`` in the JSON."""
        return {
            "compressed_params_before": self.compressed_params_before,
            "compressed_params_after": self.compressed_params_after,
            "compression_ratio": self.compression_ratio,
            "model_compression_ratio": self.model_compression_ratio,
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
        return json.dumps(_finite(self.to_dict()), indent=indent, sort_keys=True, allow_nan=False)

    # ------------------------------------------------------------------ rendering
    def rich_table(self) -> Table:
        """Per-matrix rows, a totals row, and caption lines (ratios, metrics, skipped layers, status)."""
        caption = "\n".join(self._caption_lines())
        table = Table(title=f"kcompress: {self.format}", caption=caption, caption_justify="left")
        for header in TABLE_HEADERS:
            table.add_column(header, justify="right" if header in NUMERIC_HEADERS else "left", no_wrap=True)
        for matrix in self.matrices:
            table.add_row(*_row_cells(matrix))
        if self.matrices:
            table.add_section()
            table.add_row(*self._total_cells(), style="bold")
        return table

    def to_markdown(self) -> str:
        """GitHub-flavoured Markdown with the same content, plus the warnings (for a pull-request comment)."""
        align = ["---:" if header in NUMERIC_HEADERS else ":---" for header in TABLE_HEADERS]
        rows = [TABLE_HEADERS, align] + [_row_cells(m) for m in self.matrices]
        if self.matrices:
            rows.append([f"**{cell}**" if cell else "" for cell in self._total_cells()])
        lines = [f"### kcompress: {self.format}", ""]
        lines += ["| " + " | ".join(_escape(cell) for cell in row) + " |" for row in rows]
        lines += [""] + [f"- {_escape(line)}" for line in self._caption_lines()]
        lines += [f"- warning: {_escape(warning)}" for warning in self.warnings]
        return "\n".join(lines) + "\n"

    def _total_cells(self) -> list[str]:
        before, after = self.compressed_params_before, self.compressed_params_after
        seconds = sum(m.fit_seconds for m in self.matrices)
        return ["total", "", "", "", "", "", f"{before:,}→{after:,}", _times(self.compression_ratio),
                _times(self.predicted_speedup), "", "", f"{seconds:.2f} s"]

    def _caption_lines(self) -> list[str]:
        lines = [
            f"compressed layers: {self.compressed_params_before:,}→{self.compressed_params_after:,} params "
            f"({_times(self.compression_ratio)}); whole model: {self.model_params_before:,}→"
            f"{self.model_params_after:,} params ({_times(self.model_compression_ratio)}); "
            f"predicted MACs speed-up {_times(self.predicted_speedup)}"
        ]
        if self.metrics:
            lines.append(_metrics_line(self.metrics))
        lines += [f"skipped {s.name or '(model)'} ({s.layer_type}): {s.reason}" for s in self.skipped]
        if self.status != "ok":
            lines.append(f"status: {self.status}")
        return lines


TABLE_HEADERS = ["layer", "matrix", "shape", "format", "modes", "rank", "params", "ratio", "MACs ratio",
                 "speed", "rel. error", "fit time"]
NUMERIC_HEADERS = {"params", "ratio", "MACs ratio", "speed", "rel. error", "fit time"}


def qualified_name(layer: str, matrix: str) -> str:
    """``"rnn.weight_ih_l0"``; just ``matrix`` when the layer is the model itself (``layer == ""``)."""
    return f"{layer}.{matrix}" if layer else matrix


def _ratio(before: float, after: float) -> float:
    return float(before) / float(after) if after else 1.0


def _times(ratio: float) -> str:
    return f"{ratio:.2f}×"


def _rank_text(rank: ReportRank) -> str:
    if rank is None:
        return "—"
    return ",".join(map(str, rank)) if isinstance(rank, list) else str(rank)


def _row_cells(m: MatrixReport) -> list[str]:
    """One table row: the columns of :data:`TABLE_HEADERS`."""
    rank = _rank_text(m.rank_used)
    if m.clamped:
        rank = f"{_rank_text(m.rank_requested)}→{rank}"
    return [
        m.layer or "(model)",
        m.matrix,
        f"{m.shape[0]}x{m.shape[1]}",
        m.format,
        m.modes,
        rank,
        f"{m.params_before:,}→{m.params_after:,}",
        _times(m.compression_ratio),
        _times(m.macs_ratio),
        "—" if m.measured_speedup is None else _times(m.measured_speedup),
        "—" if m.relative_error is None else f"{m.relative_error:.3g}",
        f"{m.fit_seconds:.2f} s",
    ]


def _metrics_line(metrics: Mapping[str, Any]) -> str:
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
    return f"{metrics.get('name') or 'metric'}: " + " · ".join(parts)


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float inside it replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _escape(cell: str) -> str:
    return cell.replace("|", "\\|")


# ---------------------------------------------------------------------- schema
_RANK = {"type": ["integer", "array", "null"]}
MATRIX_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [f.name for f in fields(MatrixReport) if f.name != "measured_speedup"],
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
    },
}
SKIPPED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "layer_type", "reason"],
    "properties": {"name": {"type": "string"}, "layer_type": {"type": "string"}, "reason": {"type": "string"}},
}
#: JSON-schema subset (type, required, properties, items, const) describing :meth:`Report.to_dict`
REPORT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": [f.name for f in fields(Report)],
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
