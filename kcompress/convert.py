"""``compress``: replace a model's LSTM/GRU/cell/Linear layers by compressed drop-ins and report what was done.

The work runs in two passes. The *plan* pass reads only the layers' shapes: it selects layers
(``include``/``exclude``), resolves every matrix's settings (``overrides``), picks its modes and rank and
builds an unfitted module of that shape, so every mistake in the request is reported before any fit
starts. The *fit* pass then builds each compressed layer with ``from_dense`` and a matrix builder that fits
the planned format, and puts the layer where the dense one was.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import platform
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import tensorly
import torch
from torch import Tensor, nn

from . import formats
from .errors import KCompressError, KCompressWarning
from .formats import Dense, Factorization, Stack, get_format, relative_error
from .nn import COMPRESSED_TYPES, MatrixBuilder
from .progress import ProgressCallback, ProgressEvent
from .report import MatrixReport, Report, SkippedLayer, qualified_name
from .speed import CHECK_BATCH, measured_speedup
from .tensorize import Tensorization

Rank = Union[int, Sequence[int]]
Modes = tuple[Optional[Sequence[int]], Optional[Sequence[int]]]
#: keys an ``overrides`` entry may set
OVERRIDE_KEYS = ("format", "rank", "ratio", "order", "out_modes", "in_modes")
TARGETS = ("ih", "hh")
GATES = ("fused", "separate")
NOTHING_MATCHED = "no LSTM/GRU/Linear layer matched"


@dataclass(frozen=True)
class Request:
    """The validated arguments of :func:`compress`. ``base`` holds the global per-matrix settings (the keys
    of :data:`OVERRIDE_KEYS`); ``targets`` is a tuple drawn from :data:`TARGETS`."""

    base: Mapping[str, Any]
    include: Optional[tuple[str, ...]]
    exclude: tuple[str, ...]
    targets: tuple[str, ...]
    gates: str
    overrides: tuple[tuple[str, Mapping[str, Any]], ...]
    seed: int
    fit_options: Mapping[str, Any]


@dataclass(frozen=True)
class MatrixPlan:
    """How one ``(M, N)`` matrix is built: ``blocks`` fits (the gates, with ``gates="separate"``) of
    ``(M / blocks, N)`` each with ``fmt``, ``tensorization`` (of one block) and ``rank_used``.
    ``targeted`` is False for matrices kept dense (no progress events, rank reported as None)."""

    layer: str
    layer_type: str
    matrix: str
    shape: tuple[int, int]
    fmt: type[Factorization]
    tensorization: Tensorization
    blocks: int
    rank_requested: Any
    rank_used: Any
    options: Mapping[str, Any]
    targeted: bool

    @property
    def name(self) -> str:
        return qualified_name(self.layer, self.matrix)

    @property
    def clamped(self) -> bool:
        if not self.targeted:
            return False
        return self.rank_used != self.fmt.normalize_rank(self.tensorization, self.rank_requested)

    def modes(self) -> str:
        text = self.tensorization.describe()
        return f"{self.blocks}×{text}" if self.blocks > 1 else text


def compress(
    model: nn.Module,
    format: str = "kcp",
    rank: Optional[Rank] = None,
    ratio: Optional[float] = None,
    *,
    include: Optional[Sequence[str]] = None,
    exclude: Optional[Sequence[str]] = None,
    targets: Union[str, Sequence[str]] = "ih",
    gates: str = "fused",
    order: Optional[int] = None,
    modes: Optional[Modes] = None,
    overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
    seed: int = 0,
    inplace: bool = False,
    progress: Optional[ProgressCallback] = None,
    fit_options: Optional[Mapping[str, Any]] = None,
    check_speed: bool = True,
) -> tuple[nn.Module, Report]:
    """Compress the model's recurrent (and, when included, linear) layers; returns ``(model, report)``.

    See ``docs/design.md`` (convert). Every entry of ``report.warnings`` is also emitted as a
    :class:`KCompressWarning`. A model with nothing to compress is returned (copied) with an empty
    ``report.matrices`` and the warning :data:`NOTHING_MATCHED`; raising is left to the caller.
    With ``check_speed`` each compressed matrix is timed against its dense product at batch
    :data:`kcompress.speed.CHECK_BATCH` (a few ms each) and a warning names those that are slower.
    """
    arguments = dict(locals())
    if not isinstance(model, nn.Module):
        raise KCompressError(f"compress needs a torch nn.Module, got {type(model).__name__}")
    request = _validate(
        format, rank, ratio, include, exclude, targets, gates, order, modes, overrides, seed, fit_options
    )
    report = Report(format=request.base["format"], options=_options(arguments), versions=_versions(),
                    model_params_before=count_parameters(model))
    plans = _plan(model, request, report)
    if not inplace:
        model = _copy(model)
    model, report.matrices = _fit_layers(model, plans, request.seed, progress)
    report.model_params_after = count_parameters(model)
    if check_speed:
        _check_speed(model, report)
    for message in report.warnings:
        warnings.warn(message, KCompressWarning, stacklevel=2)
    return model, report


def _check_speed(model: nn.Module, report: Report) -> None:
    """Fill ``measured_speedup`` for compressed matrices and warn where the dense product is faster."""
    matrices = {
        qualified_name(name, matrix_name): matrix
        for name, module in model.named_modules()
        for matrix_name, matrix in getattr(module, "matrices", {}).items()
    }
    for row in report.matrices:
        if row.format == "dense" or row.name not in matrices:
            continue
        speedup = measured_speedup(matrices[row.name])
        row.measured_speedup = float(f"{speedup:.3g}")
        if speedup < 1.0:
            _warn(report, f"{row.name}: measured {1 / speedup:.1f}x slower than the dense product "
                          f"at batch {CHECK_BATCH} ({row.macs_after:,} vs {row.macs_before:,} MACs per vector); "
                          f"the saving is in storage only")


# ---------------------------------------------------------------------- validation
def _validate(
    format: str,
    rank: Optional[Rank],
    ratio: Optional[float],
    include: Optional[Sequence[str]],
    exclude: Optional[Sequence[str]],
    targets: Union[str, Sequence[str]],
    gates: str,
    order: Optional[int],
    modes: Optional[Modes],
    overrides: Optional[Mapping[str, Mapping[str, Any]]],
    seed: int,
    fit_options: Optional[Mapping[str, Any]],
) -> Request:
    """Every argument checked, each problem a one-line :class:`KCompressError`."""
    if (rank is None) == (ratio is None):
        raise KCompressError("give exactly one of rank and ratio")
    out_modes, in_modes = _check_modes(modes)
    base = {"format": _check_format(format), "rank": _check_rank(rank), "ratio": _check_ratio(ratio),
            "order": _check_order(order), "out_modes": out_modes, "in_modes": in_modes}
    if gates not in GATES:
        raise KCompressError(f"gates must be 'fused' or 'separate', got {gates!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise KCompressError(f"seed must be an integer, got {seed!r}")
    return Request(
        base=base,
        include=None if include is None else _check_globs("include", include),
        exclude=() if exclude is None else _check_globs("exclude", exclude),
        targets=_check_targets(targets),
        gates=gates,
        overrides=_check_overrides(overrides),
        seed=seed,
        fit_options=_check_fit_options(fit_options),
    )


def _check_format(name: Any) -> str:
    if not isinstance(name, str):
        raise KCompressError(f"format must be a name, got {name!r}")
    return get_format(name).name


def _check_rank(rank: Any) -> Any:
    """None, a positive int, or a non-empty list of positive ints (per-bond ranks)."""
    if rank is None:
        return None
    values = list(rank) if isinstance(rank, (list, tuple)) else [rank]
    if not values or any(isinstance(r, bool) or not isinstance(r, int) or r <= 0 for r in values):
        raise KCompressError(f"rank must be a positive integer or a list of them, got {rank!r}")
    return values if isinstance(rank, (list, tuple)) else rank


def _check_ratio(ratio: Any) -> Optional[float]:
    if ratio is None:
        return None
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0 or ratio == float("inf"):
        raise KCompressError(f"ratio must be a positive number, got {ratio!r}")
    return float(ratio)


def _check_order(order: Any) -> Optional[int]:
    if order is not None and (isinstance(order, bool) or not isinstance(order, int) or order < 1):
        raise KCompressError(f"order must be a positive integer, got {order!r}")
    return order


def _check_mode_list(name: str, modes: Any) -> Optional[list[int]]:
    if modes is None:
        return None
    if not isinstance(modes, (list, tuple)) or not modes or any(
        isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in modes
    ):
        raise KCompressError(f"{name} must be a list of positive integers, got {modes!r}")
    return list(modes)


def _check_modes(modes: Any) -> tuple[Optional[list[int]], Optional[list[int]]]:
    """``(out_modes, in_modes)``; either may be None (chosen per matrix)."""
    if modes is None:
        return None, None
    if not isinstance(modes, (list, tuple)) or len(modes) != 2:
        raise KCompressError(f"modes must be a pair (out_modes, in_modes), got {modes!r}")
    return _check_mode_list("out_modes", modes[0]), _check_mode_list("in_modes", modes[1])


def _check_globs(what: str, globs: Any) -> tuple[str, ...]:
    """A list of glob strings (one string is taken as a list of one)."""
    items = [globs] if isinstance(globs, str) else globs
    if not isinstance(items, (list, tuple)) or not all(isinstance(g, str) and g for g in items):
        raise KCompressError(f"{what} must be a list of glob patterns, got {globs!r}")
    return tuple(items)


def _check_targets(targets: Any) -> tuple[str, ...]:
    """``"ih"``, ``"hh"``, ``"ih,hh"`` or a list of those names -> e.g. ``("ih", "hh")``."""
    items = targets.split(",") if isinstance(targets, str) else targets
    names = {str(item).strip().lower() for item in items} if isinstance(items, (list, tuple)) else set()
    if not names or not names <= set(TARGETS):
        raise KCompressError(f"targets must be 'ih', 'hh' or 'ih,hh', got {targets!r}")
    return tuple(t for t in TARGETS if t in names)


def _check_overrides(overrides: Any) -> tuple[tuple[str, Mapping[str, Any]], ...]:
    """``{glob: {key: value}}`` with keys from :data:`OVERRIDE_KEYS`, each value checked as the argument."""
    if overrides is None:
        return ()
    if not isinstance(overrides, Mapping):
        raise KCompressError(f"overrides must be a mapping of glob -> settings, got {type(overrides).__name__}")
    checked = []
    for glob, settings in overrides.items():
        if not isinstance(glob, str) or not isinstance(settings, Mapping):
            raise KCompressError(f"override {glob!r} must map a glob to a dict of settings")
        try:
            checked.append((glob, _check_override(settings)))
        except KCompressError as error:
            raise KCompressError(f"override {glob!r}: {error}") from None
    return tuple(checked)


def _check_override(settings: Mapping[str, Any]) -> dict[str, Any]:
    """One override's settings, each value checked as the argument of the same name."""
    unknown = sorted(set(settings) - set(OVERRIDE_KEYS))
    if unknown:
        raise KCompressError(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(OVERRIDE_KEYS)}")
    if "rank" in settings and "ratio" in settings:
        raise KCompressError("give rank or ratio, not both")
    if any(settings.get(key, 0) is None for key in ("rank", "ratio")):
        raise KCompressError("rank and ratio cannot be null")
    checks: dict[str, Callable[[Any], Any]] = {
        "format": _check_format, "rank": _check_rank, "ratio": _check_ratio, "order": _check_order,
        "out_modes": lambda m: _check_mode_list("out_modes", m),
        "in_modes": lambda m: _check_mode_list("in_modes", m),
    }
    return {key: checks[key](value) for key, value in settings.items()}


