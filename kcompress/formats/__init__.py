"""Weight formats and their registry (name -> class). Adding a format: one module and one line here."""

from __future__ import annotations

from typing import Any

from kcompress.errors import KCompressError
from kcompress.formats.adtn import ADTN, ADTNOptions
from kcompress.formats.base import Factorization, FitInfo, ProgressFn, Rank, relative_error
from kcompress.formats.bt import BT, BTOptions
from kcompress.formats.data_fit import DataFitInfo, DataFitSettings, output_error, refine_to_data, whitened_svd
from kcompress.formats.dense import Dense
from kcompress.formats.ht import HT
from kcompress.formats.kcp import KCP, KCPOptions
from kcompress.formats.options import FormatOptions
from kcompress.formats.stack import Stack
from kcompress.formats.svd import SVD
from kcompress.formats.tensorize import Tensorization
from kcompress.formats.tr import TR, TROptions
from kcompress.formats.treenet import TreeOptions
from kcompress.formats.tt import TT

FORMATS: dict[str, type[Factorization]] = {cls.name: cls for cls in (ADTN, KCP, TT, TR, HT, BT, SVD, Dense)}


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
    # artifacts written before options were typed may hold keys the format never read: dropped with a warning
    options = cls.options_type.from_dict(config.get("options"), owner=cls.name, unknown="warn")
    return cls(Tensorization.from_dict(config["tensorization"]), config["rank"], options)


def compression_formats() -> list[str]:
    """Names of the formats a user may ask for (every registered format but the one keeping a matrix as is)."""
    return sorted(name for name, cls in FORMATS.items() if cls.compresses)


__all__ = ["DataFitInfo", "DataFitSettings", "output_error", "refine_to_data", "whitened_svd", "FORMATS", "Dense", "Factorization", "Stack", "FitInfo", "ProgressFn", "Rank", "build", "get_format", "relative_error",
           "compression_formats", "FormatOptions", "KCPOptions", "TreeOptions", "ADTNOptions", "TROptions",
           "BTOptions"]
