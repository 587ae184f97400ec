"""The calibration stages of ``compress``: data-aware fitting of each matrix, unlabeled distillation from
the dense model, and the whole model's agreement with it, all on the calibration inputs only (no labels).

:class:`CalibrationOptions` holds their settings; :class:`CalibrationRun` is what ``compress`` calls:
``refine`` per fitted matrix (statistics from :class:`~kcompress.calibration.moments.Calibrator`, fit through the
format's ``fit_to_data``) and ``finish`` once the model is compressed (distillation, agreement, the
report's ``calibration`` record).
"""

from __future__ import annotations

import math
from copy import deepcopy
from dataclasses import asdict, dataclass, fields, replace
import time
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from kcompress.calibration.augment import Augmentation, AugmentedCalls
from kcompress.calibration.moments import (
    DEFAULT_HOLDOUT,
    SOURCES,
    CalibrationData,
    CalibrationSet,
    Calibrator,
    Inputs,
    batch_rows,
    calibration_set,
)
from kcompress.errors import KCompressError
from kcompress.tuning.evaluate import TASKS, eval_mode, run_model
from kcompress.tuning.finetune import FinetuneResult, finetune
from kcompress.formats import DataFitInfo, DataFitSettings, ProgressFn
from kcompress.formats.data_fit import budgeted
from kcompress.tuning.layer_match import first_tensor
from kcompress.nn.plan import compressed_layers, set_execution
from kcompress.progress import ProgressCallback
from kcompress.report.record import Report


#: ridges tried by ``ridge="auto"`` (the first is fitted first; see :meth:`CalibrationRun.fit`)
RIDGE_CANDIDATES = (1.0, 0.1, 0.01)
#: optimizer steps at most of each screened candidate, and at most half of a matrix's steps
#: (:meth:`CalibrationRun.fit`)
SCREEN_ITERATIONS = 10
#: with ``gate_weights="auto"``: gate-row weighting first (JapaneseVowels: better in 11 of 12 settings), then
#: without (Silero VAD: better); each at every candidate ridge
GATE_WEIGHT_CANDIDATES = (True, False)
#: distillation learning rates tried by ``distill_lr="auto"``, each from the calibrated start (JapaneseVowels
#: LSTM at about 8x: 1e-2 recovered low-rank svd by 4.6 points more, 1e-3 kcp and tt by 1.1-1.4 points more;
#: docs/calibration.md)
DISTILL_LR_CANDIDATES = (1e-3, 1e-2)
#: what the converter's fit loop returns: the model and its report rows
FitResult = tuple[nn.Module, list]