def _check_fit_options(options: Any) -> Mapping[str, Any]:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise KCompressError(f"fit_options must be a dict, got {type(options).__name__}")
    try:
        json.dumps(dict(options))
    except (TypeError, ValueError):
        raise KCompressError(f"fit_options must be JSON-serialisable, got {options!r}") from None
    return dict(options)


# ---------------------------------------------------------------------- layer selection
def _select_layers(
    model: nn.Module, request: Request, report: Report
) -> tuple[list[tuple[str, nn.Module]], list[SkippedLayer]]:
    """The layers to compress, in ``named_modules`` order, and the candidates left out (with reasons).

    Candidates are modules whose exact type is in ``COMPRESSED_TYPES`` (subclasses such as attention's
    output projection are left alone) and other torch RNNs (``nn.RNN``), which are skipped as unsupported.
    """
    selected: list[tuple[str, nn.Module]] = []
    skipped: list[SkippedLayer] = []
    matched_globs: set[str] = set()
    for name, module in model.named_modules():
        if type(module) not in COMPRESSED_TYPES and not isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
            continue
        matched_globs.update(g for g in request.include or () if fnmatch.fnmatchcase(name, g))
        reason = _exclusion_reason(name, module, request)
        if reason is None:
            reason = _unsupported_reason(module)
            if reason is not None:
                _warn(report, f"{name or '(model)'} skipped: {reason}")
        if reason is None:
            selected.append((name, module))
        else:
            skipped.append(SkippedLayer(name, type(module).__name__, reason))
    for glob in request.include or ():
        if glob not in matched_globs:
            _warn(report, f"include glob {glob!r} matched no LSTM/GRU/Linear layer")
    return selected, skipped


