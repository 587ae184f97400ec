"""Fitting planned matrices: each selected layer becomes its compressed drop-in, matrix by matrix (with a
data-aware refinement when calibrating), with progress events and one report row per matrix.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, cast

from torch import Tensor, nn

from kcompress import formats
from kcompress.errors import KCompressError
from kcompress.fitting.planning import MatrixPlan
from kcompress.formats import DataFitInfo, FitInfo, Stack, relative_error
from kcompress.nn import COMPRESSED_TYPES, MatrixBuilder
from kcompress.progress import ProgressCallback, ProgressEvent
from kcompress.report.rows import MatrixReport


class Refiner(Protocol):
    """What fits each matrix to data after its plain fit (:mod:`kcompress.calibration.run` implements it)."""

    def plain_fit(self, name: str, fit: Callable[[], nn.Module]) -> nn.Module:
        """Matrix ``name``'s fit without data (``fit()``, or a copy of an earlier identical fit)."""

    def refine(self, model: nn.Module, layer: str, matrix: str, module: nn.Module, weight: Tensor,
               fitted: Mapping[str, nn.Module], seed: int, progress: Optional[formats.ProgressFn]
               ) -> Optional[tuple[DataFitInfo, int]]:
        """Fit ``module`` (fitted to ``weight``) to ``layer.matrix``'s data in ``model``; ``(info, samples)``, or
        None when that layer never ran on the data."""


def fit_layers(
    model: nn.Module, plans: Mapping[str, Mapping[str, MatrixPlan]], seed: int, progress: Optional[ProgressCallback],
    refiner: Optional[Refiner] = None,
) -> tuple[nn.Module, list[MatrixReport]]:
    """Replace each planned layer of ``model`` by its fitted drop-in (same training mode), in plan order;
    returns the model (the drop-in itself when the model is the layer) and the report rows in plan order.
    With a ``refiner`` each targeted matrix is then fitted to its data."""
    fitter = _Fitter(seed, progress, sum(p.targeted for layer in plans.values() for p in layer.values()), refiner)
    paths = module_paths(model)  # once: the planned layers hold no planned layer, so replacing keeps the rest
    for name, layer_plans in plans.items():
        fitter.model = model
        dense = model.get_submodule(name)
        compressed = COMPRESSED_TYPES[type(dense)].from_dense(dense, fitter.builder(layer_plans))
        compressed.train(dense.training)
        model = replace_module(model, dense, compressed, paths.get(id(dense), []))
    return model, fitter.rows


def module_paths(model: nn.Module) -> dict[int, list[str]]:
    """Every path of every submodule, by the module's ``id`` (a shared module has several paths)."""
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    return paths


