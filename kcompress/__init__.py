"""kcompress: post-training tensor-decomposition compression for recurrent networks.

``compress(model, format="kcp", rank=8)`` returns the compressed model and a :class:`Report`;
``compress_file`` does the same from checkpoint to artifact; ``load`` reads an artifact back.
"""

from .convert import compress
from .data import BUILTIN_DATASETS, SequenceData, load_builtin, load_data_file
from .errors import KCompressError, KCompressWarning
from .evaluate import evaluate
from .finetune import FinetuneResult, finetune
from .formats import FORMATS, Factorization, build, get_format
from .io import load, load_checkpoint, model_from_checkpoint, save_artifact
from .pipeline import compress_file
from .report import Report
from .tensorize import Tensorization, choose_tensorization

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_DATASETS",
    "FORMATS",
    "Factorization",
    "FinetuneResult",
    "KCompressError",
    "KCompressWarning",
    "Report",
    "SequenceData",
    "Tensorization",
    "__version__",
    "build",
    "choose_tensorization",
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
]
