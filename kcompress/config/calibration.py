"""The calibration settings of a compression: how the data-aware fit, the candidate choice and the unlabeled
distillation run (:class:`CalibrationOptions`), and their constants. Settings only: the work is in
:mod:`kcompress.calibration`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional, Union, cast

from kcompress.errors import KCompressError
from kcompress.formats.data_fit import DataFitSettings
from kcompress.names import DEFAULT_LR, DEFAULT_SAMPLES, TASKS

#: where each layer's statistics come from (:class:`CalibrationOptions`)
SOURCES = ("compressed", "dense")
#: held-out fraction of the calibration sequences
DEFAULT_HOLDOUT = 0.25

#: ridges tried by ``ridge="auto"`` (the first is fitted first; see :meth:`CalibrationRun.fit`)
RIDGE_CANDIDATES = (1.0, 0.1, 0.01)
#: with ``gate_weights="auto"``: gate-row weighting first (JapaneseVowels: better in 11 of 12 settings), then
#: without (Silero VAD: better); each at every candidate ridge
GATE_WEIGHT_CANDIDATES = (True, False)
#: distillation learning rates tried by ``distill_lr="auto"``, each from the calibrated start (JapaneseVowels
#: LSTM at about 8x: 1e-2 recovered low-rank svd by 4.6 points more, 1e-3 kcp and tt by 1.1-1.4 points more;
#: docs/calibration.md)
DISTILL_LR_CANDIDATES = (1e-3, 1e-2)


def learning_rates(lr: Union[float, str], name: str = "learning rate") -> tuple[float, ...]:
    """The learning rates to try for ``lr``: the number itself, or for ``"auto"``
    :data:`DISTILL_LR_CANDIDATES` (distillation and fine-tuning alike); a one-line error names ``name``."""
    if lr == "auto":
        return DISTILL_LR_CANDIDATES
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
        raise KCompressError(f"{name} must be a positive number or 'auto', got {lr!r}")
    return (float(lr),)


@dataclass(frozen=True)
class Augmentation:
    """``copies`` augmented copies of each calibration call per epoch (0: none), ``mixup`` on/off, ``jitter``
    (noise std in units of each feature's std, 0: none), ``crop`` (smallest kept fraction of a sequence's
    steps, 1: no cropping)."""

    copies: int = 2
    mixup: bool = True
    jitter: float = 0.1
    crop: float = 0.6

    def __post_init__(self) -> None:
        if isinstance(self.copies, bool) or not isinstance(self.copies, int) or self.copies < 0:
            raise KCompressError(f"augment_copies must be an integer >= 0, got {self.copies!r}")
        if not isinstance(self.mixup, bool):
            raise KCompressError(f"mixup must be True or False, got {self.mixup!r}")
        if isinstance(self.jitter, bool) or not (isinstance(self.jitter, (int, float)) and 0 <= self.jitter < math.inf):
            raise KCompressError(f"jitter must be a number >= 0, got {self.jitter!r}")
        if isinstance(self.crop, bool) or not (isinstance(self.crop, (int, float)) and 0 < self.crop <= 1):
            raise KCompressError(f"crop must be a fraction in (0, 1], got {self.crop!r}")


@dataclass(frozen=True)
class CalibrationOptions:
    """``samples``: calibration sequences used at most (part held out); ``source``: ``"dense"`` (every statistic from the dense model, one pass; measured better or equal in
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

    samples: int = DEFAULT_SAMPLES
    source: str = "dense"
    holdout: float = DEFAULT_HOLDOUT
    ridge: Union[float, str] = "auto"
    optimizer: str = DataFitSettings.optimizer
    iterations: int = DataFitSettings.iterations
    lr: float = DataFitSettings.lr
    gate_weights: Union[bool, str] = "auto"
    distill_lr: Union[float, str] = DEFAULT_LR
    task: str = "classification"
    patience: int = 50
    augment_copies: int = Augmentation.copies
    mixup: bool = Augmentation.mixup
    jitter: float = Augmentation.jitter
    crop: float = Augmentation.crop
    match_weight: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise KCompressError(f"calibrate_samples must be an integer >= 1, got {self.samples!r}")
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
        # cast: gate_weights is a bool here (checked above)
        weightings = GATE_WEIGHT_CANDIDATES if self.gate_weights == "auto" else (cast(bool, self.gate_weights),)
        return [DataFitSettings(ridge=float(ridge), optimizer=self.optimizer, iterations=self.iterations, lr=self.lr,
                                weighted_rows=weighted)
                for weighted in weightings for ridge in ridges]

    def distill_rates(self) -> tuple[float, ...]:
        """The distillation learning rates to try (checked)."""
        return learning_rates(self.distill_lr, "distill_lr")

    def augmentation(self) -> Augmentation:
        """The distillation's augmentation settings (checked)."""
        return Augmentation(copies=self.augment_copies, mixup=self.mixup, jitter=self.jitter, crop=self.crop)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
