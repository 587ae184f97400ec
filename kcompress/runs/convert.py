"""``compress``: replace a model's LSTM/GRU/cell/Linear layers by compressed drop-ins and report what was done.

The settings are one :class:`~kcompress.config.CompressConfig`, checked when it is built (the keywords of
:func:`compress` are its shorthand; :func:`compress_model` takes the config). An allocated budget is first
resolved to per-matrix choices (:mod:`kcompress.allocation`). The work then runs in two passes. The *plan* pass reads only the layers' shapes: it selects layers (``include``/
``exclude``), resolves every matrix's settings (``overrides``), picks its modes and rank and has the format
check them with its options (:meth:`Factorization.check`, closed forms, no module built), so every mistake
in the request is reported before any fit starts (:mod:`kcompress.fitting.planning`). The *fit* pass then builds
each compressed layer with ``from_dense`` and a matrix builder that fits the planned format, and puts the
layer where the dense one was (:mod:`kcompress.fitting.layers`).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import platform
import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import tensorly
import torch
from torch import Tensor, nn

from kcompress.allocation.auto import Prepared, attach_allocation, prepare
from kcompress.allocation.choose import Allocation
from kcompress.allocation.size import allocate_size
from kcompress.calibration.run import CalibrationRun
from kcompress.config import CompressConfig
from kcompress.config.groups import DEFAULT_TARGETS, Modes, Rank
from kcompress.errors import KCompressError, KCompressWarning
from kcompress.fitting.layers import fit_layers
from kcompress.fitting.planning import plan_compression
from kcompress.names import DEFAULT_SAMPLES
from kcompress.nn.paths import Execution, compressed_layers, set_execution
from kcompress.nn.quantize import quantization_rules, quantize_model, tensor_bytes
from kcompress.nn.speed import CHECK_BATCH, measured_speedup
from kcompress.progress import ProgressCallback, ProgressEvent, ProgressLike, progress_callback
from kcompress.report.checks import result_warnings
from kcompress.report.record import Report
from kcompress.tuning.agreement import best_index
from kcompress.tuning.data import SequenceData
from kcompress.tuning.evaluate import check_fits


def compress(
    model: nn.Module,
    format: Union[str, Sequence[str], CompressConfig] = "kcp",
    rank: Optional[Rank] = None,
    ratio: Optional[float] = None,
    *,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    targets: Union[str, Sequence[str]] = DEFAULT_TARGETS,
    gates: str = "fused",
    order: Optional[int] = None,
    modes: Optional[Modes] = None,
    overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
    seed: int = 0,
    inplace: bool = False,
    progress: ProgressLike = None,
    fit_options: Optional[Mapping[str, Any]] = None,
    check_speed: bool = True,
    allocate: Optional[str] = None,
    params: Optional[int] = None,
    size: Optional[Union[int, str]] = None,
    objective: str = "size",
    calibration: Optional[Any] = None,
    calibrate_samples: int = DEFAULT_SAMPLES,
    calibrate_options: Optional[Mapping[str, Any]] = None,
    distill_epochs: Union[int, str] = "auto",
    execution: Execution = "auto",
    quantize: Optional[Union[str, Sequence[str]]] = None,
    config: Optional[CompressConfig] = None,
) -> tuple[nn.Module, Report]:
    """Compress the model's recurrent (and, when included, linear) layers; returns ``(model, report)``.

    ``ratio`` (or ``params``) is a budget for all targeted matrices together: with ``calibration`` data it is
    split per matrix automatically, each matrix's format (from ``format``, which may be a list) and rank
    chosen under it, measured in parameters or, with ``objective="latency"``, in MACs (see
    :mod:`kcompress.allocation`). ``allocate="uniform"``, a ``rank``, or no calibration data apply
    ``rank``/``ratio`` to every matrix; ``allocate="auto"`` allocates even without data (by weight error).

    ``progress``: a callback of :class:`kcompress.progress.ProgressEvent`, or True for a progress display on
    stderr. Every entry of ``report.warnings`` is also emitted as a :class:`KCompressWarning`. A model with
    nothing to compress is returned (copied) with an empty ``report.matrices`` and the warning
    :data:`NOTHING_MATCHED`; raising is left to the caller.
    ``execution`` (``"auto"``, ``"factorized"``, ``"materialized"`` or ``{glob: path}``) sets how each
    compressed matrix runs (:func:`kcompress.set_execution`; ``auto`` measures only with ``check_speed``).
    With ``check_speed`` each factorized matrix is timed against its dense product at batch
    :data:`kcompress.nn.speed.CHECK_BATCH` (interleaved, median and spread) and a warning names those that are
    slower, with the reason they run factorized.

    ``calibration`` (unlabeled model inputs: a tensor, a tuple of positional inputs, a DataLoader or iterable
    of batches, a SequenceData; see :func:`kcompress.calibration.moments.calibration_set`) makes every targeted
    matrix fit what it computes on those inputs (at most ``calibrate_samples`` sequences, part held out; see
    ``docs/calibration.md``), layer after layer; ``calibrate_options`` are the fields of
    :class:`kcompress.config.CalibrationOptions`. ``distill_epochs`` then trains the compressed model to
    match the dense one's outputs on the same inputs (early stopping on the held-out part); ``"auto"`` (the
    default) distils only where a model fails an accuracy budget (:func:`kcompress.compress_file`'s pipeline
    with ``max_drop``, the budget search), never after a plain ``compress``.

    ``size`` (bytes: ``200_000``, ``"200KB"``, ``"1.5MiB"``) is a budget for the whole artifact's tensor bytes
    (``report.model_bytes_after``): the allocation chooses every targeted matrix's format and rank, and the
    storage from ``quantize`` (a list such as ``["none", "int8", "int4"]``; default float32 or int8), with the
    lowest estimated output error within it (:mod:`kcompress.allocation.size`).

    ``quantize`` (``"int8"`` or ``"int4"``) stores the factors and untouched tensors as integers with per-slice
    scales (:mod:`kcompress.nn.quantize`); the returned model computes with exactly the stored values, and
    ``report.model_bytes_before/after`` give the dense and the artifact's tensor bytes either way.

    The setting keywords are a shorthand for one :class:`kcompress.CompressConfig`
    (:meth:`~kcompress.CompressConfig.from_keywords`), checked before any work and stored in
    ``report.options`` and the artifact. ``config`` gives them all at once, also in ``format``'s place
    (``compress(model, config)``); the setting keywords are then left at their defaults.
    """
    settings = {name: value for name, value in locals().items() if name in _SETTINGS}
    if isinstance(format, CompressConfig):
        if config is not None:
            raise KCompressError("give one CompressConfig, not two")
        config, settings["format"] = format, _DEFAULTS["format"]
    if config is None:
        config = CompressConfig.from_keywords(**_given(settings))
    elif not isinstance(config, CompressConfig):
        raise KCompressError(f"config must be a CompressConfig, got {type(config).__name__}")
    elif _given(settings):
        raise KCompressError(f"give settings either in config or as keywords, not both: {', '.join(_given(settings))}")
    with progress_callback(progress) as callback:
        return compress_model(model, config, calibration=calibration, inplace=inplace, progress=callback)


def compress_model(model: nn.Module, config: CompressConfig, *, calibration: Optional[Any] = None,
                   inplace: bool = False, progress: Optional[ProgressCallback] = None,
                   prepared: Optional[Prepared] = None) -> tuple[nn.Module, Report]:
    """:func:`compress` with its settings as one config: allocate (when the budget is allocated; ``prepared``
    reuses estimated error curves), plan, calibrate and fit, set the execution paths, check the result."""
    if not isinstance(model, nn.Module):
        raise KCompressError(f"compress needs a torch nn.Module, got {type(model).__name__}")
    if prepared is None and _compares_splits(config, calibration):
        return _better_split(model, config, calibration, progress)
    config = config.for_data(calibration is not None)
    if config.budget.searched:
        raise KCompressError("give exactly one of ratio and params for an allocated budget (or search one with max_drop)")
    if config.recovery.fit_epochs and calibration is None:
        raise KCompressError("distill_epochs needs calibration data (the inputs to distil on)")
    report = Report(format=config.formats[0], options=config.to_dict(), versions=_versions(),
                    model_params_before=count_parameters(model), model_bytes_before=tensor_bytes(model))
    _check_calibration(model, calibration)
    run = None if calibration is None else CalibrationRun(calibration, config)
    allocation, quantize = None, None if config.budget.size is not None else config.storage.mode
    if config.allocated:
        _emit_step(progress, "allocate", "estimating error curves ...")
        prepared = prepared or prepare(model, config, calibration)
        allocation, quantize = _allocate(model, config, prepared)
    plans = plan_compression(model, config, report, allocation.choices() if allocation else None)
    teacher = model
    if not inplace:
        model = _copy(model)
    elif run is not None:
        teacher = _copy(model)
    if run is None:
        model, report.matrices = fit_layers(model, plans, config.seed, progress)
    else:
        model, report.matrices = run.fit(model, teacher, plans, config.seed, progress, _copy)
    set_execution(model, config.execution.path, measure=config.execution.check_speed, progress=progress)
    if run is not None:
        run.finish(model, teacher, report, config.seed, progress)
    if allocation is not None and prepared is not None:
        attach_allocation(report, model, prepared, allocation)
    report.model_params_after = count_parameters(model)
    _store(model, report, quantize, config.budget.size_bytes)
    _check_speed(model, report, config.execution.path, config.execution.check_speed)
    report.warnings.extend(result_warnings(report))
    for message in report.warnings:
        warnings.warn(message, KCompressWarning, stacklevel=3)
    return model, report


#: the setting keywords of :func:`compress` (the shorthand of a :class:`CompressConfig`) and their defaults
_DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(compress).parameters.items()
             if name not in ("model", "inplace", "progress", "calibration", "config")}
_SETTINGS = tuple(_DEFAULTS)


def _given(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that differ from their defaults."""
    return {name: value for name, value in settings.items() if value != _DEFAULTS[name]}


