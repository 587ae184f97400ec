"""SIGTERM handled like SIGINT: what CI cancellation, ``timeout`` and container stops send.

While a command runs (:func:`terminations_interrupt`), SIGTERM and SIGHUP raise :class:`Terminated`, a
``KeyboardInterrupt``, in the main thread, so every ``finally`` runs (the atomic writer removes its temporary
file) exactly as for Ctrl-C. The command then prints one line and exits ``128 + signal number`` (130 for
SIGINT, 143 for SIGTERM), as a shell reports a process the signal killed. While a command's modules are
imported (torch, numpy: seconds), signals wait until the import is done (:func:`deferred_interrupts`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from types import FrameType
from typing import Iterator, Optional

#: signals raised as :class:`Terminated` while a command runs (SIGINT already raises KeyboardInterrupt)
HANDLED = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by ``signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum: int, frame: Optional[FrameType]) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def terminations_interrupt() -> Iterator[None]:
    """Within the block, :data:`HANDLED` signals raise :class:`Terminated` (main thread only; elsewhere a
    no-op); the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise) for signum in HANDLED}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Within the block SIGINT and :data:`HANDLED` signals are only recorded (an import interrupted half-way
    leaves C extensions such as numpy broken, and later imports fail oddly); after it, the first one
    recorded is raised (KeyboardInterrupt or :class:`Terminated`). Main thread only; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda number, frame: received.append(number))
                for signum in (signal.SIGINT, *HANDLED)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        raise KeyboardInterrupt() if received[0] == signal.SIGINT else Terminated(received[0])


def interruption(error: KeyboardInterrupt) -> tuple[str, int]:
    """The one-line message and exit code for an interrupted command."""
    signum = error.signum if isinstance(error, Terminated) else signal.SIGINT
    name = signal.Signals(signum).name
    return f"interrupted by {name}", 128 + signum