class _Fitter:
    """Fits planned matrices, sends progress events and collects the report rows.

    Events per targeted matrix: ``layer`` (``index`` = 1-based position among the ``total`` targeted
    matrices), ``iteration`` (``index``/``total`` as the fit reports them; ``message`` = ``"gate g/G"`` for
    separate gates) and ``done`` (``error`` = relative error of the whole matrix).
    """

    def __init__(self, seed: int, progress: Optional[ProgressCallback], total: int,
                 refiner: Optional[Refiner] = None) -> None:
        self.seed, self.progress, self.total, self.refiner = seed, progress, total, refiner
        self.index = 0
        self.rows: list[MatrixReport] = []
        #: the model being compressed, as it is while the current layer is fitted
        self.model: Optional[nn.Module] = None

    def builder(self, plans: Mapping[str, MatrixPlan]) -> MatrixBuilder:
        """The ``from_dense`` builder of one layer: fits ``plans[name]`` (the gate count is in the plan)."""
        fitted: dict[str, nn.Module] = {}

        def build(name: str, weight: Tensor, gates: int) -> nn.Module:
            fitted[name] = self.fit(plans[name], weight, fitted)
            return fitted[name]

        return build

    def fit(self, plan: MatrixPlan, weight: Tensor, fitted: Optional[Mapping[str, nn.Module]] = None) -> nn.Module:
        """The fitted matrix module for ``weight (M, N)``: one fit, or a ``Stack`` of ``plan.blocks`` fits."""
        if plan.targeted:
            self.index += 1
            self._emit(ProgressEvent("layer", plan.name, self.index, self.total))
        if self.refiner is None:
            module = self._plain_fit(plan, weight)
        else:  # the same plain fit for every candidate: fitted once, copied after
            module = self.refiner.plain_fit(plan.name, lambda: self._plain_fit(plan, weight))
        data_fit = None
        if plan.targeted and self.refiner is not None and self.model is not None:
            data_fit = self.refiner.refine(self.model, plan.layer, plan.matrix, module, weight, fitted or {},
                                               self.seed, self._iteration_callback(plan, 0, 1))
        error = relative_error(weight, module.reconstruct())  # type: ignore[operator]  # nn.Module attrs typed Tensor | Module
        if plan.targeted:
            self._emit(ProgressEvent("done", plan.name, self.index, self.total, error=error))
        self.rows.append(_matrix_report(plan, module, error, data_fit))
        return module

    def _plain_fit(self, plan: MatrixPlan, weight: Tensor) -> nn.Module:
        """``weight (M, N)`` fitted as planned, without data: one fit, or a ``Stack`` of ``plan.blocks`` fits."""
        blocks = weight.chunk(plan.blocks) if plan.blocks > 1 else [weight]
        try:
            parts = [
                plan.fmt.fit(block, plan.tensorization, plan.rank_used, seed=self.seed,
                             progress=self._iteration_callback(plan, g, len(blocks)), options=plan.options)
                for g, block in enumerate(blocks)
            ]
        except KCompressError as error:
            raise KCompressError(f"{plan.name}: {error}") from None
        return Stack(parts) if plan.blocks > 1 else parts[0]

    def _emit(self, event: ProgressEvent) -> None:
        if self.progress is not None:
            self.progress(event)

    def _iteration_callback(self, plan: MatrixPlan, gate: int, gates: int) -> Optional[formats.ProgressFn]:
        if self.progress is None or not plan.targeted:
            return None
        message = f"gate {gate + 1}/{gates}" if gates > 1 else ""
        return lambda it, total, error: self._emit(
            ProgressEvent("iteration", plan.name, it, total, float(error), message)
        )


def _matrix_report(
    plan: MatrixPlan, module: nn.Module, error: float, data_fit: Optional[tuple[DataFitInfo, int]] = None
) -> MatrixReport:
    """The report row of a fitted matrix; counts from the module's closed forms, error recomputed;
    ``data_fit``: the data-aware fit's result and the calibration sample count."""
    rows, cols = plan.shape
    info = cast(FitInfo, module.fit_info)  # nn.Module attributes are typed Tensor | Module
    calibrated: dict[str, Any] = {} if data_fit is None else {
        "output_error_before": data_fit[0].before, "output_error_after": data_fit[0].after,
        "calibration_samples": data_fit[1], "data_fit_seconds": data_fit[0].seconds,
    }
    return MatrixReport(
        layer=plan.layer,
        layer_type=plan.layer_type,
        matrix=plan.matrix,
        shape=plan.shape,
        format=plan.fmt.name,
        modes=plan.modes(),
        rank_requested=plan.rank_requested,
        rank_used=plan.rank_used,
        params_before=rows * cols,
        params_after=int(module.num_params()),  # type: ignore[operator]  # nn.Module attrs typed Tensor | Module
        macs_before=rows * cols,
        macs_after=int(module.macs_per_vector()),  # type: ignore[operator]  # nn.Module attrs typed Tensor | Module
        relative_error=error,
        fit_seconds=float(info.seconds),
        iterations=int(info.iterations),
        clamped=plan.clamped,
        **calibrated,
    )


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module, paths: Sequence[str]) -> nn.Module:
    """Put ``new`` at each of ``old``'s ``paths`` in ``model`` (``setattr`` on the parents); returns the
    model, which is ``new`` itself when ``old`` is the model."""
    if model is old:
        return new
    for path in paths:
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model
