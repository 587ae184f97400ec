"""Choose each matrix's format and rank under one global budget from cheap estimates of the output error.

For a matrix ``W (M, N)`` whose inputs have the second moment ``C (N, N)`` (identity without calibration
data), the output error of an approximation ``Ŵ`` is ``e = tr(D E C Eᵀ)`` with ``E = W − Ŵ`` and ``D`` the
diagonal of the matrix's row weights (how much each gate row moves its layer's state,
:mod:`kcompress.calibration.gate_sensitivity`; the identity without): the squared output error ``‖(W − Ŵ) X‖²`` per
input, on the scale of what the matrix contributes, ``tr(D W C Wᵀ)``.
The allocation minimises ``Σ_matrices e`` subject to ``Σ cost ≤ budget``, where the cost of an option
(format, rank) is its closed-form parameter count (``objective="size"``) or its multiply MACs per input
vector (``objective="latency"``; options whose MACs exceed the dense product's are left out, so every
chosen matrix multiplies with at most the dense product's MACs).

Error curves: a format with a closed-form curve (:data:`SPECTRAL_FORMATS`: the data-aware truncated SVD,
one whitened decomposition whose truncations nest) gets the exact error at every rank at once; every other
format is fitted at a few ranks (:func:`sample_ranks`) and the error is interpolated
log-linearly in the parameter count between them. The choice is a multiple-choice knapsack solved
exactly by dynamic programming over the budget (costs rounded *up* to a budget unit, so the allocation
never exceeds the budget); only the chosen ranks are then fitted for real, by :func:`kcompress.compress`
with per-matrix overrides (:meth:`Allocation.overrides`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from kcompress.config.checks import check_budget, check_choice
from kcompress.errors import KCompressError
from kcompress.formats import Factorization, get_format
from kcompress.formats.data_fit import DataFitSettings, OutputErrors, whitened_svd
from kcompress.formats.tensorize import Tensorization
from kcompress.names import OBJECTIVES

#: largest number of budget units the dynamic programme uses (costs are rounded up to ``budget / RESOLUTION``)
RESOLUTION = 8192
#: compression ratios (of the matrix's dense size) at which formats without a closed-form curve are fitted
SAMPLE_RATIOS = (32.0, 12.0, 5.0, 2.0)
#: cap on the data-aware refinement steps of the fits that sample an error curve (30 chose the same
#: allocations as 100 on the JapaneseVowels LSTM and GRU at every ratio from 2x to 16x, in a third of the time)
ESTIMATE_ITERATIONS = 30

#: ``(weight block (M, N), moment C (N, N), settings, row weights (M,) or None) -> output error at ranks 0, 1, …``
Spectrum = Callable[[Tensor, Tensor, DataFitSettings, Optional[Tensor]], Tensor]
#: ``(format, weight block (M, N), tensorization, rank, candidate, seed, settings, row weights (M,) or None)
#: -> Ŵ (M, N)``
FitFunction = Callable[..., Tensor]


@dataclass(frozen=True)
class Candidate:
    """One targeted matrix: ``weight (M, N)``, the second moments of its inputs, ``moment (N, N)`` (fitted)
    and ``holdout (N, N)`` (held-out inputs; the identity for both without calibration data, i.e. weight
    error), ``blocks`` row blocks fitted separately (gates, ``gates="separate"``) and per format name the
    tensorization of one ``(M / blocks, N)`` block. ``calibrated`` is False for the identity moments.
    ``row_weights (M,)``: the output rows' weights (None: all 1)."""

    name: str
    weight: Tensor
    moment: Tensor
    holdout: Tensor
    tensorizations: Mapping[str, Tensorization]
    blocks: int = 1
    calibrated: bool = True
    row_weights: Optional[Tensor] = None

    @property
    def dense_params(self) -> int:
        return int(self.weight.numel())

    def parts(self) -> list[tuple[Tensor, Optional[Tensor]]]:
        """``(weight block, its row weights or None)`` per row block, float64."""
        blocks = self.weight.double().chunk(self.blocks)
        rows = [None] * len(blocks) if self.row_weights is None else self.row_weights.double().chunk(self.blocks)
        return list(zip(blocks, rows))

    def energy(self, weight: Optional[Tensor] = None, rows: Optional[Tensor] = None) -> float:
        """``tr(D W C Wᵀ)`` of the whole matrix (or of the block ``weight`` with row weights ``rows``): what it
        contributes to the outputs."""
        weight, rows = (self.weight, self.row_weights) if weight is None else (weight, rows)
        return OutputErrors(weight, self.moment, rows).reference

    def error(self, weight: Tensor, approximation: Tensor, rows: Optional[Tensor] = None) -> float:
        """``tr(D E C Eᵀ)`` of one block with row weights ``rows`` (see
        :class:`~kcompress.formats.data_fit.OutputErrors`)."""
        errors = OutputErrors(weight, self.moment, rows)
        return errors(approximation) ** 2 * errors.reference


