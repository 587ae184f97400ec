"""A Ctrl-C while the ``kcompress`` command is still starting (importing torch takes seconds) prints one line
instead of a traceback. Only when this process is the command (``kcompress ...`` or ``python -m kcompress``):
a program that imports kcompress keeps Python's own behaviour. Once a command runs, ``kcompress.cli`` handles
SIGINT and SIGTERM itself (see :mod:`kcompress.cli.signals`)."""

from __future__ import annotations

import os
import sys
from types import TracebackType
from typing import Optional


def running_as_command() -> bool:
    """Whether the interpreter was started as ``kcompress`` (the entry point) or ``python -m kcompress``."""
    argv = list(getattr(sys, "orig_argv", []))
    if "-m" in argv[1:]:
        index = argv.index("-m", 1)
        return argv[index + 1:index + 2] == ["kcompress"]
    return len(argv) > 1 and os.path.basename(argv[1]) == "kcompress"


def quiet_startup_interrupts() -> None:
    """In the command, an uncaught KeyboardInterrupt prints ``kcompress: error: interrupted by SIGINT``."""
    if not running_as_command():
        return
    previous = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, traceback: Optional[TracebackType]) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.stderr.write("kcompress: error: interrupted by SIGINT\n")
            return
        previous(kind, value, traceback)

    sys.excepthook = hook
