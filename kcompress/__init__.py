"""kcompress: post-training tensor-decomposition compression for recurrent networks."""

from .convert import compress
from .errors import KCompressError, KCompressWarning
from .formats import FORMATS, Factorization, build, get_format
from .report import Report
from .tensorize import Tensorization, choose_tensorization

__version__ = "0.1.0"

__all__ = [
    "FORMATS",
    "Factorization",
    "KCompressError",
    "KCompressWarning",
    "Report",
    "Tensorization",
    "__version__",
    "build",
    "choose_tensorization",
    "compress",
    "get_format",
]
