"""The calibration stages of ``compress``: data-aware fitting of each matrix, unlabeled distillation from
the dense model, and the whole model's agreement with it, all on the calibration inputs only (no labels).

:class:`CalibrationOptions` holds their settings; :class:`CalibrationRun` is what ``compress`` calls:
``refine`` per fitted matrix (statistics from :class:`~kcompress.calibrate.Calibrator`, fit through the
format's ``fit_to_data``) and ``finish`` once the model is compressed (distillation, agreement, the
report's ``calibration`` record).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
import time
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .augment import Augmentation, AugmentedCalls
from .calibrate import (
    DEFAULT_HOLDOUT,
    SOURCES,
    CalibrationData,
    CalibrationSet,
    Calibrator,
    Inputs,
    batch_rows,
    calibration_set,
)
from .errors import KCompressError
from .evaluate import TASKS, eval_mode, run_model
from .finetune import FinetuneResult, finetune
from .formats import DataFitInfo, DataFitSettings, ProgressFn
from .layer_match import first_tensor
from .nn.plan import compressed_layers, set_execution
from .progress import ProgressCallback
from .report import Report


#: ridges tried by ``ridge="auto"`` (the first is fitted first; see :meth:`CalibrationRun.fit`)
RIDGE_CANDIDATES = (1.0, 0.1, 0.01)
#: what the converter's fit loop returns: the model and its report rows
FitResult = tuple[nn.Module, list]


@dataclass(frozen=True)
class CalibrationOptions:
    """``source``: ``"dense"`` (every statistic from the dense model, one pass; measured better or equal in
    docs/benchmarks.md) or ``"compressed"`` (each layer's statistics from the model with the layers before it
    already compressed); ``holdout``: held-out fraction;
    ``ridge``, ``optimizer``, ``iterations``, ``lr``: the data-aware fit (:class:`DataFitSettings`);
    ``ridge="auto"`` fits the model once per ridge of :data:`RIDGE_CANDIDATES` and keeps the one whose
    outputs agree best with the dense model's on the held-out calibration inputs;
    ``distill_lr``, ``task`` (``classification``: KL on logits, ``regression``: MSE on outputs),
    ``patience`` (epochs without improvement of the held-out loss): the unlabeled distillation;
    ``augment_copies``, ``mixup``, ``jitter``, ``crop``: its teacher-labelled augmentation of the calibration
    inputs (:class:`kcompress.augment.Augmentation`; ``augment_copies=0``: none); ``match_weight``: weight of
    matching each compressed layer's outputs to the dense layer's (:mod:`kcompress.layer_match`; 0: off)."""

    source: str = "dense"
    holdout: float = DEFAULT_HOLDOUT
    ridge: Union[float, str] = "auto"
    optimizer: str = DataFitSettings.optimizer
    iterations: int = DataFitSettings.iterations
    lr: float = DataFitSettings.lr
    distill_lr: float = 1e-3
    task: str = "classification"
    patience: int = 50
    augment_copies: int = Augmentation.copies
    mixup: bool = Augmentation.mixup
    jitter: float = Augmentation.jitter
    crop: float = Augmentation.crop
    match_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise KCompressError(f"calibration source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if not 0.0 < self.holdout < 1.0:
            raise KCompressError(f"the held-out fraction must be between 0 and 1, got {self.holdout!r}")
        if not (self.distill_lr > 0 and math.isfinite(self.distill_lr)):
            raise KCompressError(f"distill_lr must be positive, got {self.distill_lr!r}")
        if self.task not in TASKS:
            raise KCompressError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise KCompressError(f"patience must be an integer >= 1, got {self.patience!r}")
        self.fit_settings()  # checks ridge, optimizer, iterations, lr
        self.augmentation()  # checks augment_copies, mixup, jitter, crop
        if isinstance(self.match_weight, bool) or not (isinstance(self.match_weight, (int, float))
                                                       and 0 <= self.match_weight < math.inf):
            raise KCompressError(f"match_weight must be a number >= 0, got {self.match_weight!r}")

    @classmethod
    def from_mapping(cls, options: Optional[Mapping[str, Any]]) -> "CalibrationOptions":
        """From ``compress(calibrate_options=...)``; unknown keys are an error."""
        options = dict(options or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise KCompressError(f"unknown calibrate_options {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        return cls(**options)

    def fit_settings(self) -> DataFitSettings:
        """The data-aware fit's settings (with ``ridge="auto"``: the first candidate ridge)."""
        return self.candidate_settings()[0]

    def candidate_settings(self) -> list[DataFitSettings]:
        """One :class:`DataFitSettings` per ridge to try (checked)."""
        if isinstance(self.ridge, str) and self.ridge != "auto":
            raise KCompressError(f"ridge must be a number >= 0 or 'auto', got {self.ridge!r}")
        ridges = RIDGE_CANDIDATES if self.ridge == "auto" else (self.ridge,)
        return [DataFitSettings(ridge=float(ridge), optimizer=self.optimizer, iterations=self.iterations, lr=self.lr)
                for ridge in ridges]

    def augmentation(self) -> Augmentation:
        """The distillation's augmentation settings (checked)."""
        return Augmentation(copies=self.augment_copies, mixup=self.mixup, jitter=self.jitter, crop=self.crop)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CalibrationRun:
    """The calibration of one ``compress`` call: the calibration set, its options and the distillation epochs.

    Made (and every argument checked) before any fit; :meth:`start` picks the model the statistics come from.
    """

    def __init__(self, data: CalibrationData, samples: int, options: Optional[Mapping[str, Any]],
                 distill_epochs: int, seed: int) -> None:
        if isinstance(distill_epochs, bool) or not isinstance(distill_epochs, int) or distill_epochs < 0:
            raise KCompressError(f"distill_epochs must be an integer >= 0, got {distill_epochs!r}")
        self.options = CalibrationOptions.from_mapping(options)
        self.candidates = self.options.candidate_settings()
        self.settings = self.candidates[0]
        self.data = calibration_set(data, samples, self.options.holdout, seed)
        self.distill_epochs = distill_epochs
        self.calibrator: Optional[Calibrator] = None
        self.seconds = 0.0
        #: with several candidate ridges: each one's held-out agreement with the dense model
        self.scores: list[dict[str, Any]] = []
        #: per (layer, matrix): the previous candidate's data-aware fit (where the next one starts) and this one's
        self.starts: dict[tuple[str, str], nn.Module] = {}
        self.refined: dict[tuple[str, str], nn.Module] = {}

    def start(self, model: nn.Module, layers: Sequence[str]) -> None:
        """Before the first fit: ``model`` is the (copied) dense model about to be compressed, ``layers`` the
        qualified names of the layers to compress."""
        begin = time.perf_counter()
        self.calibrator = Calibrator(model, self.data, layers, self.options.source)
        self.seconds += time.perf_counter() - begin

    def fit(self, model: nn.Module, teacher: nn.Module, layers: Sequence[str],
            fit: Callable[[nn.Module], FitResult], copy: Callable[[nn.Module], nn.Module]) -> FitResult:
        """``fit(model)`` (the converter's fit loop, which calls :meth:`refine` per matrix) once per candidate
        ridge, each but the last on a copy of the dense ``model``, each matrix's refinement starting from its fit
        at the previous ridge; returns the result whose outputs are closest to ``teacher``'s on the held-out
        calibration inputs (relative output error: continuous, so near-equal candidates are not told apart by
        a few argmax flips)."""
        best: Optional[tuple[float, FitResult, float]] = None
        self.scores, self.refined = [], {}
        for index, settings in enumerate(self.candidates):
            candidate = model if index == len(self.candidates) - 1 else copy(model)
            self.settings = settings
            self.starts, self.refined = self.refined, {}
            if index == 0 or self.options.source != "dense":  # the dense model's statistics serve every ridge
                self.start(candidate, layers)
            result = fit(candidate)
            if len(self.candidates) == 1:
                return result
            set_execution(result[0], "materialized", measure=False)  # same outputs, fast; compress sets it after
            agreement = output_agreement(result[0], teacher, self.data.holdout)
            self.scores.append({"ridge": settings.ridge, **agreement})
            key = agreement["relative_error"]
            if best is None or key < best[0]:
                best = (key, result, settings.ridge)
        assert best is not None
        self.settings = replace(self.settings, ridge=best[2])
        return best[1]

    def refine(self, model: nn.Module, layer: str, matrix: str, module: nn.Module, weight: Tensor,
               fitted: Mapping[str, nn.Module], seed: int, progress: Optional[ProgressFn]
               ) -> Optional[tuple[DataFitInfo, int]]:
        """Fit ``module`` (already fitted to ``weight``) to the data of ``layer.matrix``; ``(info, calibration
        samples)``, or None when the model never ran that layer on the calibration data."""
        assert self.calibrator is not None, "start() first"
        begin = time.perf_counter()
        moment = self.calibrator.moment(model, layer, matrix, fitted)
        self.seconds += time.perf_counter() - begin
        if moment is None:
            return None
        info = module.fit_to_data(weight, moment.fit, moment.holdout, self.settings, seed=seed, progress=progress,
                                  start=self.starts.get((layer, matrix)))
        self.refined[(layer, matrix)] = module
        return info, moment.samples

    def finish(self, model: nn.Module, teacher: nn.Module, report: Report, seed: int,
               progress: Optional[ProgressCallback]) -> None:
        """Distil (when asked) and fill ``report.calibration``."""
        record: dict[str, Any] = {
            "samples": self.data.samples, "holdout_samples": self.data.holdout_samples,
            "statistics_seconds": self.seconds, "options": self.options.to_dict(), "ridge": self.settings.ridge,
            "ridge_candidates": self.scores,
            "agreement_after_fit": output_agreement(model, teacher, self.data.holdout),
        }
        if self.distill_epochs > 0:
            result = distill(model, teacher, self.data, self.distill_epochs, self.options, seed, progress)
            record["distill"] = {"epochs_run": len(result.history) - 1, "best_epoch": result.best_epoch,
                                 "matched_layers": matched_layers(model, self.options),
                                 "holdout_loss": result.best_val,
                                 "agreement": output_agreement(model, teacher, self.data.holdout)}
        report.calibration = record


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
    return finetune(model, calls, teacher=teacher, epochs=epochs, lr=options.distill_lr,
                    loss="distill", task=options.task, val_data=_unlabeled(calibration.holdout),
                    patience=options.patience, seed=seed, progress=progress,
                    match_layers=matched_layers(model, options), match_weight=options.match_weight)


