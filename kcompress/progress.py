"""Progress events. The library reports through a plain callback; the CLI renders them with rich."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class ProgressEvent:
    """One step of long work.

    ``stage``: ``"layer"`` (a matrix fit starts: ``index``/``total`` count matrices), ``"iteration"`` (a fit
    iteration: ``index``/``total`` count iterations, ``error`` is the current relative error),
    ``"done"`` (a matrix is fitted, ``error`` final), or a free-form stage such as ``"epoch"`` (fine-tuning)
    or ``"trial"`` (sweeps).
    """

    stage: str
    name: str
    index: int = 0
    total: int = 0
    error: Optional[float] = None
    message: str = ""


ProgressCallback = Callable[[ProgressEvent], None]


def silent(_: ProgressEvent) -> None:
    """A callback that ignores everything."""
