"""The typed settings of a compression, built once at the edge and passed down unchanged
(:class:`CompressConfig` and its groups; :mod:`kcompress.config.checks` holds every check)."""

from kcompress.config.calibration import Augmentation, CalibrationOptions
from kcompress.config.compress import (
    CONFIG_VERSION,
    BudgetOptions,
    CompressConfig,
    ExecutionOptions,
    FinetuneOptions,
    RecoveryOptions,
    SelectionOptions,
    StorageOptions,
    TensorizationOptions,
)

__all__ = [
    "CONFIG_VERSION", "Augmentation", "BudgetOptions", "CalibrationOptions", "CompressConfig", "ExecutionOptions",
    "FinetuneOptions", "RecoveryOptions", "SelectionOptions", "StorageOptions",
    "TensorizationOptions",
]
