"""The calibration stages of ``compress``: data-aware fitting of each matrix, unlabeled distillation from
the dense model, and the whole model's agreement with it, all on the calibration inputs only (no labels).

:class:`CalibrationOptions` holds their settings; :class:`CalibrationRun` is what ``compress`` calls:
``refine`` per fitted matrix (statistics from :class:`~kcompress.calibration.moments.Calibrator`, fit through the
format's ``fit_to_data``) and ``finish`` once the model is compressed (distillation, agreement, the
report's ``calibration`` record).
"""

from __future__ import annotations

import time
from copy import deepcopy
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal, Mapping, Optional, Sequence, cast

import torch
from torch import Tensor, nn

from kcompress.calibration.augment import AugmentedCalls
from kcompress.calibration.moments import (
    CalibrationData,
    CalibrationSet,
    Calibrator,
    Inputs,
    batch_rows,
    calibration_set,
)
from kcompress.config import CalibrationOptions, CompressConfig
from kcompress.fitting.layers import fit_layers
from kcompress.fitting.planning import MatrixPlan
from kcompress.formats import DataFitInfo, DataFitSettings, ProgressFn
from kcompress.formats.data_fit import budgeted
from kcompress.nn.paths import compressed_layers, set_execution
from kcompress.progress import ProgressCallback, ProgressEvent, relabelled
from kcompress.report.record import Report
from kcompress.tuning.agreement import best_index, better, output_agreement
from kcompress.tuning.finetune import FinetuneResult, finetune

#: optimizer steps at most of each screened candidate, and at most half of a matrix's steps
#: (:meth:`CalibrationRun.fit`)
SCREEN_ITERATIONS = 10
#: what the fit loop returns: the model and its report rows
FitResult = tuple[nn.Module, list]


@dataclass(frozen=True)
class _Candidate:
    """One candidate's (ridge, gate weighting) fitted model: its held-out agreement with the dense model
    (:func:`~kcompress.tuning.agreement.output_agreement`), the fit loop's result, the settings, its matrices'
    data-aware fits per (layer, matrix), and whether a screened refinement was cut short."""

    agreement: dict[str, Any]
    result: FitResult
    settings: DataFitSettings
    refined: dict[tuple[str, str], nn.Module]
    cut: bool


#: how far a candidate's refinements go: all of a matrix's steps, a screening cut, or the rest of a screened one
Stage = Literal["full", "screen", "finish"]