def matched_layers(model: nn.Module, options: CalibrationOptions) -> list[str]:
    """The qualified names of ``model``'s compressed layers, whose outputs distillation matches (none with
    ``match_weight=0``)."""
    return list(compressed_layers(model)) if options.match_weight > 0 else []


def _unlabeled(calls: Sequence[Inputs]) -> list[tuple[Inputs, Tensor]]:
    """``(inputs, placeholder)`` batches: finetune's batch shape; the placeholder only counts the rows."""
    return [(call, torch.zeros(batch_rows(call))) for call in calls]


def output_agreement(model: nn.Module, reference: nn.Module, calls: Sequence[Inputs]) -> dict[str, Any]:
    """How close ``model``'s outputs are to ``reference``'s on ``calls``: ``relative_error``
    ``‖y − y_ref‖ / ‖y_ref‖`` over all outputs and, for outputs with a class axis (last size > 1),
    ``argmax_agreement``, the fraction of rows with the same argmax."""
    num = den = 0.0
    same = rows = 0
    with torch.no_grad(), eval_mode(model), eval_mode(reference):
        for call in calls:
            output, expected = first_tensor(run_model(model, call)), first_tensor(run_model(reference, call))
            num += float((output.double() - expected.double()).square().sum())
            den += float(expected.double().square().sum())
            if expected.dim() >= 1 and expected.shape[-1] > 1:
                same += int((output.argmax(-1) == expected.argmax(-1)).sum())
                rows += expected[..., 0].numel()
    result: dict[str, Any] = {"relative_error": math.sqrt(num / den) if den > 0 else math.sqrt(num)}
    if rows:
        result["argmax_agreement"] = same / rows
    return result