@dataclass(frozen=True)
class Option:
    """One way to store a matrix: ``format`` at ``rank``, its closed-form ``params`` and ``macs`` (all
    blocks), and the estimated output error ``error`` (``tr(E C Eᵀ)``); ``sampled`` is True where the
    error comes from a fit or a closed form at exactly this rank, False where it is interpolated."""

    matrix: str
    format: str
    rank: int
    params: int
    macs: int
    error: float
    sampled: bool
    #: tensor bytes as an artifact stores the option (set for a size budget, :mod:`kcompress.allocation.size`)
    bytes: Optional[int] = None

    def cost(self, objective: str) -> int:
        """Parameters (``"size"``), MACs (``"latency"``) or stored bytes (``"bytes"``, a size budget)."""
        if objective == "bytes":
            assert self.bytes is not None, "a byte cost needs the option's bytes"
            return self.bytes
        return self.params if objective == "size" else self.macs


@dataclass
class AllocationRow:
    """The choice for one matrix with its dense size and ``energy = tr(W C Wᵀ)``. ``estimated_error`` is the
    relative output error ``sqrt(e / energy)``; ``measured_error`` is filled after the real fit."""

    matrix: str
    format: str
    rank: int
    params: int
    macs: int
    dense_params: int
    energy: float
    estimated_error: float
    measured_error: Optional[float] = None
    path: Optional[str] = None


@dataclass
class Allocation:
    """The chosen option per matrix, the budget (in parameters or MACs, see ``objective``) and its use."""

    objective: str
    budget: int
    used: int
    dense: int
    formats: list[str]
    rows: list[AllocationRow] = field(default_factory=list)

    def choices(self) -> dict[str, tuple[str, int]]:
        """``{qualified matrix name: (format, rank)}``: the per-matrix choices the fit applies
        (:func:`kcompress.fitting.planning.plan_compression`)."""
        return {row.matrix: (row.format, row.rank) for row in self.rows}

    @property
    def ratio(self) -> float:
        """Dense over allocated cost (parameters or MACs)."""
        return self.dense / self.used if self.used else math.inf

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------- error curves
def svd_curve(block: Tensor, moment: Tensor, settings: DataFitSettings, rows: Optional[Tensor] = None) -> Tensor:
    """``e[r] = tr(D E_r C E_rᵀ)`` for every rank ``r = 0 … min(M, N)`` of the data-aware truncated SVD
    (:func:`~kcompress.formats.data_fit.whitened_svd`, with the fit's ridge and the row weights ``rows``, ``D``
    their diagonal, identity when None): its factors ``Ŵ = L R`` nest across ranks, and ``L``'s columns are
    ``D``-orthogonal, so
    ``e[r] = tr(D W C Wᵀ) − 2 Σ_{i≤r} l_iᵀ D W C r_i + Σ_{i≤r} (l_iᵀ D l_i) r_iᵀ C r_i`` from one decomposition."""
    weight, moment = block.double(), moment.double()
    weights = torch.ones(weight.shape[0], dtype=torch.float64) if rows is None else rows.double()
    left, right = whitened_svd(weight, moment, min(weight.shape), settings.ridge, rows)
    cross = ((left.T @ (weights[:, None] * weight) @ moment) * right).sum(dim=1)
    square = (weights[:, None] * left.square()).sum(dim=0) * ((right @ moment) * right).sum(dim=1)
    energy = ((weight @ moment) * weight).sum(dim=1) @ weights
    return torch.cat([energy[None], energy - 2 * cross.cumsum(0) + square.cumsum(0)]).clamp_min(0)


#: formats whose output error at every rank follows from one decomposition (the whitened truncated SVD
#: nests across ranks); every other format is fitted at a few ranks
SPECTRAL_FORMATS: dict[str, Spectrum] = {"svd": svd_curve}


