"""``compress``: replace a model's LSTM/GRU/cell/Linear layers by compressed drop-ins and report what was done.

The settings are one :class:`~kcompress.config.compress.CompressConfig`, checked when it is built. The work then
runs in two passes. The *plan* pass reads only the layers' shapes: it selects layers (``include``/
``exclude``), resolves every matrix's settings (``overrides``), picks its modes and rank and has the format
check them with its options (:meth:`Factorization.check`, closed forms, no module built), so every mistake
in the request is reported before any fit starts (:mod:`kcompress.fitting.planning`). The *fit* pass then builds
each compressed layer with ``from_dense`` and a matrix builder that fits the planned format, and puts the
layer where the dense one was (:mod:`kcompress.fitting.layers`).
"""

from __future__ import annotations

import copy
import platform
import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import tensorly
import torch
from torch import nn

from kcompress._threads import fit_thread_count
from kcompress.calibration.moments import DEFAULT_SAMPLES
from kcompress.calibration.run import CalibrationRun
from kcompress.config.compress import DEFAULT_TARGETS, CompressConfig, Modes, Rank, config_defaults, config_fields
from kcompress.errors import KCompressError, KCompressWarning
from kcompress.fitting.layers import fit_layers
from kcompress.nn.plan import Plan, compressed_layers, set_execution
from kcompress.fitting.planning import MatrixPlan, plan_compression
from kcompress.progress import ProgressLike, progress_callback
from kcompress.report.record import Report
from kcompress.report.checks import result_warnings
from kcompress.nn.speed import CHECK_BATCH, measured_speedup


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
    allocate: str = "uniform",
    params: Optional[int] = None,
    objective: str = "size",
    calibration: Optional[Any] = None,
    calibrate_samples: int = DEFAULT_SAMPLES,
    calibrate_options: Optional[Mapping[str, Any]] = None,
    distill_epochs: int = 0,
    execution: Plan = "auto",
    config: Optional[CompressConfig] = None,
) -> tuple[nn.Module, Report]:
    """Compress the model's recurrent (and, when included, linear) layers; returns ``(model, report)``.

    ``allocate="auto"`` (``format`` may then be a list) chooses each matrix's format and rank under one
    global budget, ``ratio`` or ``params``, measured in parameters or, with ``objective="latency"``, in
    MACs (see :mod:`kcompress.allocation.auto`); ``"uniform"`` applies ``rank``/``ratio`` to every matrix.

    ``progress``: a callback of :class:`kcompress.progress.ProgressEvent`, or True for the CLI's progress
    display on stderr. See ``docs/design.md`` (convert). Every entry of ``report.warnings`` is also emitted as a
    :class:`KCompressWarning`. A model with nothing to compress is returned (copied) with an empty
    ``report.matrices`` and the warning :data:`NOTHING_MATCHED`; raising is left to the caller.
    ``execution`` (``"auto"``, ``"factorized"``, ``"materialized"`` or ``{glob: path}``) sets how each
    compressed matrix runs (:func:`kcompress.set_execution`; ``auto`` measures only with ``check_speed``).
    With ``check_speed`` each factorized matrix is timed against its dense product at batch
    :data:`kcompress.nn.speed.CHECK_BATCH` (interleaved, median and spread) and a warning names those that are
    slower, with the reason they run factorized.

    ``calibration`` (unlabeled model inputs: a tensor, a tuple of positional inputs, a DataLoader or iterable
    of batches, a SequenceData; see :func:`kcompress.calibration.moments.calibration_set`) makes every targeted matrix
    fit what it computes on those inputs (at most ``calibrate_samples`` sequences, part held out; see
    ``docs/calibration.md``), layer after layer; ``calibrate_options`` are the fields of
    :class:`kcompress.calibration.run.CalibrationOptions`. ``distill_epochs`` then trains the compressed model to
    match the dense one's outputs on the same inputs (early stopping on the held-out part).

    Every setting is checked before any work as a :class:`kcompress.CompressConfig` (stored in
    ``report.options`` and the artifact). ``config`` gives them all at once, also in ``format``'s place
    (``compress(model, config)``); the setting keywords are then left at their defaults.
    """
    arguments = dict(locals())
    if isinstance(progress, bool):  # True: the CLI's progress display on stderr for this call
        with progress_callback(progress) as callback:
            return compress(**{**arguments, "progress": callback})
    if not isinstance(model, nn.Module):
        raise KCompressError(f"compress needs a torch nn.Module, got {type(model).__name__}")
    config = _config(arguments)
    if config.allocated:
        from kcompress.allocation.auto import compress_allocated

        model, report = compress_allocated(model, **config.keywords(), calibration=calibration, progress=progress,
                                           inplace=inplace)
        report.options.update(config.to_dict())  # the settings asked for; the allocation's are in report.allocation
        return model, report
    report = Report(format=config.base["format"], options=config.to_dict(), versions=_versions(),
                    model_params_before=count_parameters(model))
    report.options["threads"] = {"fit": fit_thread_count(), "model": torch.get_num_threads()}
    run = _calibration_run(calibration, config.calibrate_samples, config.calibrate_options, config.distill_epochs,
                           config.seed)
    plans = plan_compression(model, config, report)
    teacher = model
    if not inplace:
        model = _copy(model)
    elif run is not None:
        teacher = _copy(model)
    if run is None:
        model, report.matrices = fit_layers(model, plans, config.seed, progress)
    else:
        model, report.matrices = run.fit(model, teacher, list(plans),
                                         lambda m: fit_layers(m, plans, config.seed, progress, run), _copy)
    set_execution(model, config.execution, measure=config.check_speed)
    if run is not None:
        run.finish(model, teacher, report, config.seed, progress)
    report.model_params_after = count_parameters(model)
    _check_speed(model, report, config.execution, config.check_speed)
    report.warnings.extend(result_warnings(report))
    for message in report.warnings:
        warnings.warn(message, KCompressWarning, stacklevel=2)
    return model, report


