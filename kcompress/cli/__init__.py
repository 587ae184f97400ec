"""The ``kcompress`` command line: a thin click layer over the library (see ``docs/cli.md``)."""

from .main import app, main

__all__ = ["app", "main"]
