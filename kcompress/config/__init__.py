"""The typed settings of a compression, built once at the edge and passed down unchanged
(:class:`CompressConfig` in :mod:`.compress`, its option groups in :mod:`.groups` and :mod:`.calibration`;
:mod:`.checks` holds the checks)."""

from kcompress.config.calibration import Augmentation, CalibrationOptions
from kcompress.config.compress import CONFIG_VERSION, CompressConfig
from kcompress.config.groups import (
    BudgetOptions,
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