def fit_block(fmt: type[Factorization], block: Tensor, tz: Tensorization, rank: int, candidate: Candidate,
              seed: int, settings: DataFitSettings, rows: Optional[Tensor] = None) -> Tensor:
    """``Ŵ`` of one block as :func:`kcompress.compress` fits it: the format's own fit, then (with calibration
    data) :meth:`~kcompress.formats.Factorization.fit_to_data` with the block's row weights ``rows``; the
    default :data:`FitFunction`."""
    module = fmt.fit(block, tz, rank, seed=seed)
    if candidate.calibrated:
        module.fit_to_data(block, candidate.moment, candidate.holdout, settings, seed=seed, row_weights=rows)
    return module.reconstruct().detach()


def candidate_ranks(fmt: type[Factorization], tz: Tensorization, limit: int) -> list[int]:
    """Ranks 1, 2, ... of ``fmt`` for ``tz`` whose parameter count is at most ``limit`` (rank 1 always)."""
    ranks = []
    for rank in range(1, fmt.max_rank(tz) + 1):
        if rank > 1 and fmt.param_count(tz, rank) > limit:
            break
        ranks.append(rank)
    return ranks


def sample_ranks(fmt: type[Factorization], tz: Tensorization, ranks: Sequence[int]) -> list[int]:
    """Rank 1 and, per ratio of :data:`SAMPLE_RATIOS`, the largest rank of ``ranks`` within that ratio."""
    dense = tz.out_features * tz.in_features
    chosen = {ranks[0]}
    for ratio in SAMPLE_RATIOS:
        within = [r for r in ranks if fmt.param_count(tz, r) <= dense / ratio]
        if within:
            chosen.add(within[-1])
    return sorted(chosen)


def interpolate(params: Sequence[int], sampled: Mapping[int, float], floor: float) -> list[float]:
    """Errors at ``params`` from ``{sampled params: error}``: piecewise linear in ``(log params, log error)``,
    held constant outside the samples (``floor`` keeps logarithms finite)."""
    xs = np.log([float(p) for p in sorted(sampled)])
    ys = np.log([max(sampled[p], floor) for p in sorted(sampled)])
    return [float(v) for v in np.exp(np.interp(np.log(np.asarray(params, dtype=float)), xs, ys))]


