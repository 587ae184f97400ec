"""An allocated budget resolved to per-matrix choices *before* any fit: estimate every targeted matrix's error
curves once, then choose formats and ranks under the global budget (:mod:`kcompress.allocation.choose`).

:func:`prepare` does the expensive part (planning, second moments, error curves) and is reused by the
budget search for every budget it tries; :meth:`Prepared.allocate` turns one budget into an
:class:`~kcompress.allocation.choose.Allocation`, whose :meth:`~Allocation.choices` the fit applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from kcompress.allocation.choose import Allocation, Candidate, Option, allocate, budget_for, estimate
from kcompress.calibration.moments import SecondMoment, collect_second_moments
from kcompress.config import CompressConfig
from kcompress.errors import KCompressError
from kcompress.fitting.planning import plan_compression, targeted_plans
from kcompress.formats.data_fit import output_error
from kcompress.nn import COMPRESSED_TYPES
from kcompress.report.record import Report


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


def prepare(model: nn.Module, config: CompressConfig, calibration: Any = None) -> Prepared:
    """Plan the targeted matrices for every format of ``config``, collect their inputs' second moments (and,
    with gate weights, their rows' weights) from ``calibration`` (identity without it: the weight error), and
    estimate every format's error curve."""
    formats = config.formats
    plans = {fmt: targeted_plans(plan_compression(model, config.replace(format=fmt), Report())) for fmt in formats}
    first = plans[formats[0]]
    if not first:
        raise KCompressError("nothing to allocate: no matrix is targeted")
    layers = list(dict.fromkeys(plan.layer for plan in first))
    moments = _moments(model, calibration, layers, config)
    settings = config.calibration.fit_settings()
    candidates = []
    for index, plan in enumerate(first):
        module = model.get_submodule(plan.layer)
        weight = COMPRESSED_TYPES[type(module)].dense_matrix(module, plan.matrix).detach().to(torch.float64)
        moment = moments.get(plan.name)
        identity = torch.eye(weight.shape[1], dtype=torch.float64)
        candidates.append(Candidate(
            plan.name, weight, identity if moment is None else moment.fit.double(),
            identity if moment is None else moment.holdout.double(),
            {fmt: plans[fmt][index].tensorization for fmt in formats}, plan.blocks, calibrated=moment is not None,
            row_weights=moment.row_weights if moment is not None and settings.weighted_rows else None,
        ))
    options = estimate(candidates, formats, objective=config.budget.objective, seed=config.seed, settings=settings)
    return Prepared(formats, config.budget.objective, tuple(candidates), tuple(tuple(o) for o in options))


def attach_allocation(report: Report, compressed: nn.Module, prepared: Prepared, allocation: Allocation) -> None:
    """Put ``allocation`` into the report of its fit: format ``auto(...)``, the budget, and the table with
    each matrix's measured relative output error (held-out moment) and execution path."""
    _measure(compressed, prepared, allocation)
    report.format = "auto(" + ",".join(prepared.formats) + ")"
    report.options["budget"] = {**report.options.get("budget", {}), "allocated": allocation.budget}
    report.allocation = allocation.to_dict()


def _moments(model: nn.Module, calibration: Any, layers: list[str], config: CompressConfig) -> dict[str, SecondMoment]:
    """``{matrix name: SecondMoment}`` of the dense model's ``layers`` from the calibration data (empty
    without it)."""
    if calibration is None:
        return {}
    return collect_second_moments(model, calibration, names=layers, seed=config.seed,
                                  samples=config.calibration.samples)


def _measure(model: nn.Module, prepared: Prepared, allocation: Allocation) -> None:
    """Fill each row's measured relative output error (held-out moment) and execution path."""
    for candidate, row in zip(prepared.candidates, allocation.rows):
        layer_name, _, matrix = candidate.name.rpartition(".")
        layer: Any = model.get_submodule(layer_name)  # Any: a compressed layer; nn.Module attrs typed Tensor | Module
        approximation = layer.matrices[matrix].reconstruct().detach()
        row.measured_error = output_error(candidate.weight, approximation, candidate.holdout, candidate.row_weights)
        row.path = getattr(layer, "execution", {}).get(matrix)
