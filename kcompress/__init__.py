"""kcompress: post-training tensor-decomposition compression for recurrent networks.

``compress(model, format="kcp", rank=8)`` returns the compressed model and a :class:`Report`
(``compress(model, CompressConfig(...))`` takes the same settings as one object);
``compress_file`` does the same from checkpoint to artifact; ``load`` reads an artifact back;
``set_execution(model, "auto" | "factorized" | "materialized" | {glob: path})`` chooses how each compressed
matrix runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kcompress.errors import KCompressError, KCompressWarning

if TYPE_CHECKING:  # the public names, for type checkers; at run time they load on first use (__getattr__)
    from kcompress.calibration.moments import SecondMoment, calibration_set, collect_second_moments
    from kcompress.config import CompressConfig
    from kcompress.formats import FORMATS, Factorization, build, get_format
    from kcompress.formats.tensorize import Tensorization, choose_tensorization
    from kcompress.io import load, load_checkpoint, model_from_checkpoint, save_artifact
    from kcompress.nn.paths import set_execution
    from kcompress.report.record import Report
    from kcompress.runs.convert import compress
    from kcompress.runs.pipeline import compress_file
    from kcompress.tuning.data import BUILTIN_DATASETS, SequenceData, load_builtin, load_data_file
    from kcompress.tuning.evaluate import evaluate
    from kcompress.tuning.finetune import FinetuneResult, finetune

from kcompress._version import __version__

#: public name -> the submodule defining it. Imported when first used, so that ``import kcompress`` (and
#: ``kcompress --help``) does not load torch.
_LAZY = {
    **dict.fromkeys(("SecondMoment", "calibration_set", "collect_second_moments"), "calibration.moments"),
    "compress": "runs.convert",
    "CompressConfig": "config",
    **dict.fromkeys(("BUILTIN_DATASETS", "SequenceData", "load_builtin", "load_data_file"), "tuning.data"),
    "evaluate": "tuning.evaluate",
    **dict.fromkeys(("FinetuneResult", "finetune"), "tuning.finetune"),
    **dict.fromkeys(("FORMATS", "Factorization", "build", "get_format"), "formats"),
    **dict.fromkeys(("load", "load_checkpoint", "model_from_checkpoint", "save_artifact"), "io"),
    "set_execution": "nn.paths",
    "compress_file": "runs.pipeline",
    "Report": "report.record",
    **dict.fromkeys(("Tensorization", "choose_tensorization"), "formats.tensorize"),
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
