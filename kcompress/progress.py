"""Progress events. The library reports through a plain callback; the CLI renders them with rich, and a
Python caller gets the same display by passing ``progress=True`` (:func:`progress_callback`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union


@dataclass(frozen=True)
class ProgressEvent:
    """One step of long work.

    ``stage``: ``"layer"`` (a matrix fit starts: ``index``/``total`` count matrices), ``"iteration"`` (a fit
    iteration: ``index``/``total`` count iterations, ``error`` is the current relative error),
    ``"done"`` (a matrix is fitted, ``error`` final), or a free-form stage such as ``"epoch"`` (fine-tuning),
    ``"stopped"`` (fine-tuning stopped early; ``message`` says why) or ``"trial"`` (sweeps). A renderer prints
    the ``message`` of a stage it does not know.
    """

    stage: str
    name: str
    index: int = 0
    total: int = 0
    error: Optional[float] = None
    message: str = ""


ProgressCallback = Callable[[ProgressEvent], None]
#: what a ``progress`` argument accepts: a callback, True (show progress on stderr), or None/False (none)
ProgressLike = Union[ProgressCallback, bool, None]


@contextlib.contextmanager
def progress_callback(progress: ProgressLike) -> Iterator[Optional[ProgressCallback]]:
    """The callback for a ``progress`` argument: True gives the CLI's display on stderr for the block (rich
    bars on a terminal, plain lines otherwise), a callable is used as it is, None/False gives None."""
    if progress is True:
        from kcompress.cli.render import Display  # only when asked: the library itself never prints

        with Display().progress() as callback:
            yield callback
    elif progress is False or progress is None:
        yield None
    elif callable(progress):
        yield progress
    else:
        from kcompress.errors import KCompressError

        raise KCompressError(f"progress must be a callback, True or None, got {type(progress).__name__}")


def silent(_: ProgressEvent) -> None:
    """A callback that ignores everything."""
