"""The option groups of a :class:`~kcompress.config.compress.CompressConfig`: the budget, the selection of
matrices, the tensorization, recovery (distillation and fine-tuning), execution and storage; each checks its
own fields when it is built (the calibration group is :mod:`kcompress.config.calibration`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from kcompress.config.calibration import learning_rates
from kcompress.config.checks import (
    check_budget,
    check_choice,
    check_globs,
    check_int,
    check_modes,
    check_order,
    check_rank,
    check_ratio,
)
from kcompress.errors import KCompressError
from kcompress.names import (
    ALLOCATIONS,
    DEFAULT_LR,
    GATES,
    LOSSES,
    OBJECTIVES,
    RECOVERY_EPOCHS,
    check_size,
    check_targets,
)
from kcompress.nn.paths import Execution, check_execution
from kcompress.nn.quantize import check_quantize

Rank = Union[int, Sequence[int]]
Modes = tuple[Optional[Sequence[int]], Optional[Sequence[int]]]
#: the recurrent matrices compressed by default: all of them (input-to-hidden and hidden-to-hidden)
DEFAULT_TARGETS = "ih,hh"


@dataclass(frozen=True)
class BudgetOptions:
    """How small: ``rank`` or ``ratio`` for every matrix (``allocate="uniform"``), or a ``ratio`` or ``params``
    for all targeted matrices together, split per matrix by the allocation (``allocate="auto"``) in
    parameters or, with ``objective="latency"``, in MACs; or a ``size`` in bytes for the whole artifact's tensors
    (``200_000``, ``"200KB"``, ``"1.5MiB"``; :func:`~kcompress.names.check_size`), met by the allocation
    with the storage width (:class:`StorageOptions`) it chooses. ``allocate=None`` (the default) is resolved when the
    data is known (:meth:`resolved`): a ratio or a parameter count is a budget for the whole model, split
    automatically when there is calibration data; a rank, and a ratio without data, apply to every matrix
    (without data the split by weight error measured worse than uniform, docs/allocation.md)."""

    rank: Optional[Rank] = None
    ratio: Optional[float] = None
    params: Optional[int] = None
    size: Optional[Union[int, str]] = None
    allocate: Optional[str] = None
    objective: str = "size"

    def __post_init__(self) -> None:
        if self.allocate is not None:
            check_choice("allocate", self.allocate, ALLOCATIONS)
        check_choice("objective", self.objective, OBJECTIVES)
        check_rank(self.rank)
        check_ratio(self.ratio)
        if self.size is not None:
            object.__setattr__(self, "size", check_size(self.size))
            if self.rank is not None or self.ratio is not None or self.params is not None:
                raise KCompressError("give one budget: size, or rank, ratio or params, not several")
            if self.allocate == "uniform" or self.objective != "size":
                raise KCompressError("a size budget is allocated in bytes: it needs allocate='auto' and "
                                     "objective='size'")
        elif self.allocate == "auto" or self.params is not None:
            if self.rank is not None:
                raise KCompressError("allocate='auto' chooses the ranks: give ratio or params, not rank")
            if not self.searched:
                check_budget(self.ratio, self.params)
        elif (self.rank is None) == (self.ratio is None):
            raise KCompressError("give exactly one of rank and ratio")

    def resolved(self, calibrated: bool) -> "BudgetOptions":
        """The default ``allocate`` decided: ``"auto"`` for a parameter count, and for a ratio when there is
        calibration data (``calibrated``); ``"uniform"`` otherwise. A given ``allocate`` is kept."""
        if self.allocate is not None:
            return self
        allocated = self.params is not None or self.size is not None or (self.ratio is not None and calibrated)
        return dataclasses.replace(self, allocate="auto" if allocated else "uniform")

    @property
    def size_bytes(self) -> Optional[int]:
        """``size`` as a number of bytes (converted when the options were built)."""
        return None if self.size is None else check_size(self.size)

    @property
    def searched(self) -> bool:
        """An allocated budget without its size: the budget search (:func:`kcompress.runs.search.run_search`)
        chooses the ratio; a fit needs a ``ratio`` or ``params``."""
        return self.allocate == "auto" and self.ratio is None and self.params is None and self.size is None


@dataclass(frozen=True)
class SelectionOptions:
    """Which matrices: layers by ``include``/``exclude`` globs, the
    recurrent ``targets`` (``"ih"``, ``"hh"``, ``"ih,hh"``) and ``gates`` (one fit per matrix, or per gate)."""

    include: Optional[Union[str, Sequence[str]]] = None
    exclude: Optional[Union[str, Sequence[str]]] = None
    targets: Union[str, Sequence[str]] = DEFAULT_TARGETS
    gates: str = "fused"

    def __post_init__(self) -> None:
        for what, globs in (("include", self.include), ("exclude", self.exclude)):
            if globs is not None:
                check_globs(what, globs)
        check_targets(self.targets)
        if self.gates not in GATES:
            raise KCompressError(f"gates must be 'fused' or 'separate', got {self.gates!r}")


@dataclass(frozen=True)
class TensorizationOptions:
    """How each matrix is reshaped: the tensor ``order`` and the ``modes`` ``(out_modes, in_modes)`` (either
    may be None: chosen per matrix)."""

    order: Optional[int] = None
    modes: Optional[Modes] = None

    def __post_init__(self) -> None:
        check_order(self.order)
        check_modes(self.modes)


@dataclass(frozen=True)
class FinetuneOptions:
    """Labelled fine-tuning after compression: ``epochs`` (0: none), ``loss`` and ``lr`` (``"auto"``: the
    better of :data:`~kcompress.config.calibration.DISTILL_LR_CANDIDATES` on the monitored metric).
    ``epochs="auto"``: none after a plain fit; up to :data:`RECOVERY_EPOCHS` when a model still fails its
    accuracy budget after distillation and the evaluation has labelled data of its own to train on."""

    epochs: Union[int, str] = "auto"
    loss: str = "distill"
    lr: Union[float, str] = DEFAULT_LR

    def __post_init__(self) -> None:
        auto_epochs("finetune epochs", self.epochs)
        learning_rates(self.lr, "finetune lr")
        if self.loss not in LOSSES:
            raise KCompressError(f"unknown fine-tuning loss {self.loss!r}; use one of: {', '.join(LOSSES)}")

    @property
    def fit_epochs(self) -> int:
        """Fine-tuning epochs run after every fit (``"auto"``: none)."""
        return auto_epochs("finetune epochs", self.epochs, 0)

    @property
    def recovery_epochs(self) -> int:
        """Fine-tuning epochs run when a model still fails its accuracy budget (0: none)."""
        return auto_epochs("finetune epochs", self.epochs, RECOVERY_EPOCHS)


@dataclass(frozen=True)
class RecoveryOptions:
    """Training after the fit: ``distill_epochs`` of unlabeled distillation from the dense model on the
    calibration inputs (0: none; ``"auto"``: none after a plain fit, up to :data:`RECOVERY_EPOCHS` with early
    stopping when a ``max_drop`` gate or a budget search step fails and there is calibration data), and
    labelled ``finetune`` on evaluation data."""

    distill_epochs: Union[int, str] = "auto"
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)

    def __post_init__(self) -> None:
        auto_epochs("distill_epochs", self.distill_epochs)

    @property
    def fit_epochs(self) -> int:
        """Distillation epochs run right after every fit (``"auto"``: none)."""
        return auto_epochs("distill_epochs", self.distill_epochs, 0)

    @property
    def recovery_epochs(self) -> int:
        """Distillation epochs run when a model fails its accuracy budget (0: none)."""
        return auto_epochs("distill_epochs", self.distill_epochs, RECOVERY_EPOCHS)


def auto_epochs(name: str, epochs: Union[int, str], auto: int = 0) -> int:
    """``epochs`` checked (an integer >= 0 or ``"auto"``), with ``"auto"`` read as ``auto``."""
    if epochs == "auto":
        return auto
    check_int(name, epochs, minimum=0)
    return int(epochs)


@dataclass(frozen=True)
class ExecutionOptions:
    """How compressed matrices run (:func:`kcompress.set_execution`) and whether factorized ones are timed
    against their dense product (``check_speed``)."""

    path: Execution = "auto"
    check_speed: bool = True

    def __post_init__(self) -> None:
        check_execution(self.path)
        if not isinstance(self.check_speed, bool):
            raise KCompressError(f"check_speed must be true or false, got {self.check_speed!r}")


#: the storages a size budget chooses between when ``quantize`` is not given ("none": float32 as it is)
SIZE_STORAGES = ("none", "int8")


@dataclass(frozen=True)
class StorageOptions:
    """How the artifact stores the model: ``quantize`` ``"int8"`` or ``"int4"`` (the factors and untouched
    tensors as integers with per-slice scales, :mod:`kcompress.nn.quantize`; the returned model computes with
    exactly those values) or None / ``"none"`` (every tensor as it is). With a size budget
    (:attr:`BudgetOptions.size`) ``quantize`` may list the storages to choose between (e.g.
    ``["none", "int8", "int4"]``; not given: :data:`SIZE_STORAGES`): the allocation keeps the one with the lowest
    estimated output error within the budget."""

    quantize: Optional[Union[str, Sequence[str]]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.quantize, (str, type(None))) and not list(self.quantize):
            raise KCompressError("quantize lists no storage; give none, int8 or int4")
        for mode in [self.quantize] if isinstance(self.quantize, (str, type(None))) else self.quantize:
            check_quantize(None if mode == "none" else mode)

    @property
    def mode(self) -> Optional[str]:
        """The one storage of ``quantize`` without a size budget (None: as it is)."""
        assert isinstance(self.quantize, (str, type(None)))  # CompressConfig: a list only with a size budget
        return None if self.quantize == "none" else self.quantize

    def choices(self) -> tuple[Optional[str], ...]:
        """The storages a size budget chooses between (None: as it is), in the order given."""
        listed = SIZE_STORAGES if self.quantize is None else [self.quantize] if isinstance(self.quantize, str) \
            else self.quantize
        return tuple(dict.fromkeys(None if mode == "none" else mode for mode in listed))