@dataclass(frozen=True)
class CalibrationOptions:
    """``source``: ``"dense"`` (every statistic from the dense model, one pass; measured better or equal in
    docs/benchmarks.md) or ``"compressed"`` (each layer's statistics from the model with the layers before it
    already compressed); ``holdout``: held-out fraction;
    ``ridge``, ``optimizer``, ``iterations``, ``lr``: the data-aware fit (:class:`DataFitSettings`);
    ``ridge="auto"`` fits the model once per ridge of :data:`RIDGE_CANDIDATES` and keeps the one whose
    outputs agree best with the dense model's on the held-out calibration inputs; ``gate_weights``: weight
    each output row of a recurrent matrix by how much it moves the layer's state
    (:mod:`kcompress.calibration.gate_sensitivity`; False: every row alike; ``"auto"``: fit both ways, at every candidate
    ridge, and keep the closest to the dense model as for ``ridge="auto"``);
    ``distill_lr``, ``task`` (``classification``: KL on logits, ``regression``: MSE on outputs),
    ``patience`` (epochs without improvement of the held-out loss): the unlabeled distillation;
    ``distill_lr="auto"`` distils once per rate of :data:`DISTILL_LR_CANDIDATES` and keeps the model whose
    outputs agree best with the dense model's on the held-out calibration inputs;
    ``augment_copies``, ``mixup``, ``jitter``, ``crop``: its teacher-labelled augmentation of the calibration
    inputs (:class:`kcompress.calibration.augment.Augmentation`; ``augment_copies=0``: none); ``match_weight``: weight of
    matching each compressed layer's outputs to the dense layer's (:mod:`kcompress.tuning.layer_match`; 0: off)."""

    source: str = "dense"
    holdout: float = DEFAULT_HOLDOUT
    ridge: Union[float, str] = "auto"
    optimizer: str = DataFitSettings.optimizer
    iterations: int = DataFitSettings.iterations
    lr: float = DataFitSettings.lr
    gate_weights: Union[bool, str] = "auto"
    distill_lr: Union[float, str] = "auto"
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
        self.distill_rates()  # checks distill_lr
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
        """The data-aware fit's settings (with ``"auto"``: the first candidate)."""
        return self.candidate_settings()[0]

    def candidate_settings(self) -> list[DataFitSettings]:
        """One :class:`DataFitSettings` per gate weighting and ridge to try (checked), ridges innermost."""
        if isinstance(self.ridge, str) and self.ridge != "auto":
            raise KCompressError(f"ridge must be a number >= 0 or 'auto', got {self.ridge!r}")
        if self.gate_weights != "auto" and not isinstance(self.gate_weights, bool):
            raise KCompressError(f"gate_weights must be True, False or 'auto', got {self.gate_weights!r}")
        ridges = RIDGE_CANDIDATES if self.ridge == "auto" else (self.ridge,)
        weightings = GATE_WEIGHT_CANDIDATES if self.gate_weights == "auto" else (self.gate_weights,)
        return [DataFitSettings(ridge=float(ridge), optimizer=self.optimizer, iterations=self.iterations, lr=self.lr,
                                weighted_rows=weighted)
                for weighted in weightings for ridge in ridges]

    def distill_rates(self) -> tuple[float, ...]:
        """The distillation learning rates to try (checked)."""
        if self.distill_lr == "auto":
            return DISTILL_LR_CANDIDATES
        rate = self.distill_lr
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not (rate > 0 and math.isfinite(rate)):
            raise KCompressError(f"distill_lr must be a positive number or 'auto', got {rate!r}")
        return (float(rate),)

    def augmentation(self) -> Augmentation:
        """The distillation's augmentation settings (checked)."""
        return Augmentation(copies=self.augment_copies, mixup=self.mixup, jitter=self.jitter, crop=self.crop)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Candidate:
    """One candidate's (ridge, gate weighting) fitted model: its held-out relative output error, the fit loop's result, the
    settings, its matrices' data-aware fits per (layer, matrix), and whether a screened refinement was cut short."""

    error: float
    result: FitResult
    settings: DataFitSettings
    refined: dict[tuple[str, str], nn.Module]
    cut: bool


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
        #: with several candidates: each one's held-out agreement with the dense model
        self.scores: list[dict[str, Any]] = []
        #: per (layer, matrix): the previous candidate's data-aware fit (where the next one starts) and this one's
        self.starts: dict[tuple[str, str], nn.Module] = {}
        self.refined: dict[tuple[str, str], nn.Module] = {}
        #: per matrix name: its plain fit, the same for every candidate (:meth:`plain_fit`)
        self.plain: dict[str, nn.Module] = {}
        #: the current candidate's refinements: ``"full"``, ``"screen"`` or ``"finish"`` (:meth:`refine`), and
        #: whether a screened one stopped at its cap
        self.stage, self.cut = "full", False

    def start(self, model: nn.Module, layers: Sequence[str]) -> None:
        """Before the first fit: ``model`` is the (copied) dense model about to be compressed, ``layers`` the
        qualified names of the layers to compress."""
        begin = time.perf_counter()
        self.calibrator = Calibrator(model, self.data, layers, self.options.source)
        self.seconds += time.perf_counter() - begin

    def fit(self, model: nn.Module, teacher: nn.Module, layers: Sequence[str],
            fit: Callable[[nn.Module], FitResult], copy: Callable[[nn.Module], nn.Module]) -> FitResult:
        """``fit(model)`` (the converter's fit loop, which calls :meth:`plain_fit` and :meth:`refine` per matrix)
        once per candidate of :meth:`CalibrationOptions.candidate_settings` (ridge, gate weighting) on a copy of the
        dense ``model``, each matrix's refinement starting from its fit in the previous candidate: the first
        refined with all its steps, the others screened (a few steps, :meth:`refine`). When a screened candidate cut short has the outputs closest to ``teacher``'s on the
        held-out calibration inputs, it is refined on for the rest of its steps (on ``model``). Returns the result
        closest to ``teacher``'s of all (relative output error: continuous, so near-equal candidates are not told
        apart by a few argmax flips)."""
        self.scores, self.plain, self.refined = [], {}, {}
        if len(self.candidates) == 1:
            return self._candidate(model, layers, fit, self.candidates[0], {}, "full")
        tried = []
        for index, settings in enumerate(self.candidates):
            result = self._candidate(copy(model), layers, fit, settings, self.refined, "screen" if index else "full")
            tried.append(self._scored(result, teacher, settings))
        best = min(tried, key=lambda candidate: candidate.error)
        if best.cut:
            result = self._candidate(model, layers, fit, best.settings, best.refined, "finish")
            best = min(best, self._scored(result, teacher, best.settings), key=lambda candidate: candidate.error)
        self.settings = best.settings
        return best.result

    def _candidate(self, model: nn.Module, layers: Sequence[str], fit: Callable[[nn.Module], FitResult],
                   settings: DataFitSettings, starts: dict[tuple[str, str], nn.Module], stage: str) -> FitResult:
        """``fit(model)`` with every refinement at ``settings`` starting from ``starts``, as long as ``stage``
        says (:meth:`refine`); the statistics are taken first unless the dense model's serve again."""
        self.settings, self.stage = settings, stage
        self.starts, self.refined, self.cut = starts, {}, False
        if self.calibrator is None or self.options.source != "dense":
            self.start(model, layers)
        return fit(model)

    def _scored(self, result: FitResult, teacher: nn.Module, settings: DataFitSettings) -> "_Candidate":
        """The candidate just fitted, with its held-out agreement with ``teacher`` (also added to ``scores``)."""
        set_execution(result[0], "materialized", measure=False)  # same outputs, fast; compress sets it after
        agreement = output_agreement(result[0], teacher, self.data.holdout)
        self.scores.append({"ridge": settings.ridge, "gate_weights": settings.weighted_rows,
                            "screened": self.stage == "screen",
                            **agreement})
        return _Candidate(agreement["relative_error"], result, settings, self.refined, self.cut)

    def plain_fit(self, name: str, fit: Callable[[], nn.Module]) -> nn.Module:
        """Matrix ``name``'s fit without data, which every candidate refines in place: ``fit()`` for the first
        candidate, a copy of that module for the next ones (it depends on no data-fit setting)."""
        if name not in self.plain:
            self.plain[name] = fit()
        return deepcopy(self.plain[name])

    def refine(self, model: nn.Module, layer: str, matrix: str, module: nn.Module, weight: Tensor,
               fitted: Mapping[str, nn.Module], seed: int, progress: Optional[ProgressFn]
               ) -> Optional[tuple[DataFitInfo, int]]:
        """Fit ``module`` (already fitted to ``weight``) to the data of ``layer.matrix``; ``(info, calibration
        samples)``, or None when the model never ran that layer on the calibration data. The matrix's steps
        (``settings.iterations`` within the work budget, :func:`~kcompress.formats.data_fit.budgeted`) all at the
        ``"full"`` stage; at most :data:`SCREEN_ITERATIONS` and half of them at ``"screen"``; the rest at
        ``"finish"``, which continues a screened candidate."""
        assert self.calibrator is not None, "start() first"
        begin = time.perf_counter()
        moment = self.calibrator.moment(model, layer, matrix, fitted)
        self.seconds += time.perf_counter() - begin
        if moment is None:
            return None
        steps = budgeted(self.settings, tuple(weight.shape)).iterations
        screened = min(steps // 2, SCREEN_ITERATIONS)
        limit = {"full": steps, "screen": screened, "finish": steps - screened}[self.stage]
        info = module.fit_to_data(weight, moment.fit, moment.holdout, replace(self.settings, iterations=limit),
                                  seed=seed, progress=progress, start=self.starts.get((layer, matrix)),
                                  row_weights=moment.row_weights)
        self.refined[(layer, matrix)] = module
        self.cut = self.cut or (self.stage == "screen" and screened < steps and info.iterations >= limit)
        return info, moment.samples

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
        calibrated start, and keep the result whose held-out outputs are closest to ``teacher``'s (relative
        output error, as ``ridge="auto"`` decides); the report's ``distill`` record."""
        start = {name: value.detach().clone() for name, value in model.state_dict().items()}
        best: Optional[tuple[dict[str, Any], dict[str, Tensor]]] = None
        tried = []
        for rate in self.options.distill_rates():
            model.load_state_dict(start)
            result = distill(model, teacher, self.data, self.distill_epochs, replace(self.options, distill_lr=rate),
                             seed, progress)
            record = {"lr": rate, "epochs_run": len(result.history) - 1, "best_epoch": result.best_epoch,
                      "matched_layers": matched_layers(model, self.options), "holdout_loss": result.best_val,
                      "agreement": output_agreement(model, teacher, self.data.holdout)}
            tried.append({key: record[key] for key in ("lr", "epochs_run", "holdout_loss", "agreement")})
            if best is None or record["agreement"]["relative_error"] < best[0]["agreement"]["relative_error"]:
                best = (record, {name: value.detach().clone() for name, value in model.state_dict().items()})
        assert best is not None
        model.load_state_dict(best[1])
        return {**best[0], "lr_candidates": tried if len(tried) > 1 else []}


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