class CalibrationRun:
    """The calibration of one ``compress`` call: the calibration set and the config's calibration and
    recovery settings. Made (and the data checked) before any fit.
    """

    def __init__(self, data: CalibrationData, config: CompressConfig) -> None:
        self.options = config.calibration
        self.distill_epochs = config.recovery.fit_epochs
        self.candidates = self.options.candidate_settings()
        self.settings = self.candidates[0]
        self.data = calibration_set(data, self.options.samples, self.options.holdout, config.seed)
        self.calibrator: Optional[Calibrator] = None
        self.seconds = 0.0
        #: with several candidates: each one's held-out agreement with the dense model
        self.scores: list[dict[str, Any]] = []
        #: per matrix name: its plain fit, the same for every candidate (:meth:`plain_fit`)
        self.plain: dict[str, nn.Module] = {}

    def start(self, model: nn.Module, layers: Sequence[str]) -> None:
        """Before the first fit: ``model`` is the (copied) dense model about to be compressed, ``layers`` the
        qualified names of the layers to compress."""
        begin = time.perf_counter()
        self.calibrator = Calibrator(model, self.data, layers, self.options.source)
        self.seconds += time.perf_counter() - begin

    def fit(self, model: nn.Module, teacher: nn.Module, plans: Mapping[str, Mapping[str, MatrixPlan]], seed: int,
            progress: Optional[ProgressCallback], copy: Callable[[nn.Module], nn.Module]) -> FitResult:
        """Fit the planned layers of ``model`` (:func:`~kcompress.fitting.layers.fit_layers`) once per candidate of
        :meth:`CalibrationOptions.candidate_settings` (ridge, gate weighting) on a copy of the dense ``model``,
        each matrix's refinement starting from its fit in the previous candidate: the first refined with all its
        steps, the others screened (a few steps, :class:`_Refinement`). When a screened candidate cut short has
        the outputs closest to ``teacher``'s on the held-out calibration inputs, it is refined on for the rest of
        its steps (on ``model``). Returns the result closest to ``teacher``'s of all
        (:func:`~kcompress.tuning.agreement.better`: the agreement of its decisions, the relative output error
        breaking ties)."""
        self.scores, self.plain = [], {}

        def candidate(target: nn.Module, settings: DataFitSettings, starts: dict[tuple[str, str], nn.Module],
                      stage: Stage) -> tuple[FitResult, _Refinement]:
            if self.calibrator is None or self.options.source != "dense":
                self.start(target, list(plans))
            refinement = _Refinement(self, settings, stage, starts)
            return fit_layers(target, plans, seed, progress, refinement), refinement

        if len(self.candidates) == 1:
            return candidate(model, self.candidates[0], {}, "full")[0]
        starts: dict[tuple[str, str], nn.Module]
        tried, starts = [], {}
        for index, settings in enumerate(self.candidates):
            _announce(progress, f"calibration candidate {index + 1}/{len(self.candidates)}", settings,
                      "screened: a few steps" if index else "all steps")
            result, refinement = candidate(copy(model), settings, starts, "screen" if index else "full")
            tried.append(self._scored(result, teacher, refinement))
            starts = refinement.refined
        best = tried[best_index([scored.agreement for scored in tried])]
        if best.cut:
            _announce(progress, "calibration: the closest screened candidate", best.settings, "its remaining steps")
            result, refinement = candidate(model, best.settings, best.refined, "finish")
            finished = self._scored(result, teacher, refinement)
            best = finished if better(finished.agreement, best.agreement) else best
        self.settings = best.settings
        return best.result

    def _scored(self, result: FitResult, teacher: nn.Module, refinement: "_Refinement") -> _Candidate:
        """The candidate just fitted, with its held-out agreement with ``teacher`` (also added to ``scores``)."""
        set_execution(result[0], "materialized", measure=False)  # same outputs, fast; compress sets it after
        agreement = output_agreement(result[0], teacher, self.data.holdout)
        settings = refinement.settings
        self.scores.append({"ridge": settings.ridge, "gate_weights": settings.weighted_rows,
                            "screened": refinement.stage == "screen", **agreement})
        return _Candidate(agreement, result, settings, refinement.refined, refinement.cut)

    def plain_fit(self, name: str, fit: Callable[[], nn.Module]) -> nn.Module:
        """Matrix ``name``'s fit without data, which every candidate refines in place: ``fit()`` for the first
        candidate, a copy of that module for the next ones (it depends on no data-fit setting)."""
        if name not in self.plain:
            self.plain[name] = fit()
        return deepcopy(self.plain[name])

    def finish(self, model: nn.Module, teacher: nn.Module, report: Report, seed: int,
               progress: Optional[ProgressCallback]) -> None:
        """Distil (when asked) and fill ``report.calibration``."""
        record: dict[str, Any] = {
            "samples": self.data.samples, "holdout_samples": self.data.holdout_samples,
            "statistics_seconds": self.seconds, "options": self.options.to_dict(), "ridge": self.settings.ridge,
            "gate_weights": self.settings.weighted_rows,
            "fit_candidates": self.scores,
            "agreement_after_fit": output_agreement(model, teacher, self.data.holdout),
        }
        if self.distill_epochs > 0:
            record["distill"] = self._distill(model, teacher, seed, progress)
        report.calibration = record

    def _distill(self, model: nn.Module, teacher: nn.Module, seed: int,
                 progress: Optional[ProgressCallback]) -> dict[str, Any]:
        """Distil ``model`` in place once per rate of :meth:`CalibrationOptions.distill_rates`, each from the
        calibrated start, and keep the result whose held-out outputs are closest to ``teacher``'s
        (:func:`~kcompress.tuning.agreement.better`, as ``ridge="auto"`` decides); the report's ``distill``
        record."""
        start = {name: value.detach().clone() for name, value in model.state_dict().items()}
        best: Optional[tuple[dict[str, Any], dict[str, Tensor]]] = None
        tried = []
        rates = self.options.distill_rates()
        for rate in rates:
            if progress is not None and len(rates) > 1:
                progress(ProgressEvent("step", "distill", message=f"distillation at learning rate {rate:g}"))
            model.load_state_dict(start)
            result = distill(model, teacher, self.data, self.distill_epochs, replace(self.options, distill_lr=rate),
                             seed, progress)
            record: dict[str, Any]
            record = {"lr": rate, "epochs_run": len(result.history) - 1, "best_epoch": result.best_epoch,
                      "matched_layers": matched_layers(model, self.options), "holdout_loss": result.best_val,
                      "agreement": output_agreement(model, teacher, self.data.holdout)}
            tried.append({key: record[key] for key in ("lr", "epochs_run", "holdout_loss", "agreement")})
            if best is None or better(record["agreement"], best[0]["agreement"]):
                best = (record, {name: value.detach().clone() for name, value in model.state_dict().items()})
        assert best is not None
        model.load_state_dict(best[1])
        return {**best[0], "lr_candidates": tried if len(tried) > 1 else []}


