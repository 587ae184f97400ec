"""``CompressConfig``: every setting of one compression as one typed, versioned tree, checked once.

Whoever starts the work builds it once (the keywords of :func:`kcompress.compress` through
:meth:`CompressConfig.from_keywords`, the CLI, a sweep trial, the budget search) and passes it down
unchanged; nothing below the edge forwards keyword dictionaries. The tree::

    CompressConfig
    ├── format, fit_options     the format (or formats to allocate between) and its options
    ├── budget                  rank | ratio | params, and how it is split: uniform or allocated
    ├── selection               include / exclude globs, targets (ih, hh), gates (fused, separate)
    ├── tensorization           order, modes
    ├── overrides               {glob: per-matrix settings}
    ├── calibration             CalibrationOptions (samples, data-aware fit, candidates, distillation)
    ├── recovery                unlabeled distillation epochs, labelled fine-tuning
    ├── execution               path (auto | factorized | materialized | {glob: path}), speed check
    ├── storage                 quantize (int8 | int4 | none): how the artifact stores the tensors
    └── seed

:meth:`~CompressConfig.to_dict` and :meth:`~CompressConfig.from_dict` round-trip it through JSON with a
schema version (version 1, the flat dictionary of earlier reports and artifacts, is still read).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Mapping, Optional, Sequence, Union

from kcompress.config.calibration import CalibrationOptions
from kcompress.config.checks import (
    check_fit_options,
    check_format,
    check_formats,
    check_globs,
    check_int,
    check_modes,
    check_overrides,
    check_rank,
    check_ratio,
    jsonable,
)
from kcompress.config.groups import (
    BudgetOptions,
    ExecutionOptions,
    FinetuneOptions,
    RecoveryOptions,
    SelectionOptions,
    StorageOptions,
    TensorizationOptions,
)
from kcompress.errors import KCompressError
from kcompress.names import (
    check_targets,
)

#: version of :meth:`CompressConfig.to_dict`'s layout (1: the flat keyword dictionary)
CONFIG_VERSION = 2


#: the groups of the tree: field name -> type
GROUPS: dict[str, type] = {"budget": BudgetOptions, "selection": SelectionOptions,
                           "tensorization": TensorizationOptions, "calibration": CalibrationOptions,
                           "recovery": RecoveryOptions, "execution": ExecutionOptions, "storage": StorageOptions}
#: flat keyword of :func:`kcompress.compress` -> (group, field) in the tree
KEYWORDS: dict[str, tuple[str, str]] = {
    **{name: ("budget", name) for name in ("rank", "ratio", "params", "size", "allocate", "objective")},
    **{name: ("selection", name) for name in ("include", "exclude", "targets", "gates")},
    **{name: ("tensorization", name) for name in ("order", "modes")},
    "calibrate_samples": ("calibration", "samples"), "distill_epochs": ("recovery", "distill_epochs"),
    "execution": ("execution", "path"), "check_speed": ("execution", "check_speed"),
    "quantize": ("storage", "quantize"),
}


@dataclass(frozen=True)
class CompressConfig:
    """The settings of one compression (see the module docs for the tree; ``docs/api.md``)."""

    format: Union[str, Sequence[str]] = "kcp"
    fit_options: Optional[Mapping[str, Any]] = None
    budget: BudgetOptions = field(default_factory=lambda: BudgetOptions(rank=8))
    selection: SelectionOptions = field(default_factory=SelectionOptions)
    tensorization: TensorizationOptions = field(default_factory=TensorizationOptions)
    overrides: Optional[Mapping[str, Mapping[str, Any]]] = None
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    recovery: RecoveryOptions = field(default_factory=RecoveryOptions)
    execution: ExecutionOptions = field(default_factory=ExecutionOptions)
    storage: StorageOptions = field(default_factory=StorageOptions)
    seed: int = 0

    version: ClassVar[int] = CONFIG_VERSION

    def __post_init__(self) -> None:
        for name, group in GROUPS.items():
            if not isinstance(getattr(self, name), group):
                raise KCompressError(f"{name} must be a {group.__name__}, got {type(getattr(self, name)).__name__}")
        if self.allocated:
            check_formats(self.format)
            if self.budget.allocate == "uniform" or self.budget.rank is not None:
                raise KCompressError("several formats or a parameter count need allocate='auto' and a ratio or "
                                     "params budget")
            for glob, settings in self.override_rules:
                fixed = sorted(set(settings) & {"format", "rank", "ratio"})
                if fixed:
                    raise KCompressError(f"override {glob!r} sets {', '.join(fixed)}, which allocate='auto' "
                                         f"chooses; leave it out or use allocate='uniform'")
        else:
            check_format(self.format)
        check_overrides(self.overrides)
        check_fit_options(self.fit_options)
        check_int("seed", self.seed)
        if self.budget.size is None and not isinstance(self.storage.quantize, (str, type(None))):
            raise KCompressError("a list of quantize storages needs a size budget to choose between them")
        for name in ("format", "fit_options", "overrides"):  # lists and dicts: equal to its from_dict(to_dict())
            object.__setattr__(self, name, jsonable(getattr(self, name)))
        for name in GROUPS:
            group = getattr(self, name)
            values = {spec.name: getattr(group, spec.name) for spec in dataclasses.fields(group)}
            object.__setattr__(self, name, dataclasses.replace(group, **{key: value if dataclasses.is_dataclass(value)
                                                                          else jsonable(value)
                                                                          for key, value in values.items()}))

    # ------------------------------------------------------------------ the shorthand
    @classmethod
    def from_keywords(cls, format: Union[str, Sequence[str]] = "kcp", *,
                      calibrate_options: Optional[Mapping[str, Any]] = None, **keywords: Any) -> "CompressConfig":
        """The config of :func:`kcompress.compress`'s flat keywords (``rank``, ``ratio``, ``include``, ...,
        ``calibrate_options`` for the fields of :class:`CalibrationOptions`); unknown keywords are an error."""
        unknown = sorted(set(keywords) - set(KEYWORDS) - {"fit_options", "overrides", "seed"})
        if unknown:
            raise KCompressError(f"unknown compress setting(s) {', '.join(unknown)}")
        options = dict(calibrate_options or {})
        if "samples" in options:
            raise KCompressError("give the sample count as calibrate_samples, not in calibrate_options")
        groups: dict[str, dict[str, Any]] = {"calibration": CalibrationOptions.from_mapping(options).to_dict(),
                                             "budget": {}}
        for keyword, (group, name) in KEYWORDS.items():
            if keyword in keywords:
                groups.setdefault(group, {})[name] = keywords[keyword]
        built = {name: GROUPS[name](**values) for name, values in groups.items()}
        return cls(format=format, fit_options=keywords.get("fit_options"), overrides=keywords.get("overrides"),
                   seed=keywords.get("seed", 0), **built)

    # ------------------------------------------------------------------ normalized views
    @property
    def allocated(self) -> bool:
        """Whether formats and ranks are chosen per matrix (:mod:`kcompress.allocation`) rather than given
        (a default ``allocate`` not yet resolved by :meth:`for_data` counts as given)."""
        return (self.budget.allocate == "auto" or not isinstance(self.format, str) or self.budget.params is not None
                or self.budget.size is not None)

    @cached_property
    def formats(self) -> tuple[str, ...]:
        """The format names (one, or the formats an allocation chooses between)."""
        return check_formats(self.format) if self.allocated else (check_format(self.format),)

    @cached_property
    def base(self) -> dict[str, Any]:
        """The per-matrix settings every matrix starts from (``format``, ``rank``, ``ratio``, ``order``,
        ``out_modes``, ``in_modes``); an allocated budget is not per matrix, so ``rank`` and ``ratio`` are then
        None (the allocation's choices fill them)."""
        out_modes, in_modes = check_modes(self.tensorization.modes)
        per_matrix = not self.allocated
        return {"format": self.formats[0], "rank": check_rank(self.budget.rank) if per_matrix else None,
                "ratio": check_ratio(self.budget.ratio) if per_matrix else None,
                "order": self.tensorization.order, "out_modes": out_modes, "in_modes": in_modes}

    @cached_property
    def include_globs(self) -> Optional[tuple[str, ...]]:
        include = self.selection.include
        return None if include is None else check_globs("include", include)

    @cached_property
    def exclude_globs(self) -> tuple[str, ...]:
        exclude = self.selection.exclude
        return () if exclude is None else check_globs("exclude", exclude)

    @cached_property
    def target_kinds(self) -> tuple[str, ...]:
        """A tuple drawn from ``("ih", "hh")``."""
        return check_targets(self.selection.targets)

    @cached_property
    def override_rules(self) -> tuple[tuple[str, Mapping[str, Any]], ...]:
        """``(glob, checked settings)`` in the order given (later globs win)."""
        return check_overrides(self.overrides)

    # ------------------------------------------------------------------ dict form
    def to_dict(self) -> dict[str, Any]:
        """Every setting as a JSON-able value, with ``version``; :meth:`from_dict` gives an equal config."""
        return {"version": self.version, **jsonable(dataclasses.asdict(self))}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, extra: str = "error") -> "CompressConfig":
        """The config of a :meth:`to_dict` (missing keys take their defaults), or of a version-1 flat dict.
        Unknown keys raise a one-line error naming the allowed ones, or are left out with ``extra="ignore"``."""
        version = values.get("version", 1)
        if version == 1:
            return _from_flat(values, extra)
        if version != cls.version:
            raise KCompressError(f"compress config version {version!r} is not supported (this is version {cls.version})")
        names = [spec.name for spec in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names) - {"version"})
        if unknown and extra != "ignore":
            raise KCompressError(f"unknown compress setting(s) {', '.join(unknown)}; allowed: {', '.join(names)}")
        kept = {key: value for key, value in values.items() if key in names}
        for name, group in GROUPS.items():
            if name in kept:
                kept[name] = _group_from_dict(group, kept[name])
        return cls(**kept)

    def for_data(self, calibrated: bool) -> "CompressConfig":
        """The config with the default allocation decided (:meth:`BudgetOptions.resolved`; ``calibrated``:
        whether calibration data is given). Overrides that fix a matrix's format, rank or ratio keep the
        per-matrix budget."""
        if self.budget.allocate is not None:
            return self
        fixed = any(set(settings) & {"format", "rank", "ratio"} for _, settings in self.override_rules)
        return self.replace(budget=self.budget.resolved(calibrated and not fixed))

    def replace(self, **changes: Any) -> "CompressConfig":
        """A copy with top-level ``changes`` applied (checked again)."""
        return dataclasses.replace(self, **changes)


def _group_from_dict(group: type, values: Any) -> Any:
    if not isinstance(values, Mapping):
        raise KCompressError(f"{group.__name__} must be a mapping, got {values!r}")
    if group is RecoveryOptions and isinstance(values.get("finetune"), Mapping):
        values = {**values, "finetune": FinetuneOptions(**values["finetune"])}
    try:
        return group(**values)
    except TypeError as error:
        raise KCompressError(f"{group.__name__}: {error}") from None


def _from_flat(values: Mapping[str, Any], extra: str) -> CompressConfig:
    """A version-1 config: :func:`kcompress.compress`'s flat keywords, as reports and artifacts stored them."""
    allowed = {"format", "calibrate_options", "fit_options", "overrides", "seed", *KEYWORDS}
    unknown = sorted(set(values) - allowed - {"version"})
    if unknown and extra != "ignore":
        raise KCompressError(f"unknown compress setting(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    return CompressConfig.from_keywords(**{key: value for key, value in values.items() if key in allowed})