def plan_matrices(model: nn.Module, format: str = "kcp", rank: Optional[Rank] = None, ratio: Optional[float] = None,
                  **options: Any) -> list[MatrixPlan]:
    """The plans of the targeted matrices :func:`compress` would fit with these arguments (``options``: its
    ``include``, ``exclude``, ``targets``, ``gates``, ``order``, ``modes``, ``overrides``, ``fit_options``),
    in fitting order; nothing is fitted. Errors are the ones :func:`compress` raises."""
    names = ("include", "exclude", "targets", "gates", "order", "modes", "overrides", "fit_options")
    settings = {name: options[name] for name in names if options.get(name) is not None}
    plans = plan_compression(model, CompressConfig(format=format, rank=rank, ratio=ratio, **settings), Report())
    return [plan for layer in plans.values() for plan in layer.values() if plan.targeted]


def _check_speed(model: nn.Module, report: Report, execution: Plan, measure: bool) -> None:
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


def _config(arguments: Mapping[str, Any]) -> CompressConfig:
    """The :class:`CompressConfig` of a :func:`compress` call: the one given (as ``config`` or in ``format``'s
    place), whose settings must then not also be given as keywords, or one built from the keywords."""
    given, settings = arguments["config"], {name: arguments[name] for name in config_fields()}
    defaults = config_defaults()
    if isinstance(settings["format"], CompressConfig):
        if given is not None:
            raise KCompressError("give one CompressConfig, not two")
        given, settings["format"] = settings["format"], defaults["format"]
    if given is None:
        return CompressConfig(**settings)
    if not isinstance(given, CompressConfig):
        raise KCompressError(f"config must be a CompressConfig, got {type(given).__name__}")
    changed = [name for name, value in settings.items() if value != defaults[name]]
    if changed:
        raise KCompressError(f"give settings either in config or as keywords, not both: {', '.join(changed)}")
    return given


def _calibration_run(data: Any, samples: int, options: Optional[Mapping[str, Any]], distill_epochs: int,
                     seed: int) -> Optional[CalibrationRun]:
    """The calibration of a :func:`compress` call (None without data), every setting checked."""
    if data is None:
        if distill_epochs:
            raise KCompressError("distill_epochs needs calibration data (the inputs to distil on)")
        return None
    return CalibrationRun(data, samples, options, distill_epochs, seed)
