"""Typed format options: one small frozen dataclass per format, read from and written to JSON-able dicts.

A format declares its options as a subclass of :class:`FormatOptions` (``Factorization.options_type``).
Each field is declared with :func:`option`, which records the checks its values get (a range, a set of
choices); the field's annotation gives its type. :meth:`FormatOptions.from_dict` is the one way in from
user input, ``fit_options``, overrides, the CLI's ``--fit-option`` and artifacts: unknown keys are
refused with a one-line error naming the allowed ones, and keys renamed since artifacts first stored
them are still read (``renamed``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, ClassVar, Mapping, Optional, Sequence, TypeVar, Union, get_args, get_origin, get_type_hints

from kcompress.errors import KCompressError, KCompressWarning

O = TypeVar("O", bound="FormatOptions")


def option(default: Any, *, minimum: Optional[float] = None, positive: bool = False,
           choices: Optional[Sequence[Any]] = None) -> Any:
    """A dataclass field with its checks: ``minimum`` (inclusive), ``positive`` (``> 0``), ``choices``."""
    return dataclasses.field(default=default, metadata={"minimum": minimum, "positive": positive, "choices": choices})


@dataclasses.dataclass(frozen=True)
class FormatOptions:
    """The options of a format that has none, and the base class of every format's options.

    Values are checked on construction (:class:`KCompressError` naming the option); integers given for
    float options become floats and lists given for tuple options become tuples, so equal options compare
    equal however they were written.
    """

    #: earlier key -> field name; :meth:`from_dict` accepts the earlier key (artifacts that stored it)
    renamed: ClassVar[Mapping[str, str]] = {}

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for spec in dataclasses.fields(self):
            value = _checked(spec.name, getattr(self, spec.name), hints[spec.name], spec.metadata)
            object.__setattr__(self, spec.name, value)

    @classmethod
    def names(cls) -> list[str]:
        """The option keys, sorted."""
        return sorted(spec.name for spec in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls: type[O], values: Optional[Mapping[str, Any]], *, owner: str = "format",
                  unknown: str = "error") -> O:
        """Options from ``{key: value}`` (missing keys take their defaults; ``renamed`` keys are read as
        their new names). Unknown keys raise a one-line :class:`KCompressError` (``unknown="error"``) or, for
        artifacts written before the options were typed, are dropped with a warning (``unknown="warn"``)."""
        if values is None:
            values = {}
        if not isinstance(values, Mapping):
            raise KCompressError(f"{owner} options must be a dict of key -> value, got {type(values).__name__}")
        converted: dict[str, Any] = {}
        for key, value in values.items():
            name = cls.renamed.get(key, key)
            if name in converted:
                raise KCompressError(f"{owner} option {name} is given twice (as {key!r} and under its other name)")
            converted[name] = value
        extra = sorted(set(converted) - set(cls.names()))
        if extra:
            message = f"unknown {owner} options {', '.join(map(repr, extra))}; allowed: {', '.join(cls.names()) or 'none'}"
            if unknown != "warn":
                raise KCompressError(message)
            warnings.warn(message + " (ignored)", KCompressWarning, stacklevel=2)
            converted = {key: value for key, value in converted.items() if key not in extra}
        try:
            return cls(**converted)
        except KCompressError as error:
            raise KCompressError(f"{owner} {error}") from None

    def to_dict(self) -> dict[str, Any]:
        """Every option as a JSON-able value (tuples as lists); ``from_dict(to_dict())`` gives equal options."""
        return {
            spec.name: list(value) if isinstance(value, tuple) else value
            for spec in dataclasses.fields(self)
            for value in [getattr(self, spec.name)]
        }


def _checked(name: str, value: Any, hint: Any, checks: Mapping[str, Any]) -> Any:
    """``value`` checked against its field's type and ``checks`` (one-line errors), normalised."""
    if get_origin(hint) is Union and type(None) in get_args(hint):
        if value is None:
            return None
        hint = next(arg for arg in get_args(hint) if arg is not type(None))
    if hint is bool:
        if not isinstance(value, bool):
            raise KCompressError(f"option {name} must be true or false, got {value!r}")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise KCompressError(f"option {name} must be an integer, got {value!r}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise KCompressError(f"option {name} must be a finite number, got {value!r}")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise KCompressError(f"option {name} must be a string, got {value!r}")
    elif get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise KCompressError(f"option {name} must be a list of integers, got {value!r}")
        value = tuple(value)
    choices = checks.get("choices")
    if choices is not None and value not in choices:
        raise KCompressError(f"option {name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    minimum = checks.get("minimum")
    if minimum is not None and value < minimum:
        raise KCompressError(f"option {name} must be at least {minimum}, got {value!r}")
    if checks.get("positive") and not value > 0:
        raise KCompressError(f"option {name} must be positive, got {value!r}")
    return value