def format_options(candidate: Candidate, fmt: type[Factorization], objective: str, seed: int,
                   settings: DataFitSettings, fit: FitFunction) -> list[Option]:
    """Every rank of ``fmt`` up to the matrix's dense size, with its estimated output error ``tr(E C Eᵀ)``."""
    tz = candidate.tensorizations[fmt.name]
    ranks = candidate_ranks(fmt, tz, candidate.dense_params // candidate.blocks)
    parts = candidate.parts()
    params = {r: candidate.blocks * fmt.param_count(tz, r) for r in ranks}
    macs = {r: candidate.blocks * fmt.macs(tz, r) for r in ranks}
    if fmt.name in SPECTRAL_FORMATS:
        curves = [SPECTRAL_FORMATS[fmt.name](block, candidate.moment, settings, rows) for block, rows in parts]
        errors = {r: float(sum(curve[min(r, len(curve) - 1)] for curve in curves)) for r in ranks}
        exact = set(ranks)
    else:
        exact = set(sample_ranks(fmt, tz, ranks))
        fitted = {r: sum(candidate.error(b, fit(fmt, b, tz, r, candidate, seed, settings, rows), rows)
                         for b, rows in parts)
                  for r in sorted(exact)}
        floor = 1e-12 * max(candidate.energy(), 1e-300)
        curve = interpolate([params[r] for r in ranks], {params[r]: e for r, e in fitted.items()}, floor)
        errors = {r: fitted.get(r, value) for r, value in zip(ranks, curve)}
    options = [Option(candidate.name, fmt.name, r, params[r], macs[r], errors[r], r in exact) for r in ranks]
    if objective == "latency":
        options = [o for o in options if o.macs <= candidate.dense_params]
    return options


def estimate(candidates: Sequence[Candidate], formats: Sequence[str], *, objective: str = "size", seed: int = 0,
             settings: DataFitSettings = DataFitSettings(), fit: FitFunction = fit_block) -> list[list[Option]]:
    """Per candidate, the options of every format (see :func:`format_options`). The data-aware refinement of
    the sampled fits runs at most :data:`ESTIMATE_ITERATIONS` steps (an estimate; the real fit runs all)."""
    check_choice("objective", objective, OBJECTIVES)
    settings = replace(settings, iterations=min(settings.iterations, ESTIMATE_ITERATIONS))
    classes = [get_format(name) for name in dict.fromkeys(formats)]
    return [[o for fmt in classes for o in format_options(c, fmt, objective, seed, settings, fit)]
            for c in candidates]


# ---------------------------------------------------------------------- the choice
def pareto(options: Sequence[Option], objective: str) -> list[Option]:
    """The options no other option beats in both cost and error (cheapest first; ties keep the first)."""
    front: list[Option] = []
    for option in sorted(options, key=lambda o: (o.cost(objective), o.error)):
        if not front or option.error < front[-1].error:
            front.append(option)
    return front


def solve(options: Sequence[Sequence[Option]], budget: int, objective: str = "size",
          resolution: int = RESOLUTION) -> list[Option]:
    """One option per matrix minimising the summed error with summed cost ``<= budget`` (exact up to the
    budget unit ``ceil(budget / resolution)``; costs are rounded up to it, so the budget always holds).

    Deterministic: among equal totals the cheaper option found first wins. A KCompressError when even the
    cheapest option of every matrix does not fit.
    """
    fronts = [pareto(o, objective) for o in options]
    if any(not front for front in fronts):
        raise KCompressError("a matrix has no option within its dense cost")
    cheapest = sum(front[0].cost(objective) for front in fronts)
    if cheapest > budget:
        raise KCompressError(f"the budget of {budget:,} {_unit(objective)} is below the smallest allocation "
                             f"({cheapest:,}); allow more {_unit(objective)}")
    unit = max(1, math.ceil(budget / resolution))
    chosen = _solve_in_units(fronts, budget, objective, unit)
    while chosen is None:  # rounding up made the budget infeasible: finer units (unit 1 is always feasible)
        unit = max(1, unit // 4)
        chosen = _solve_in_units(fronts, budget, objective, unit)
    return chosen


def _solve_in_units(fronts: Sequence[Sequence[Option]], budget: int, objective: str,
                    unit: int) -> Optional[list[Option]]:
    """The dynamic programme with costs rounded up to ``unit``; None when nothing fits after rounding."""
    capacity = budget // unit
    best = np.zeros(capacity + 1)
    choices = []
    for front in fronts:
        best, choice = _knapsack_step(best, front, objective, unit)
        choices.append(choice)
    if not np.isfinite(best[capacity]):
        return None
    chosen, left = [], capacity
    for front, choice in zip(reversed(fronts), reversed(choices)):
        option = front[int(choice[left])]
        chosen.append(option)
        left -= math.ceil(option.cost(objective) / unit)
    return chosen[::-1]


def _knapsack_step(best: np.ndarray, front: Sequence[Option], objective: str,
                   unit: int) -> tuple[np.ndarray, np.ndarray]:
    """``new[b] = min_o best[b − cost_o] + error_o`` and the index of the minimising option per ``b``."""
    new = np.full_like(best, np.inf)
    choice = np.full(best.shape, -1, dtype=np.int64)
    for index, option in enumerate(front):
        cost = math.ceil(option.cost(objective) / unit)
        if cost >= len(best):
            break
        shifted = np.full_like(best, np.inf)
        shifted[cost:] = best[: len(best) - cost] + option.error
        better = shifted < new
        new[better], choice[better] = shifted[better], index
    return new, choice


def allocate(candidates: Sequence[Candidate], options: Sequence[Sequence[Option]], budget: int,
             objective: str = "size") -> Allocation:
    """The :class:`Allocation` of :func:`solve` over ``options`` (from :func:`estimate`) for ``candidates``."""
    chosen = solve(options, budget, objective)
    rows = []
    for candidate, option in zip(candidates, chosen):
        energy = candidate.energy()
        estimated = math.sqrt(option.error / energy) if energy > 0 else 0.0
        rows.append(AllocationRow(candidate.name, option.format, option.rank, option.params, option.macs,
                                  candidate.dense_params, energy, estimated))
    formats = list(dict.fromkeys(o.format for opts in options for o in opts))
    dense = sum(c.dense_params for c in candidates)
    used = sum(o.cost(objective) for o in chosen)
    return Allocation(objective, int(budget), int(used), dense, formats, rows)


def budget_for(candidates: Sequence[Candidate], ratio: Optional[float] = None,
               params: Optional[int] = None) -> int:
    """The global budget: ``params`` as given, or the candidates' dense size (parameters, which equal the
    dense MACs per vector) divided by ``ratio``."""
    check_budget(ratio, params)
    if params is not None:
        return params
    assert ratio is not None  # check_budget requires exactly one of ratio and params
    return int(sum(c.dense_params for c in candidates) / ratio)


def _unit(objective: str) -> str:
    return {"size": "parameters", "bytes": "bytes"}.get(objective, "MACs")