def _announce(progress: Optional[ProgressCallback], what: str, settings: DataFitSettings, steps: str) -> None:
    """A progress line naming the candidate whose matrix fits follow."""
    if progress is not None:
        weights = "on" if settings.weighted_rows else "off"
        progress(ProgressEvent("step", "calibration", message=f"{what}: ridge {settings.ridge:g}, gate-row weights "
                                                              f"{weights} ({steps})"))


class _Refinement:
    """One candidate's data-aware fits (the :class:`~kcompress.fitting.layers.Refiner` of its fit): every
    matrix refined at ``settings``, starting from ``starts``, for as many steps as ``stage`` allows; collects
    the refined modules and whether a screened refinement stopped at its cap."""

    def __init__(self, run: CalibrationRun, settings: DataFitSettings, stage: Stage,
                 starts: Mapping[tuple[str, str], nn.Module]) -> None:
        self.run, self.settings, self.stage, self.starts = run, settings, stage, starts
        self.refined: dict[tuple[str, str], nn.Module] = {}
        self.cut = False

    def plain_fit(self, name: str, fit: Callable[[], nn.Module]) -> nn.Module:
        return self.run.plain_fit(name, fit)

    def refine(self, model: nn.Module, layer: str, matrix: str, module: nn.Module, weight: Tensor,
               fitted: Mapping[str, nn.Module], seed: int, progress: Optional[ProgressFn]
               ) -> Optional[tuple[DataFitInfo, int]]:
        """Fit ``module`` (already fitted to ``weight``) to the data of ``layer.matrix``; ``(info, calibration
        samples)``, or None when the model never ran that layer on the calibration data. The matrix's steps
        (``settings.iterations`` within the work budget, :func:`~kcompress.formats.data_fit.budgeted`) all at the
        ``"full"`` stage; at most :data:`SCREEN_ITERATIONS` and half of them at ``"screen"``; the rest at
        ``"finish"``, which continues a screened candidate."""
        calibrator = self.run.calibrator
        assert calibrator is not None, "start() first"
        begin = time.perf_counter()
        moment = calibrator.moment(model, layer, matrix, fitted)
        self.run.seconds += time.perf_counter() - begin
        if moment is None:
            return None
        steps = budgeted(self.settings, tuple(weight.shape)).iterations
        screened = min(steps // 2, SCREEN_ITERATIONS)
        limit = {"full": steps, "screen": screened, "finish": steps - screened}[self.stage]
        info = module.fit_to_data(weight, moment.fit, moment.holdout, replace(self.settings, iterations=limit),  # type: ignore[operator]  # nn.Module attrs typed Tensor | Module
                                  seed=seed, progress=progress, start=self.starts.get((layer, matrix)),
                                  row_weights=moment.row_weights)
        self.refined[(layer, matrix)] = module
        self.cut = self.cut or (self.stage == "screen" and screened < steps and info.iterations >= limit)
        return info, moment.samples


def distill(
    model: nn.Module,
    teacher: nn.Module,
    calibration: CalibrationSet,
    epochs: int,
    options: CalibrationOptions = CalibrationOptions(),
    seed: int = 0,
    progress: Optional[ProgressCallback] = None,
) -> FinetuneResult:
    """Train ``model`` in place to match ``teacher``'s outputs on the fitting calls of ``calibration`` and on
    augmented copies of them (``options.augmentation()``, labelled by the teacher), and the outputs of its
    compressed layers to the teacher's layers of the same names (:func:`matched_layers`); early stopping on
    the held-out calls as they are (:func:`kcompress.finetune` with ``loss="distill"``: the placeholder
    targets it is handed are never read)."""
    calls = AugmentedCalls(calibration.fit, options.augmentation(), seed)
    # cast: distill is called with a numeric distill_lr (one of distill_rates())
    return finetune(model, calls, teacher=teacher, epochs=epochs, lr=cast(float, options.distill_lr),
                    loss="distill", task=options.task, val_data=_unlabeled(calibration.holdout),
                    patience=options.patience, seed=seed, progress=relabelled(progress, "epoch", "distill"),
                    match_layers=matched_layers(model, options), match_weight=options.match_weight)


def matched_layers(model: nn.Module, options: CalibrationOptions) -> list[str]:
    """The qualified names of ``model``'s compressed layers, whose outputs distillation matches (none with
    ``match_weight=0``)."""
    return list(compressed_layers(model)) if options.match_weight > 0 else []


def _unlabeled(calls: Sequence[Inputs]) -> list[tuple[Inputs, Tensor]]:
    """``(inputs, placeholder)`` batches: finetune's batch shape; the placeholder only counts the rows."""
    return [(call, torch.zeros(batch_rows(call))) for call in calls]