def _compares_splits(config: CompressConfig, calibration: Any) -> bool:
    """Whether the split of the budget is left to the default with calibration data and could go either way:
    one format, a ratio, and no override fixing a matrix (:meth:`CompressConfig.for_data`)."""
    budget = config.budget
    return (calibration is not None and budget.allocate is None and budget.ratio is not None
            and isinstance(config.format, str) and config.for_data(True).budget.allocate == "auto")


#: the splits the default compares, in order (the first wins a tie)
SPLITS = ("uniform", "auto")


def _better_split(model: nn.Module, config: CompressConfig, calibration: Any,
                  progress: Optional[ProgressCallback]) -> tuple[nn.Module, Report]:
    """The default split of a ratio with calibration data: the model fitted with one ratio per matrix and with
    the allocation, keeping the one closer to the dense model on the held-out calibration inputs (after
    distillation when it ran; :func:`kcompress.tuning.agreement.better`). The allocation weighs each matrix's
    output error, not how it travels through the recurrence: on JapaneseVowels it was better (kcp at 4x:
    0.959 against 0.941 test accuracy), on Silero VAD worse (tt at 4x: 0.964 against 0.984 agreement).
    ``report.calibration["splits"]`` holds both scores. Both fits work on copies of ``model`` (as every
    calibrated fit with several candidates already does, ``inplace`` or not)."""
    tried = []
    with warnings.catch_warnings(record=True):  # the kept fit's warnings are issued once, below
        warnings.simplefilter("always")
        for split in SPLITS:
            _emit_step(progress, "split", f"fitting with allocate={split!r} (the default compares both) ...")
            tried.append(compress_model(model, _split(config, split), calibration=calibration, progress=progress))
    records = [report.calibration.get("distill", {}).get("agreement") or report.calibration["agreement_after_fit"]
               for _, report in tried]
    kept = best_index(records)
    compressed, report = tried[kept]
    for message in report.warnings:
        warnings.warn(message, KCompressWarning, stacklevel=4)
    report.calibration["splits"] = [{"allocate": split, **record} for split, record in zip(SPLITS, records)]
    return compressed, report


