"""``compress(..., allocate="auto")``: estimate every targeted matrix's error curves once, choose formats and
ranks under the global budget (:mod:`kcompress.allocation.choose`), then fit only the chosen ones through the usual
``compress`` with per-matrix overrides.

:func:`prepare` does the expensive part (planning, second moments, error curves) and is reused by the
budget search for every budget it tries; :func:`compress_prepared` turns one budget into a compressed model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from kcompress.allocation.choose import OBJECTIVES, Allocation, Candidate, Option, allocate, budget_for, check_budget, estimate
from kcompress.calibration.moments import SecondMoment, collect_second_moments
from kcompress.calibration.run import CalibrationOptions
from kcompress.errors import KCompressError
from kcompress.formats import get_format
from kcompress.formats.data_fit import DataFitSettings, output_error
from kcompress.progress import ProgressEvent
from kcompress.report.record import Report

ALLOCATIONS = ("uniform", "auto")
#: ``compress`` keywords that decide which matrices are targeted and their modes
PLAN_KEYS = ("include", "exclude", "targets", "gates", "order", "modes", "overrides", "fit_options")
#: override keys the allocation sets itself
ALLOCATED_KEYS = ("format", "rank", "ratio")


@dataclass(frozen=True)
class Prepared:
    """Everything a budget needs: the candidates (targeted matrices with their moments), the options of
    each (estimated error curves), the formats and the objective."""

    formats: tuple[str, ...]
    objective: str
    candidates: tuple[Candidate, ...]
    options: tuple[tuple[Option, ...], ...]

    @property
    def dense(self) -> int:
        """Dense parameters (= dense MACs per vector) of the targeted matrices."""
        return sum(c.dense_params for c in self.candidates)

    def allocate(self, ratio: Optional[float] = None, params: Optional[int] = None) -> Allocation:
        return allocate(self.candidates, self.options, budget_for(self.candidates, ratio, params), self.objective)


def check_formats(format: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """One format name or a list of them -> registered compression format names (no duplicates)."""
    names = [format] if isinstance(format, str) else format
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise KCompressError(f"format must be a name or a list of names, got {format!r}")
    classes = list(dict.fromkeys(get_format(name) for name in names))
    kept = [cls.name for cls in classes if not cls.compresses]
    if kept:
        raise KCompressError(f"{kept[0]!r} is not a compression format")
    return tuple(cls.name for cls in classes)


def prepare(model: nn.Module, format: Union[str, Sequence[str]], *, objective: str = "size",
            calibration: Any = None, calibrate_samples: Optional[int] = None, seed: int = 0,
            settings: DataFitSettings = DataFitSettings(), **plan_options: Any) -> Prepared:
    """Plan the targeted matrices for every format, collect their inputs' second moments (and, with
    ``settings.weighted_rows``, their gate rows' weights) from ``calibration`` (identity without it: the weight
    error), and estimate every format's error curve."""
    formats = check_formats(format)
    if objective not in OBJECTIVES:
        raise KCompressError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    _check_overrides(plan_options.get("overrides"))
    from kcompress.runs.convert import plan_matrices

    plans = {fmt: plan_matrices(model, fmt, rank=1, **plan_options) for fmt in formats}
    first = plans[formats[0]]
    if not first:
        raise KCompressError("nothing to allocate: no matrix is targeted")
    layers = list(dict.fromkeys(plan.layer for plan in first))
    moments = _moments(model, calibration, layers, seed, calibrate_samples)
    candidates = []
    for index, plan in enumerate(first):
        weight = getattr(model.get_submodule(plan.layer), plan.matrix).detach().to(torch.float64)
        moment = moments.get(plan.name)
        identity = torch.eye(weight.shape[1], dtype=torch.float64)
        candidates.append(Candidate(
            plan.name, weight, identity if moment is None else moment.fit.double(),
            identity if moment is None else moment.holdout.double(),
            {fmt: plans[fmt][index].tensorization for fmt in formats}, plan.blocks, calibrated=moment is not None,
            row_weights=moment.row_weights if moment is not None and settings.weighted_rows else None,
        ))
    options = estimate(candidates, formats, objective=objective, seed=seed, settings=settings)
    return Prepared(formats, objective, tuple(candidates), tuple(tuple(o) for o in options))


def compress_prepared(model: nn.Module, prepared: Prepared, allocation: Allocation,
                      **compress_options: Any) -> tuple[nn.Module, Report]:
    """Fit ``allocation`` (from ``prepared.allocate``) with :func:`kcompress.compress`; the report carries
    the allocation table with each matrix's measured output error (held-out moment) and execution path."""
    from kcompress.runs.convert import compress

    overrides = {**dict(compress_options.pop("overrides", None) or {}), **allocation.overrides()}
    compressed, report = compress(model, prepared.formats[0], rank=1, overrides=overrides, **compress_options)
    attach_allocation(report, compressed, prepared, allocation)
    return compressed, report


