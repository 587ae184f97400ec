"""Planning a compression: which layers are compressed (``include``/``exclude``, supported types) and, per
matrix, its format, modes and rank with every override applied. Planning reads only shapes and closed forms
(nothing is fitted or built), so every mistake in a request is reported before the first fit.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from torch import nn

from kcompress.config.compress import CompressConfig
from kcompress.errors import KCompressError
from kcompress.formats import Dense, Factorization, FormatOptions, get_format
from kcompress.formats.tensorize import Tensorization
from kcompress.nn import COMPRESSED_TYPES
from kcompress.report.record import Report
from kcompress.report.rows import SkippedLayer, qualified_name

NOTHING_MATCHED = "no LSTM/GRU/Linear/Embedding layer matched"


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
    options: FormatOptions
    targeted: bool

    @property
    def name(self) -> str:
        return qualified_name(self.layer, self.matrix)

    @property
    def clamped(self) -> bool:
        if not self.targeted or self.rank_requested is None:
            return False
        return self.rank_used != self.fmt.normalize_rank(self.tensorization, self.rank_requested)

    def modes(self) -> str:
        text = self.tensorization.describe()
        return f"{self.blocks}×{text}" if self.blocks > 1 else text


# ---------------------------------------------------------------------- layer selection
def _select_layers(
    model: nn.Module, config: CompressConfig, report: Report
) -> tuple[list[tuple[str, nn.Module]], list[SkippedLayer]]:
    """The layers to compress, in ``named_modules`` order, and the candidates left out (with reasons).

    Candidates are modules whose exact type is in ``COMPRESSED_TYPES`` (subclasses such as attention's
    output projection are left alone) and other torch RNNs (``nn.RNN``), which are skipped as unsupported.
    """
    selected: list[tuple[str, nn.Module]] = []
    skipped: list[SkippedLayer] = []
    matched_globs: set[str] = set()
    for name, module in model.named_modules():
        if not _candidate(module, config):
            continue
        matched_globs.update(g for g in config.include_globs or () if fnmatch.fnmatchcase(name, g))
        reason = _exclusion_reason(name, module, config)
        if reason is None:
            reason = _unsupported_reason(module)
            if reason is not None:
                _warn(report, f"{name or '(model)'} skipped: {reason}")
        if reason is None:
            selected.append((name, module))
        else:
            skipped.append(SkippedLayer(name, type(module).__name__, reason))
    for glob in config.include_globs or ():
        if glob not in matched_globs:
            _warn(report, f"include glob {glob!r} matched no LSTM/GRU/Linear layer")
    return selected, skipped


def _candidate(module: nn.Module, config: CompressConfig) -> bool:
    """Whether ``module`` is considered at all: a supported type or another torch RNN; an Embedding only when
    ``targets`` names ``"embedding"`` (or ``"all"``): a state dict holds its table as a plain tensor, so an
    include glob alone must not make a module and its state dict compress differently."""
    if isinstance(module, nn.Embedding) and "embedding" not in config.target_kinds:
        return False
    return type(module) in COMPRESSED_TYPES or isinstance(module, (nn.RNNBase, nn.RNNCellBase))


def _exclusion_reason(name: str, module: nn.Module, config: CompressConfig) -> Optional[str]:
    """Why ``targets``/``include``/``exclude`` leave this layer out, or None. A Linear layer is selected when
    ``targets`` names ``"linear"`` (or ``"all"``) or an include glob names it; a recurrent layer when
    ``targets`` names one of its matrices (``"ih"``, ``"hh"``); a Conv1d/Conv2d only when an include glob names
    it (its kernel is the matrix ``(out_channels, in_channels·k)``). Include and exclude globs then narrow the
    selection (Embedding layers are candidates only when targeted, :func:`_candidate`)."""
    kinds = config.target_kinds
    if isinstance(module, nn.Linear) and config.include_globs is None and "linear" not in kinds:
        return ("Linear layers are compressed only when targets include 'linear' (or 'all') or an include glob "
                "names them")
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and config.include_globs is None:
        return "convolutions are compressed only when an include glob names them"
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)) and not {"ih", "hh"} & set(kinds):
        return "targets leave its matrices dense"
    if config.include_globs is not None and not any(fnmatch.fnmatchcase(name, g) for g in config.include_globs):
        return "not matched by include"
    excluded_by = [g for g in config.exclude_globs if fnmatch.fnmatchcase(name, g)]
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
#: per matrix name: ``(format, rank)`` chosen by an allocation
Choices = Mapping[str, tuple[str, Any]]


def plan_compression(model: nn.Module, config: CompressConfig, report: Report,
                     choices: Optional[Choices] = None) -> dict[str, dict[str, MatrixPlan]]:
    """``{layer name: {matrix name: plan}}`` for the selected layers; fills ``report.skipped`` and warnings.

    ``choices`` (an allocation's, :meth:`kcompress.allocation.choose.Allocation.choices`) give matrices their
    format and rank. Without them an allocated ``config`` plans shapes only (``rank_used`` None)."""
    layers, report.skipped = _select_layers(model, config, report)
    plans = {name: _plan_layer(name, module, config, report, choices or {}) for name, module in layers}
    _warn_unused_overrides(config, [p for layer in plans.values() for p in layer.values() if p.targeted], report)
    if not layers:
        _warn(report, NOTHING_MATCHED)
    return plans


def targeted_plans(plans: Mapping[str, Mapping[str, MatrixPlan]]) -> list[MatrixPlan]:
    """The targeted matrices' plans, in fitting order."""
    return [plan for layer in plans.values() for plan in layer.values() if plan.targeted]


def _plan_layer(name: str, module: nn.Module, config: CompressConfig, report: Report,
                choices: Choices) -> dict[str, MatrixPlan]:
    """``{torch parameter name: plan}`` for every matrix of one selected layer."""
    layer_cls = COMPRESSED_TYPES[type(module)]
    matrix_names, _ = layer_cls.parameter_names(layer_cls.dense_config(module))
    plans = {}
    for matrix in matrix_names:
        rows, cols = layer_cls.dense_matrix(module, matrix).shape
        try:
            plans[matrix] = _plan_matrix(name, type(module).__name__, matrix, (rows, cols), layer_cls.gates, config,
                                         choices)
        except KCompressError as error:
            if config.include_globs is not None or type(module) not in (nn.Linear, nn.Embedding):
                raise KCompressError(f"{qualified_name(name, matrix)}: {error}") from None
            # a whole-model target (targets "linear"/"embedding"/"all") too small for the budget stays dense
            _warn(report, f"{qualified_name(name, matrix)} kept dense: {error}")
            plans[matrix] = _dense_plan(name, type(module).__name__, matrix, (rows, cols))
        plan = plans[matrix]
        if plan.clamped:
            _warn(report, f"{plan.name}: rank {plan.rank_requested} is above the largest {plan.fmt.name} rank for "
                          f"modes {plan.tensorization.describe()}; using rank {plan.rank_used}")
    return plans


def _plan_matrix(
    layer: str, layer_type: str, matrix: str, shape: tuple[int, int], gates: int, config: CompressConfig,
    choices: Choices,
) -> MatrixPlan:
    """Format, modes, rank and options of one matrix, checked by the format (:meth:`Factorization.check`)."""
    if not _is_target(matrix, config.target_kinds):
        return _dense_plan(layer, layer_type, matrix, shape)
    rows, cols = shape
    settings = _settings(layer, matrix, config)
    if qualified_name(layer, matrix) in choices:
        settings["format"], settings["rank"] = choices[qualified_name(layer, matrix)]
    fmt = get_format(settings["format"])
    blocks = gates if config.selection.gates == "separate" else 1
    tz = fmt.default_tensorization(
        rows // blocks, cols, settings["order"], settings["out_modes"], settings["in_modes"],
        out_group=gates if blocks == 1 else 1,
    )
    if settings["rank"] is not None:
        requested = fmt.normalize_rank(tz, settings["rank"])
    elif settings["ratio"] is not None:
        requested = fmt.rank_for_ratio(tz, settings["ratio"])
    else:  # an allocated budget without its choices: the shapes only
        options = fmt.options_type.from_dict(settings["fit_options"], owner=fmt.name)
        return MatrixPlan(layer, layer_type, matrix, shape, fmt, tz, blocks, None, None, options, targeted=True)
    used, options = fmt.check(tz, fmt.clamp_rank(tz, requested), settings["fit_options"])
    return MatrixPlan(layer, layer_type, matrix, shape, fmt, tz, blocks, requested, used, options, targeted=True)


def _dense_plan(layer: str, layer_type: str, matrix: str, shape: tuple[int, int]) -> MatrixPlan:
    """The plan of a matrix kept as it is (format ``dense``, not targeted)."""
    tz = Dense.default_tensorization(*shape)
    return MatrixPlan(layer, layer_type, matrix, shape, Dense, tz, 1, None, None, Dense.options_type(), targeted=False)


def _is_target(matrix: str, targets: tuple[str, ...]) -> bool:
    """``weight_ih*``/``weight_hh*`` follow ``targets``; any other matrix (Linear's ``weight``) is a target."""
    kind = re.match(r"weight_(ih|hh)", matrix)
    return kind is None or kind.group(1) in targets


def _settings(layer: str, matrix: str, config: CompressConfig) -> dict[str, Any]:
    """The global settings with every matching override applied in order (later globs win; a rank
    override replaces a ratio and vice versa). ``fit_options`` merge key by key; options belong to a format,
    so an override that changes the format drops the options collected for the previous one."""
    settings = {**config.base, "fit_options": dict(config.fit_options or {})}
    for glob, override in config.override_rules:
        if _override_matches(glob, layer, matrix):
            if "rank" in override or "ratio" in override:
                settings["rank"] = settings["ratio"] = None
            kept = settings["fit_options"] if override.get("format", settings["format"]) == settings["format"] else {}
            settings.update(override)
            settings["fit_options"] = {**kept, **override.get("fit_options", {})}
    return settings


def _override_matches(glob: str, layer: str, matrix: str) -> bool:
    return fnmatch.fnmatchcase(qualified_name(layer, matrix), glob) or fnmatch.fnmatchcase(layer, glob)


def _warn_unused_overrides(config: CompressConfig, targeted: list[MatrixPlan], report: Report) -> None:
    for glob, _ in config.override_rules:
        if not any(_override_matches(glob, p.layer, p.matrix) for p in targeted):
            _warn(report, f"override {glob!r} matched no compressed matrix")


def _warn(report: Report, message: str) -> None:
    """Record ``message`` in the report (:func:`compress` emits them all as warnings when it is done)."""
    report.warnings.append(message)
