"""kcompress: post-training tensor-decomposition compression for recurrent networks.

``compress(model, format="kcp", rank=8)`` returns the compressed model and a :class:`Report`
(``compress(model, CompressConfig(...))`` takes the same settings as one object);
``compress_file`` does the same from checkpoint to artifact; ``load`` reads an artifact back;
``set_execution(model, "auto" | "factorized" | "materialized" | {glob: path})`` chooses how each compressed
matrix runs.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from .errors import KCompressError, KCompressWarning

if TYPE_CHECKING:  # the public names, for type checkers; at run time they load on first use (__getattr__)
    from .calibrate import SecondMoment, calibration_set, collect_second_moments
    from .config import CompressConfig
    from .convert import compress
    from .data import BUILTIN_DATASETS, SequenceData, load_builtin, load_data_file
    from .evaluate import evaluate
    from .finetune import FinetuneResult, finetune
    from .formats import FORMATS, Factorization, build, get_format
    from .io import load, load_checkpoint, model_from_checkpoint, save_artifact
    from .nn.plan import set_execution
    from .pipeline import compress_file
    from .report import Report
    from .tensorize import Tensorization, choose_tensorization

__version__ = "0.1.0"

#: public name -> the submodule defining it. Imported when first used, so that ``import kcompress`` (and
#: ``kcompress --help``) does not load torch.
_LAZY = {
    **dict.fromkeys(("SecondMoment", "calibration_set", "collect_second_moments"), "calibrate"),
    "compress": "convert",
    "CompressConfig": "config",
    **dict.fromkeys(("BUILTIN_DATASETS", "SequenceData", "load_builtin", "load_data_file"), "data"),
    "evaluate": "evaluate",
    **dict.fromkeys(("FinetuneResult", "finetune"), "finetune"),
    **dict.fromkeys(("FORMATS", "Factorization", "build", "get_format"), "formats"),
    **dict.fromkeys(("load", "load_checkpoint", "model_from_checkpoint", "save_artifact"), "io"),
    "set_execution": "nn.plan",
    "compress_file": "pipeline",
    "Report": "report",
    **dict.fromkeys(("Tensorization", "choose_tensorization"), "tensorize"),
}


def __getattr__(name: str) -> Any:
    """A public name, imported from its submodule on first use (then cached in the package)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'kcompress' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """The package keeps its public functions ``evaluate`` and ``finetune`` when the submodules of the same
    names are imported (the import system would otherwise bind the submodule over the function)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType) and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "BUILTIN_DATASETS",
    "CompressConfig",
    "FORMATS",
    "Factorization",
    "FinetuneResult",
    "KCompressError",
    "KCompressWarning",
    "Report",
    "SecondMoment",
    "SequenceData",
    "Tensorization",
    "__version__",
    "build",
    "calibration_set",
    "choose_tensorization",
    "collect_second_moments",
    "compress",
    "compress_file",
    "evaluate",
    "finetune",
    "get_format",
    "load",
    "load_builtin",
    "load_checkpoint",
    "load_data_file",
    "model_from_checkpoint",
    "save_artifact",
    "set_execution",
]