def attach_allocation(report: Report, compressed: nn.Module, prepared: Prepared, allocation: Allocation) -> None:
    """Put ``allocation`` into the report of its fit: format ``auto(...)``, the options, and the table with
    each matrix's measured relative output error (held-out moment) and execution path."""
    _measure(compressed, prepared, allocation)
    report.format = "auto(" + ",".join(prepared.formats) + ")"
    report.options.update(format=list(prepared.formats), rank=None, allocate="auto",
                          objective=prepared.objective, budget=allocation.budget)
    report.allocation = allocation.to_dict()


def compress_allocated(model: nn.Module, format: Union[str, Sequence[str]], allocate: str, *,
                       rank: Any = None, ratio: Optional[float] = None, params: Optional[int] = None,
                       objective: str = "size", **compress_options: Any) -> tuple[nn.Module, Report]:
    """:func:`kcompress.compress` with ``allocate="auto"`` (see :mod:`kcompress.allocation.choose`)."""
    check_allocation(format, allocate, rank, ratio, params, objective, compress_options.get("overrides"))
    progress = compress_options.get("progress")
    if progress is not None:
        progress(ProgressEvent("step", "allocate", message="estimating error curves ..."))
    prepared = prepare_for(model, format, objective, compress_options)
    allocation = prepared.allocate(ratio, params)
    return compress_prepared(model, prepared, allocation, ratio=None, **compress_options)


def check_allocation(format: Union[str, Sequence[str]], allocate: str, rank: Any, ratio: Optional[float],
                     params: Optional[int], objective: str, overrides: Optional[Mapping[str, Any]]) -> None:
    """The settings of an allocated compression, each problem a one-line :class:`KCompressError`."""
    if allocate not in ALLOCATIONS:
        raise KCompressError(f"allocate must be one of {', '.join(ALLOCATIONS)}, got {allocate!r}")
    if allocate == "uniform":
        raise KCompressError("several formats or a parameter count need allocate='auto'")
    if rank is not None:
        raise KCompressError("allocate='auto' chooses the ranks: give ratio or params, not rank")
    check_budget(ratio, params)
    check_formats(format)
    if objective not in OBJECTIVES:
        raise KCompressError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    _check_overrides(overrides)


def prepare_for(model: nn.Module, format: Union[str, Sequence[str]], objective: str,
                compress_options: Mapping[str, Any]) -> Prepared:
    """:func:`prepare` with the settings :func:`kcompress.compress` keywords ``compress_options`` imply
    (calibration data and samples, the data-aware fit's settings, seed, targets, modes, ...)."""
    settings = CalibrationOptions.from_mapping(compress_options.get("calibrate_options")).fit_settings()
    return prepare(model, format, objective=objective, calibration=compress_options.get("calibration"),
                   calibrate_samples=compress_options.get("calibrate_samples"),
                   seed=compress_options.get("seed") or 0, settings=settings,
                   **{key: compress_options.get(key) for key in PLAN_KEYS})


def _check_overrides(overrides: Optional[Mapping[str, Mapping[str, Any]]]) -> None:
    for glob, settings in (overrides or {}).items():
        fixed = sorted(set(settings or {}) & set(ALLOCATED_KEYS))
        if fixed:
            raise KCompressError(f"override {glob!r} sets {', '.join(fixed)}, which allocate='auto' chooses; "
                                 f"leave it out or use allocate='uniform'")


def _moments(model: nn.Module, calibration: Any, layers: list[str], seed: int,
             samples: Optional[int]) -> dict[str, SecondMoment]:
    """``{matrix name: SecondMoment}`` of the dense model's ``layers`` from the calibration data (empty
    without it)."""
    if calibration is None:
        return {}
    extra = {} if samples is None else {"samples": samples}
    return collect_second_moments(model, calibration, names=layers, seed=seed, **extra)


def _measure(model: nn.Module, prepared: Prepared, allocation: Allocation) -> None:
    """Fill each row's measured relative output error (held-out moment) and execution path."""
    for candidate, row in zip(prepared.candidates, allocation.rows):
        layer_name, _, matrix = candidate.name.rpartition(".")
        layer = model.get_submodule(layer_name)
        approximation = layer.matrices[matrix].reconstruct().detach()
        row.measured_error = output_error(candidate.weight, approximation, candidate.holdout, candidate.row_weights)
        row.path = getattr(layer, "execution", {}).get(matrix)
