"""Progress events and their display. The library reports through a plain callback; a Python caller gets the
display on stderr by passing ``progress=True`` (:func:`progress_callback`: rich bars on a terminal, plain
lines otherwise), and the CLI renders the same events with the same classes."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Optional, Union

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from kcompress.errors import KCompressError

#: plain mode: the longest a running fit stays silent before an iteration line is printed
HEARTBEAT_SECONDS = 5.0


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
        with stderr_progress() as callback:
            yield callback
    elif progress is False or progress is None:
        yield None
    elif callable(progress):
        yield progress
    else:
        raise KCompressError(f"progress must be a callback, True or None, got {type(progress).__name__}")


def silent(_: ProgressEvent) -> None:
    """A callback that ignores everything."""


@contextlib.contextmanager
def stderr_progress(console: Optional[Console] = None) -> Iterator[ProgressCallback]:
    """Progress on stderr for the block: rich bars when it is a terminal, plain lines otherwise."""
    console = console or Console(stderr=True, highlight=False)
    if console.is_terminal:
        with RichProgress(console) as callback:
            yield callback
    else:
        yield PlainProgress(lambda text: print(text, file=sys.stderr, flush=True))


#: how epochs are named by the ``name`` of their events: fine-tuning, or distillation after calibration
_EPOCH_LABELS = {"finetune": "fine-tune", "distill": "distillation"}


def _epoch_label(event: ProgressEvent) -> str:
    return _EPOCH_LABELS.get(event.name, event.name)


def relabelled(progress: Optional[ProgressCallback], stage: str, name: str) -> Optional[ProgressCallback]:
    """``progress`` with the events of ``stage`` renamed ``name`` (e.g. fine-tuning epochs that distil)."""
    if progress is None:
        return None
    callback = progress
    return lambda event: callback(replace(event, name=name) if event.stage == stage else event)


def number(value: Optional[float]) -> str:
    """A metric or error for display: four significant digits, an em dash when unknown."""
    return "—" if value is None else f"{value:.4g}"


class PlainProgress:
    """Progress events as plain lines: one per fitted matrix (error, time), per fine-tuning epoch and per
    trial; a long fit prints its current iteration at most every :data:`HEARTBEAT_SECONDS`."""

    def __init__(self, emit: Callable[[str], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.emit, self.clock = emit, clock
        self.started = self.last = clock()

    def __call__(self, event: ProgressEvent) -> None:
        handler = getattr(self, f"_on_{event.stage}", None)
        if handler is not None:
            handler(event)
        elif event.message:
            self._print(event.message)

    def _print(self, text: str) -> None:
        self.emit(text)
        self.last = self.clock()

    def _on_layer(self, event: ProgressEvent) -> None:
        self.started = self.last = self.clock()

    def _on_iteration(self, event: ProgressEvent) -> None:
        if event.index > 0 and self.clock() - self.last >= HEARTBEAT_SECONDS:  # 0: the start, not an iteration
            gate = f" ({event.message})" if event.message else ""
            where = f"{event.name}{gate}: iteration {event.index}/{event.total}"
            self._print(f"      {where}, error {number(event.error)}")

    def _on_done(self, event: ProgressEvent) -> None:
        seconds = self.clock() - self.started
        self._print(f"[{event.index}/{event.total}] {event.name}: relative error {number(event.error)} "
                    f"({seconds:.2f} s)")

    def _on_epoch(self, event: ProgressEvent) -> None:
        self._print(f"{_epoch_label(event)} epoch {event.index}/{event.total}: {event.message}")

    def _on_trial(self, event: ProgressEvent) -> None:
        self._print(f"[{event.index}/{event.total}] {event.name}: {event.message}")


class RichProgress:
    """Progress events as rich bars: matrices (or epochs, or trials) overall, and the current fit's
    iterations with its error; a line stays for every fitted matrix and every trial."""

    def __init__(self, console: Console) -> None:
        self.bars = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, transient=True,
        )
        self.overall: Optional[TaskID] = None
        self.current: Optional[TaskID] = None
        self.started = time.monotonic()

    def __enter__(self) -> "RichProgress":
        self.bars.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bars.__exit__(*exc)

    def __call__(self, event: ProgressEvent) -> None:
        handler = getattr(self, f"_on_{event.stage}", None)
        if handler is not None:
            handler(event)
        elif event.message:
            self.bars.console.print(event.message, markup=False)

    def _overall(self, description: str, completed: int, total: int, info: str = "") -> None:
        if self.overall is None:
            self.overall = self.bars.add_task(description, total=total or None, info=info)
        fields: dict[str, Any] = {"description": description} if description else {}
        self.bars.update(self.overall, completed=completed, total=total or None, info=info, **fields)

    def _on_layer(self, event: ProgressEvent) -> None:
        self._overall("matrices", event.index - 1, event.total)
        self.started = time.monotonic()
        self.current = self.bars.add_task(f"  {event.name}", total=None, info="")

    def _on_iteration(self, event: ProgressEvent) -> None:
        if self.current is not None:
            info = f"error {number(event.error)}" + (f" ({event.message})" if event.message else "")
            self.bars.update(self.current, completed=event.index, total=event.total or None, info=info)

    def _on_done(self, event: ProgressEvent) -> None:
        if self.current is not None:
            self.bars.remove_task(self.current)
            self.current = None
        self._overall("matrices", event.index, event.total)
        seconds = time.monotonic() - self.started
        self.bars.console.print(f"[{event.index}/{event.total}] {event.name}: relative error "
                                f"{number(event.error)} ({seconds:.2f} s)", markup=False)

    def _on_epoch(self, event: ProgressEvent) -> None:
        self._overall(_epoch_label(event), event.index, event.total, event.message)

    def _on_wait(self, event: ProgressEvent) -> None:
        if self.overall is not None:
            self.bars.update(self.overall, info=event.message)

    def _on_trial(self, event: ProgressEvent) -> None:
        self._overall("trials", event.index, event.total)
        self.bars.console.print(f"[{event.index}/{event.total}] {event.name}: {event.message}", markup=False)
