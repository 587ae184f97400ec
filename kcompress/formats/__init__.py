"""Weight formats and their registry (name -> class). Adding a format: one module and one line here."""

from __future__ import annotations

from typing import Any

from ..errors import KCompressError
from ..tensorize import Tensorization
from .adtn import ADTN
from .base import Factorization, FitInfo, ProgressFn, Rank, relative_error
from .dense import Dense
from .ht import HT
from .kcp import KCP
from .stack import Stack
from .svd import SVD
from .tt import TT

FORMATS: dict[str, type[Factorization]] = {cls.name: cls for cls in (ADTN, KCP, TT, HT, SVD, Dense)}


def get_format(name: str) -> type[Factorization]:
    """The format class registered under ``name`` (a clear error listing the choices otherwise)."""
    try:
        return FORMATS[name.lower()]
    except KeyError:
        raise KCompressError(f"unknown format {name!r}; choose one of {', '.join(sorted(FORMATS))}") from None


def build(config: dict[str, Any]) -> "Factorization | Stack":
    """An unfitted matrix module with the shapes described by its ``config()`` (to load factors into)."""
    if config["format"] == Stack.name:
        return Stack([build(part) for part in config["parts"]])
    cls = get_format(config["format"])
    return cls(Tensorization.from_dict(config["tensorization"]), config["rank"], **config.get("options", {}))


__all__ = ["FORMATS", "Dense", "Factorization", "Stack", "FitInfo", "ProgressFn", "Rank", "build", "get_format", "relative_error"]