def _exclusion_reason(name: str, module: nn.Module, request: Request) -> Optional[str]:
    """Why ``include``/``exclude`` leave this layer out, or None."""
    if request.include is None and isinstance(module, nn.Linear):
        return "Linear layers are compressed only when an include glob names them"
    if request.include is not None and not any(fnmatch.fnmatchcase(name, g) for g in request.include):
        return "not matched by include"
    excluded_by = [g for g in request.exclude if fnmatch.fnmatchcase(name, g)]
    return f"excluded by {excluded_by[0]!r}" if excluded_by else None


def _unsupported_reason(module: nn.Module) -> Optional[str]:
    """Why the layer cannot be compressed (its type or configuration), or None."""
    layer_cls = COMPRESSED_TYPES.get(type(module))
    if layer_cls is None:
        kinds = ", ".join(t.__name__ for t in COMPRESSED_TYPES)
        return f"{type(module).__name__} is not supported (supported: {kinds})"
    try:
        layer_cls.dense_config(module)
    except KCompressError as error:
        return str(error)
    return None


# ---------------------------------------------------------------------- planning
def _plan(model: nn.Module, request: Request, report: Report) -> dict[str, dict[str, MatrixPlan]]:
    """``{layer name: {matrix name: plan}}`` for the selected layers; fills ``report.skipped`` and warnings."""
    layers, report.skipped = _select_layers(model, request, report)
    plans = {name: _plan_layer(name, module, request, report) for name, module in layers}
    _warn_unused_overrides(request, [p for layer in plans.values() for p in layer.values() if p.targeted], report)
    if not layers:
        _warn(report, NOTHING_MATCHED)
    return plans