def _split(config: CompressConfig, split: str) -> CompressConfig:
    return config.replace(budget=dataclasses.replace(config.budget, allocate=split))


def _check_calibration(model: nn.Module, calibration: Any) -> None:
    """A one-line error saying what the model takes when calibration data given as a SequenceData, an inputs
    tensor or ``(inputs, lengths)`` does not fit it (:func:`kcompress.tuning.evaluate.check_fits`); other
    forms (loaders, the user's own calls) are checked when the model first runs on them."""
    inputs, lengths = calibration, None
    if isinstance(calibration, SequenceData):
        inputs, lengths = calibration.inputs, calibration.lengths
    elif isinstance(calibration, tuple) and len(calibration) == 2 and all(isinstance(t, Tensor) for t in calibration):
        inputs, lengths = calibration
    if not isinstance(inputs, Tensor) or inputs.dim() not in (2, 3) or (lengths is not None and lengths.dim() != 1):
        return
    try:
        data = SequenceData(inputs, torch.zeros(len(inputs), dtype=torch.long), lengths)
    except KCompressError:  # not (batch, time, ...) sequences: left to the model's first run
        return
    check_fits(model, data, "the calibration data")


def _allocate(model: nn.Module, config: CompressConfig, prepared: Prepared) -> tuple[Allocation, Optional[str]]:
    """The allocation of the budget and the artifact's storage (a size budget chooses it, from
    :meth:`~kcompress.config.StorageOptions.choices`)."""
    size = config.budget.size_bytes
    if size is None:
        return prepared.allocate(config.budget.ratio, config.budget.params), config.storage.mode
    return allocate_size(model, prepared, size, config.storage.choices())


