"""``CompressConfig``: every setting of one compression as one validated, JSON-able object.

:func:`kcompress.compress` builds one from its keywords (or takes one as ``config=``), the report and the
artifact store its :meth:`~CompressConfig.to_dict` as ``options``, and a sweep's trial log records it per
trial. The values are kept as given (``targets="ih,hh"`` stays a string), each checked on construction
with a one-line :class:`KCompressError`; the normalized forms the converter works with are properties
(:attr:`~CompressConfig.base`, :attr:`~CompressConfig.target_kinds`, ..., computed once). What is not a setting stays a
keyword of ``compress``: the model, the calibration data, ``progress`` and ``inplace``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence, Union

from kcompress.calibration.moments import DEFAULT_SAMPLES
from kcompress.calibration.run import CalibrationOptions
from kcompress.errors import KCompressError
from kcompress.formats import get_format
from kcompress.nn.plan import Plan, check_plan

Rank = Union[int, Sequence[int]]
Modes = tuple[Optional[Sequence[int]], Optional[Sequence[int]]]
#: keys an ``overrides`` entry may set
OVERRIDE_KEYS = ("format", "rank", "ratio", "order", "out_modes", "in_modes", "fit_options")
TARGETS = ("ih", "hh")
#: the recurrent matrices compressed by default: all of them (input-to-hidden and hidden-to-hidden)
DEFAULT_TARGETS = "ih,hh"
GATES = ("fused", "separate")
#: version of :meth:`CompressConfig.to_dict`'s layout
CONFIG_VERSION = 1


@dataclass(frozen=True)
class CompressConfig:
    """The settings of :func:`kcompress.compress` (its keywords of the same names; see ``docs/api.md``).

    ``allocate="uniform"`` (the default) applies ``rank`` or ``ratio`` to every matrix; ``"auto"`` (or a
    list of formats, or ``params``) lets :mod:`kcompress.allocation.auto` choose each matrix's format and rank.
    """

    format: Union[str, Sequence[str]] = "kcp"
    rank: Optional[Rank] = None
    ratio: Optional[float] = None
    include: Optional[Union[str, Sequence[str]]] = None
    exclude: Optional[Union[str, Sequence[str]]] = None
    targets: Union[str, Sequence[str]] = DEFAULT_TARGETS
    gates: str = "fused"
    order: Optional[int] = None
    modes: Optional[Modes] = None
    overrides: Optional[Mapping[str, Mapping[str, Any]]] = None
    seed: int = 0
    fit_options: Optional[Mapping[str, Any]] = None
    check_speed: bool = True
    allocate: str = "uniform"
    params: Optional[int] = None
    objective: str = "size"
    calibrate_samples: int = DEFAULT_SAMPLES
    calibrate_options: Optional[Mapping[str, Any]] = None
    distill_epochs: int = 0
    execution: Plan = "auto"

    version: ClassVar[int] = CONFIG_VERSION

    def __post_init__(self) -> None:
        check_plan(self.execution)
        if self.allocated:
            from kcompress.allocation.auto import check_allocation

            check_allocation(self.format, self.allocate, self.rank, self.ratio, self.params, self.objective,
                             self.overrides)
        else:
            if (self.rank is None) == (self.ratio is None):
                raise KCompressError("give exactly one of rank and ratio")
            _base(self)
        for what, globs in (("include", self.include), ("exclude", self.exclude)):
            if globs is not None:
                _check_globs(what, globs)
        _check_targets(self.targets)
        _check_overrides(self.overrides)
        if self.gates not in GATES:
            raise KCompressError(f"gates must be 'fused' or 'separate', got {self.gates!r}")
        _check_int("seed", self.seed)
        _check_int("calibrate_samples", self.calibrate_samples, minimum=1)
        _check_int("distill_epochs", self.distill_epochs, minimum=0)
        if not isinstance(self.check_speed, bool):
            raise KCompressError(f"check_speed must be true or false, got {self.check_speed!r}")
        _check_fit_options(self.fit_options)
        CalibrationOptions.from_mapping(self.calibrate_options)
        for spec in dataclasses.fields(self):  # tuples as lists, mappings as dicts: equal to its from_dict(to_dict())
            object.__setattr__(self, spec.name, _jsonable(getattr(self, spec.name)))

    # ------------------------------------------------------------------ normalized views
    @property
    def allocated(self) -> bool:
        """Whether formats and ranks are chosen per matrix (:mod:`kcompress.allocation.auto`) rather than given."""
        return self.allocate != "uniform" or not isinstance(self.format, str) or self.params is not None

    @cached_property
    def base(self) -> dict[str, Any]:
        """The global per-matrix settings (the keys of :data:`OVERRIDE_KEYS` but ``fit_options``), checked."""
        return _base(self)

    @cached_property
    def include_globs(self) -> Optional[tuple[str, ...]]:
        return None if self.include is None else _check_globs("include", self.include)

    @cached_property
    def exclude_globs(self) -> tuple[str, ...]:
        return () if self.exclude is None else _check_globs("exclude", self.exclude)

    @cached_property
    def target_kinds(self) -> tuple[str, ...]:
        """A tuple drawn from :data:`TARGETS`, e.g. ``("ih", "hh")``."""
        return _check_targets(self.targets)

    @cached_property
    def override_rules(self) -> tuple[tuple[str, Mapping[str, Any]], ...]:
        """``(glob, checked settings)`` in the order given (later globs win)."""
        return _check_overrides(self.overrides)

    # ------------------------------------------------------------------ dict form
    def to_dict(self) -> dict[str, Any]:
        """Every setting as a JSON-able value, with ``version``; :meth:`from_dict` gives an equal config."""
        values = {spec.name: _jsonable(getattr(self, spec.name)) for spec in dataclasses.fields(self)}
        return {"version": self.version, **values}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, extra: str = "error") -> "CompressConfig":
        """The config of a :meth:`to_dict` (missing keys take their defaults). Unknown keys raise a one-line
        error naming the allowed ones, or are left out with ``extra="ignore"`` (a report's ``options`` also
        holds what was added after compressing, e.g. ``threads``)."""
        names = [spec.name for spec in dataclasses.fields(cls)]
        version = values.get("version", cls.version)
        if version != cls.version:
            raise KCompressError(f"compress config version {version!r} is not supported (this is version {cls.version})")
        unknown = sorted(set(values) - set(names) - {"version"})
        if unknown and extra != "ignore":
            raise KCompressError(f"unknown compress setting(s) {', '.join(unknown)}; allowed: {', '.join(names)}")
        return cls(**{key: value for key, value in values.items() if key in names})

    def replace(self, **changes: Any) -> "CompressConfig":
        """A copy with ``changes`` applied (checked again)."""
        return dataclasses.replace(self, **changes)

    def keywords(self) -> dict[str, Any]:
        """The settings as :func:`kcompress.compress` keywords."""
        return {spec.name: getattr(self, spec.name) for spec in dataclasses.fields(self)}


def config_fields() -> tuple[str, ...]:
    """The names of :class:`CompressConfig`'s settings (the matching keywords of ``compress``)."""
    return tuple(spec.name for spec in dataclasses.fields(CompressConfig))