def _plan_layer(name: str, module: nn.Module, request: Request, report: Report) -> dict[str, MatrixPlan]:
    """``{torch parameter name: plan}`` for every matrix of one selected layer."""
    layer_cls = COMPRESSED_TYPES[type(module)]
    matrix_names, _ = layer_cls.parameter_names(layer_cls.dense_config(module))
    plans = {}
    for matrix in matrix_names:
        rows, cols = getattr(module, matrix).shape
        try:
            plans[matrix] = _plan_matrix(name, type(module).__name__, matrix, (rows, cols), layer_cls.gates, request)
        except KCompressError as error:
            raise KCompressError(f"{qualified_name(name, matrix)}: {error}") from None
        plan = plans[matrix]
        if plan.clamped:
            _warn(report, f"{plan.name}: rank {plan.rank_requested} is above the largest {plan.fmt.name} rank for "
                          f"modes {plan.tensorization.describe()}; using rank {plan.rank_used}")
    return plans


def _plan_matrix(
    layer: str, layer_type: str, matrix: str, shape: tuple[int, int], gates: int, request: Request
) -> MatrixPlan:
    """Format, modes and rank of one matrix; an unfitted module is built to check them."""
    rows, cols = shape
    if not _is_target(matrix, request.targets):
        tz = Dense.default_tensorization(rows, cols)
        return MatrixPlan(layer, layer_type, matrix, shape, Dense, tz, 1, None, None, {}, targeted=False)
    settings = _settings(layer, matrix, request)
    fmt = get_format(settings["format"])
    blocks = gates if request.gates == "separate" else 1
    tz = fmt.default_tensorization(
        rows // blocks, cols, settings["order"], settings["out_modes"], settings["in_modes"],
        out_group=gates if blocks == 1 else 1,
    )
    if settings["rank"] is not None:
        requested = fmt.normalize_rank(tz, settings["rank"])
    else:
        requested = fmt.rank_for_ratio(tz, settings["ratio"])
    used = fmt.normalize_rank(tz, fmt.clamp_rank(tz, requested))
    fmt(tz, used, **request.fit_options)  # unfitted, thrown away: the format checks modes, rank and options now
    return MatrixPlan(
        layer, layer_type, matrix, shape, fmt, tz, blocks, requested, used, request.fit_options, targeted=True
    )


