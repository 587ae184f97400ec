"""The names a setting may take, the defaults the CLI shows and the checks its option parsing runs, without
importing torch: ``kcompress COMMAND --help`` and the option parser read them before any heavy module loads.
The config (:mod:`kcompress.config`) and the stages take their choices from here, so each list is written
once; the format names are checked against the registry by ``tests/config/test_config.py``."""

from __future__ import annotations

import re
from typing import Any

from kcompress.errors import KCompressError

#: the registered compression formats (every format but ``dense``), as :func:`kcompress.formats.compression_formats`
COMPRESSION_FORMATS = ("adtn", "bt", "ht", "kcp", "svd", "tr", "tt")
#: what a model's outputs are: class logits or values
TASKS = ("classification", "regression")
#: the metric of each task
TASK_METRICS = {"classification": "accuracy", "regression": "mse"}
#: fine-tuning losses: the labels, the dense model's outputs, or both
LOSSES = ("task", "distill", "both")
#: how a metric drop is measured against the dense baseline
DROP_TYPES = ("absolute", "relative")
#: how a budget is split: the same rank or ratio for every matrix, or chosen per matrix
ALLOCATIONS = ("uniform", "auto")
#: what an allocated budget counts: parameters or multiply MACs per input vector
OBJECTIVES = ("size", "latency")
#: one fit per matrix, or one per gate
GATES = ("fused", "separate")
#: calibration sequences used at most by default
DEFAULT_SAMPLES = 256
#: unlabeled distillation epochs at most when an accuracy gate fails (``distill_epochs="auto"``)
RECOVERY_EPOCHS = 30
#: the default learning rate of distillation and fine-tuning: each candidate rate is tried, the better kept
DEFAULT_LR = "auto"
#: the matrices a compression may target
TARGETS = ("ih", "hh", "embedding", "linear")


def check_targets(targets: Any) -> tuple[str, ...]:
    """A comma-separated string or a list of names from :data:`TARGETS` or ``"all"`` -> e.g. ``("ih", "hh")``."""
    items = targets.split(",") if isinstance(targets, str) else targets
    names = {str(item).strip().lower() for item in items} if isinstance(items, (list, tuple)) else set()
    if "all" in names:
        names = (names - {"all"}) | set(TARGETS)
    if not names or not names <= set(TARGETS):
        raise KCompressError(f"targets must be names from {', '.join(TARGETS)} or 'all' (e.g. 'ih,hh'), "
                             f"got {targets!r}")
    return tuple(t for t in TARGETS if t in names)


SIZE_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "kib": 1024, "mib": 1024**2}


def check_size(value: Any) -> int:
    """A size budget in bytes: a positive integer, or a positive number with a suffix of :data:`SIZE_UNITS`
    (``"200KB"``, ``"1.5 MiB"``, ``"4096B"``), rounded down to whole bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]+)\s*", str(value).lower())
    size = int(float(match.group(1)) * SIZE_UNITS[match.group(2)]) if match and match.group(2) in SIZE_UNITS else 0
    if isinstance(value, bool) or size <= 0:
        raise KCompressError(f"size must be a positive number of bytes with a unit B, KB, MB, KiB or MiB "
                             f"(e.g. 200KB), got {value!r}")
    return size