def config_defaults() -> dict[str, Any]:
    """Each setting's default (``compress``'s keywords have the same defaults)."""
    return {spec.name: spec.default for spec in dataclasses.fields(CompressConfig)}


# ---------------------------------------------------------------------- checks (each a one-line error)
def _base(config: CompressConfig) -> dict[str, Any]:
    out_modes, in_modes = _check_modes(config.modes)
    return {"format": _check_format(config.format), "rank": _check_rank(config.rank),
            "ratio": _check_ratio(config.ratio), "order": _check_order(config.order),
            "out_modes": out_modes, "in_modes": in_modes}


def _check_int(name: str, value: Any, minimum: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise KCompressError(f"{name} must be an integer{bound}, got {value!r}")


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
        "in_modes": lambda m: _check_mode_list("in_modes", m), "fit_options": _check_fit_options,
    }
    return {key: checks[key](value) for key, value in settings.items()}


def _check_fit_options(options: Any) -> dict[str, Any]:
    """A JSON-able dict (its keys and values are checked by the format each matrix gets)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise KCompressError(f"fit_options must be a dict, got {type(options).__name__}")
    try:
        json.dumps(dict(options))
    except (TypeError, ValueError):
        raise KCompressError(f"fit_options must be JSON-serialisable, got {options!r}") from None
    return dict(options)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value