def _is_target(matrix: str, targets: tuple[str, ...]) -> bool:
    """``weight_ih*``/``weight_hh*`` follow ``targets``; any other matrix (Linear's ``weight``) is a target."""
    kind = re.match(r"weight_(ih|hh)", matrix)
    return kind is None or kind.group(1) in targets


def _settings(layer: str, matrix: str, request: Request) -> dict[str, Any]:
    """The global settings with every matching override applied in order (later globs win; a rank
    override replaces a ratio and vice versa)."""
    settings = dict(request.base)
    for glob, override in request.overrides:
        if _override_matches(glob, layer, matrix):
            if "rank" in override or "ratio" in override:
                settings["rank"] = settings["ratio"] = None
            settings.update(override)
    return settings


def _override_matches(glob: str, layer: str, matrix: str) -> bool:
    return fnmatch.fnmatchcase(qualified_name(layer, matrix), glob) or fnmatch.fnmatchcase(layer, glob)


def _warn_unused_overrides(request: Request, targeted: list[MatrixPlan], report: Report) -> None:
    for glob, _ in request.overrides:
        if not any(_override_matches(glob, p.layer, p.matrix) for p in targeted):
            _warn(report, f"override {glob!r} matched no compressed matrix")


# ---------------------------------------------------------------------- fitting
def _fit_layers(
    model: nn.Module, plans: Mapping[str, Mapping[str, MatrixPlan]], seed: int, progress: Optional[ProgressCallback]
) -> tuple[nn.Module, list[MatrixReport]]:
    """Replace each planned layer of ``model`` by its fitted drop-in (same training mode); returns the
    model (the drop-in itself when the model is the layer) and the report rows in plan order."""
    fitter = _Fitter(seed, progress, sum(p.targeted for layer in plans.values() for p in layer.values()))
    for name, layer_plans in plans.items():
        dense = model.get_submodule(name)
        compressed = COMPRESSED_TYPES[type(dense)].from_dense(dense, fitter.builder(layer_plans))
        compressed.train(dense.training)
        model = replace_module(model, dense, compressed)
    return model, fitter.rows


