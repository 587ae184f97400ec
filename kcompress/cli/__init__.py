"""The ``kcompress`` command line: a thin click layer over the library (see ``docs/cli.md``)."""

from kcompress.cli.startup import quiet_startup_interrupts

quiet_startup_interrupts()  # before .main's imports, which take seconds (torch)

from kcompress.cli.main import app, main  # noqa: E402

__all__ = ["app", "main"]