def _store(model: nn.Module, report: Report, quantize: Optional[str], size: Optional[int]) -> None:
    """Quantize the model as its artifact will store it (``quantize`` None: as it is) and record the bytes
    (and the ``size`` budget, which they must meet)."""
    rules = quantization_rules(model, quantize)
    quantize_model(model, rules)
    report.quantize, report.model_bytes_after, report.size_budget = quantize, tensor_bytes(model, rules), size
    if size is not None and report.model_bytes_after > size:
        raise KCompressError(f"the artifact's {report.model_bytes_after:,} tensor bytes exceed the size budget of "
                             f"{size:,} bytes (allocated {report.allocation.get('used', 0):,})")


def _emit_step(progress: Optional[ProgressCallback], name: str, message: str) -> None:
    if progress is not None:
        progress(ProgressEvent("step", name, message=message))


def _check_speed(model: nn.Module, report: Report, execution: Execution, measure: bool) -> None:
    """Record each matrix's execution path; with ``measure``, fill ``measured_speedup`` of factorized
    matrices and warn where the dense product is faster, saying why the matrix runs factorized."""
    layers = compressed_layers(model)
    for row in report.matrices:
        layer = layers.get(row.layer)
        if layer is None or row.matrix not in layer.execution:
            continue
        row.execution = layer.execution[row.matrix]
        if not measure or not row.compressed or row.execution != "factorized":
            continue
        speed = measured_speedup(layer.matrices[row.matrix])
        row.measured_speedup, row.speed_spread = float(f"{speed.ratio:.3g}"), float(f"{speed.spread:.2g}")
        if speed.ratio < 1.0:
            why = ("the whole layer measured faster this way (a factorized W_hh runs the per-step loop)"
                   if execution == "auto" else f"execution={execution!r} asked for it")
            report.warnings.append(f"{row.name}: runs factorized because {why}; measured {1 / speed.ratio:.1f}x slower "
                          f"(±{speed.spread:.0%}) than the dense product at batch {CHECK_BATCH} "
                          f"({row.macs_after:,} vs {row.macs_before:,} MACs per vector)")


# ---------------------------------------------------------------------- model surgery and bookkeeping
def count_parameters(model: nn.Module) -> int:
    """Number of values in the model's parameters (shared parameters once; buffers not counted), plus the
    tensors a :class:`kcompress.io.StandaloneModel` (a state dict made a module) holds as buffers
    (``buffer_names``, e.g. an Embedding's table): a state dict cannot tell parameters from buffers, and a
    state dict and its module must report the same ratio."""
    buffers = dict(model.named_buffers())
    extra = sum(buffers[name].numel() for name in getattr(model, "buffer_names", ()) if name in buffers)
    return sum(p.numel() for p in model.parameters()) + extra



def _copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as error:  # noqa: BLE001 - any failure to copy means the same to the user
        raise KCompressError(f"could not copy the model ({error}); pass inplace=True to compress it in place") from None


def _versions() -> dict[str, str]:
    from kcompress._version import __version__

    return {"kcompress": __version__, "torch": torch.__version__, "tensorly": tensorly.__version__,
            "python": platform.python_version()}