class _Fitter:
    """Fits planned matrices, sends progress events and collects the report rows.

    Events per targeted matrix: ``layer`` (``index`` = 1-based position among the ``total`` targeted
    matrices), ``iteration`` (``index``/``total`` as the fit reports them; ``message`` = ``"gate g/G"`` for
    separate gates) and ``done`` (``error`` = relative error of the whole matrix).
    """

    def __init__(self, seed: int, progress: Optional[ProgressCallback], total: int) -> None:
        self.seed, self.progress, self.total = seed, progress, total
        self.index = 0
        self.rows: list[MatrixReport] = []

    def builder(self, plans: Mapping[str, MatrixPlan]) -> MatrixBuilder:
        """The ``from_dense`` builder of one layer: fits ``plans[name]`` (the gate count is in the plan)."""
        return lambda name, weight, gates: self.fit(plans[name], weight)

    def fit(self, plan: MatrixPlan, weight: Tensor) -> nn.Module:
        """The fitted matrix module for ``weight (M, N)``: one fit, or a ``Stack`` of ``plan.blocks`` fits."""
        if plan.targeted:
            self.index += 1
            self._emit(ProgressEvent("layer", plan.name, self.index, self.total))
        blocks = weight.chunk(plan.blocks) if plan.blocks > 1 else [weight]
        try:
            parts = [
                plan.fmt.fit(block, plan.tensorization, plan.rank_used, seed=self.seed,
                             progress=self._iteration_callback(plan, g, len(blocks)), **plan.options)
                for g, block in enumerate(blocks)
            ]
        except KCompressError as error:
            raise KCompressError(f"{plan.name}: {error}") from None
        module = Stack(parts) if plan.blocks > 1 else parts[0]
        error = relative_error(weight, module.reconstruct())
        if plan.targeted:
            self._emit(ProgressEvent("done", plan.name, self.index, self.total, error=error))
        self.rows.append(_matrix_report(plan, module, error))
        return module

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


def _matrix_report(plan: MatrixPlan, module: nn.Module, error: float) -> MatrixReport:
    """The report row of a fitted matrix; counts from the module's closed forms, error recomputed."""
    rows, cols = plan.shape
    info = module.fit_info
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
        params_after=int(module.num_params()),
        macs_before=rows * cols,
        macs_after=int(module.macs_per_vector()),
        relative_error=error,
        fit_seconds=float(info.seconds),
        iterations=int(info.iterations),
        clamped=plan.clamped,
    )


# ---------------------------------------------------------------------- model surgery and bookkeeping
def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> nn.Module:
    """Put ``new`` at every path where ``model`` holds ``old`` (``setattr`` on the parents); returns the
    model, which is ``new`` itself when ``old`` is the model."""
    if model is old:
        return new
    paths = [name for name, module in model.named_modules(remove_duplicate=False) if module is old]
    for path in paths:
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of values in the model's parameters (shared parameters once; buffers not counted)."""
    return sum(p.numel() for p in model.parameters())


def _copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as error:  # noqa: BLE001 - any failure to copy means the same to the user
        raise KCompressError(f"could not copy the model ({error}); pass inplace=True to compress it in place") from None


def _warn(report: Report, message: str) -> None:
    """Record ``message`` in the report (:func:`compress` emits them all as warnings when it is done)."""
    report.warnings.append(message)


def _versions() -> dict[str, str]:
    from . import __version__

    return {"kcompress": __version__, "torch": torch.__version__, "tensorly": tensorly.__version__,
            "python": platform.python_version()}


def _options(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-able arguments of :func:`compress` as given (``model`` and ``progress`` left out)."""
    names = ("format", "rank", "ratio", "include", "exclude", "targets", "gates", "order", "modes", "overrides",
             "seed", "inplace", "fit_options")
    return {name: _jsonable(arguments[name]) for name in names}


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value
