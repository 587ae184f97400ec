"""The rows of a report: one per matrix (:class:`MatrixReport`) and one per layer left alone
(:class:`SkippedLayer`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional, Union

from kcompress.formats import get_format

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
    #: measured ``time(x @ W.T) / time(multiply)`` at batch 16 on the machine that compressed, median of
    #: interleaved runs (None: not measured, or the matrix runs materialized, i.e. as the dense product)
    measured_speedup: Optional[float] = None
    #: interquartile spread of ``measured_speedup`` relative to it (e.g. 0.05 = ±5 %)
    speed_spread: Optional[float] = None
    #: how the matrix runs: ``"factorized"`` or ``"materialized"`` (see ``kcompress.set_execution``)
    execution: Optional[str] = None
    #: with calibration data: the relative output error ``‖(W − Ŵ) X‖ / ‖W X‖`` on held-out calibration inputs
    #: of the plain fit and of the data-aware fit (which may have a weight error above 1, see docs/calibration.md)
    output_error_before: Optional[float] = None
    output_error_after: Optional[float] = None
    #: calibration sequences behind the matrix's statistics, and the seconds of its data-aware fit
    calibration_samples: Optional[int] = None
    data_fit_seconds: Optional[float] = None

    @property
    def name(self) -> str:
        """``"layer.matrix"`` (just the matrix for a model that is itself the layer)."""
        return qualified_name(self.layer, self.matrix)

    @property
    def compression_ratio(self) -> float:
        return ratio(self.params_before, self.params_after)

    @property
    def compressed(self) -> bool:
        """False for a matrix kept as it is (its format does not compress, :attr:`Factorization.compresses`)."""
        return get_format(self.format).compresses

    @property
    def macs_ratio(self) -> float:
        """Dense MACs over compressed MACs: above 1 is predicted faster."""
        return ratio(self.macs_before, self.macs_after)

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



def qualified_name(layer: str, matrix: str) -> str:
    """``"rnn.weight_ih_l0"``; just ``matrix`` when the layer is the model itself (``layer == ""``)."""
    return f"{layer}.{matrix}" if layer else matrix


def ratio(before: float, after: float) -> float:
    """``before / after`` (1 when ``after`` is 0)."""
    return float(before) / float(after) if after else 1.0
