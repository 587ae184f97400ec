"""The checks of every setting, each a one-line :class:`KCompressError` naming the setting and its value."""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from kcompress.errors import KCompressError
from kcompress.formats import get_format

#: keys an ``overrides`` entry may set
OVERRIDE_KEYS = ("format", "rank", "ratio", "order", "out_modes", "in_modes", "fit_options")
#: what a compression may target: the recurrent matrices (input-to-hidden, hidden-to-hidden), every
#: Embedding table and every Linear layer; ``"all"`` is all of them


def check_int(name: str, value: Any, minimum: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise KCompressError(f"{name} must be an integer{bound}, got {value!r}")


def check_format(name: Any) -> str:
    if not isinstance(name, str):
        raise KCompressError(f"format must be a name, got {name!r}")
    return get_format(name).name


def check_rank(rank: Any) -> Any:
    """None, a positive int, or a non-empty list of positive ints (per-bond ranks)."""
    if rank is None:
        return None
    values = list(rank) if isinstance(rank, (list, tuple)) else [rank]
    if not values or any(isinstance(r, bool) or not isinstance(r, int) or r <= 0 for r in values):
        raise KCompressError(f"rank must be a positive integer or a list of them, got {rank!r}")
    return values if isinstance(rank, (list, tuple)) else rank


def check_ratio(ratio: Any) -> Optional[float]:
    if ratio is None:
        return None
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0 or ratio == float("inf"):
        raise KCompressError(f"ratio must be a positive number, got {ratio!r}")
    return float(ratio)


def check_order(order: Any) -> Optional[int]:
    if order is not None and (isinstance(order, bool) or not isinstance(order, int) or order < 1):
        raise KCompressError(f"order must be a positive integer, got {order!r}")
    return order


def check_mode_list(name: str, modes: Any) -> Optional[list[int]]:
    if modes is None:
        return None
    if not isinstance(modes, (list, tuple)) or not modes or any(
        isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in modes
    ):
        raise KCompressError(f"{name} must be a list of positive integers, got {modes!r}")
    return list(modes)


def check_modes(modes: Any) -> tuple[Optional[list[int]], Optional[list[int]]]:
    """``(out_modes, in_modes)``; either may be None (chosen per matrix)."""
    if modes is None:
        return None, None
    if not isinstance(modes, (list, tuple)) or len(modes) != 2:
        raise KCompressError(f"modes must be a pair (out_modes, in_modes), got {modes!r}")
    return check_mode_list("out_modes", modes[0]), check_mode_list("in_modes", modes[1])


def check_globs(what: str, globs: Any) -> tuple[str, ...]:
    """A list of glob strings (one string is taken as a list of one)."""
    items = [globs] if isinstance(globs, str) else globs
    if not isinstance(items, (list, tuple)) or not all(isinstance(g, str) and g for g in items):
        raise KCompressError(f"{what} must be a list of glob patterns, got {globs!r}")
    return tuple(items)


def check_overrides(overrides: Any) -> tuple[tuple[str, Mapping[str, Any]], ...]:
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
            checked.append((glob, check_override(settings)))
        except KCompressError as error:
            raise KCompressError(f"override {glob!r}: {error}") from None
    return tuple(checked)


def check_override(settings: Mapping[str, Any]) -> dict[str, Any]:
    """One override's settings, each value checked as the argument of the same name."""
    unknown = sorted(set(settings) - set(OVERRIDE_KEYS))
    if unknown:
        raise KCompressError(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(OVERRIDE_KEYS)}")
    if "rank" in settings and "ratio" in settings:
        raise KCompressError("give rank or ratio, not both")
    if any(settings.get(key, 0) is None for key in ("rank", "ratio")):
        raise KCompressError("rank and ratio cannot be null")
    checks: dict[str, Callable[[Any], Any]] = {
        "format": check_format, "rank": check_rank, "ratio": check_ratio, "order": check_order,
        "out_modes": lambda m: check_mode_list("out_modes", m),
        "in_modes": lambda m: check_mode_list("in_modes", m), "fit_options": check_fit_options,
    }
    return {key: checks[key](value) for key, value in settings.items()}


def check_fit_options(options: Any) -> dict[str, Any]:
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


def jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    return value


def check_formats(format: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """One format name or a list of them -> registered compression format names (no duplicates)."""
    names = [format] if isinstance(format, str) else format
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise KCompressError(f"format must be a name or a list of names, got {format!r}")
    classes = list(dict.fromkeys(get_format(name) for name in names))
    kept = [cls.name for cls in classes if not cls.compresses]
    if kept:
        raise KCompressError(f"{kept[0]!r} is not a compression format")
    return tuple(cls.name for cls in classes)


def check_budget(ratio: Optional[float], params: Optional[int]) -> None:
    """Exactly one of a positive ``ratio`` and a positive integer ``params``."""
    if (ratio is None) == (params is None):
        raise KCompressError("give exactly one of ratio and params")
    if params is not None and (isinstance(params, bool) or not isinstance(params, int) or params <= 0):
        raise KCompressError(f"params must be a positive integer, got {params!r}")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                              or not 0 < ratio < math.inf):
        raise KCompressError(f"ratio must be a positive number, got {ratio!r}")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise KCompressError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
