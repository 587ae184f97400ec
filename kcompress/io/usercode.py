"""The user's own code named on the command line: ``"module:name"`` or ``"path/to/file.py:name"``.

Evaluators (``--evaluator``) and model classes (``--model``) are imported here. A dotted module name is
looked up with the current directory searched first, and ``sys.path`` is restored afterwards; a failed
import names the directory that was searched. A ``.py`` path is loaded from that file directly.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import pathlib
import sys
from types import ModuleType
from typing import Any, Iterator

from kcompress.errors import KCompressError


def split_reference(text: str, what: str, kind: str = "function") -> tuple[str, str]:
    """``"module:name"`` -> ``(module, name)``; a KCompressError naming ``what`` (e.g. "evaluator") otherwise."""
    module, sep, name = str(text).rpartition(":")
    if not sep or not module or not name.isidentifier():
        raise KCompressError(f"{what} must be 'module:{kind}' or 'file.py:{kind}', got {text!r}")
    return module, name


def import_reference(text: str, what: str, kind: str = "function") -> Any:
    """The object ``text`` (``"module:name"``) names; a one-line KCompressError when it is not there."""
    module_name, name = split_reference(text, what, kind)
    module = import_module(module_name, what)
    if not hasattr(module, name):
        raise KCompressError(f"{what} {text}: {module_name} has no {kind} {name!r}")
    return getattr(module, name)


def import_module(name: str, what: str) -> ModuleType:
    """A module by ``.py`` path, or by dotted name with the current directory searched first."""
    if name.endswith(".py"):
        return _from_file(pathlib.Path(name), what)
    folder = os.getcwd()
    try:
        with searching(folder):
            return importlib.import_module(name)
    except ImportError as error:
        raise KCompressError(f"cannot import {what} module {name!r} ({error}); searched {folder} first, "
                             "then the installed packages") from error
    except Exception as error:  # noqa: BLE001 - the user's module failed while importing: one line
        raise KCompressError(f"{what} module {name!r} raised {type(error).__name__} on import: {error}") from error


def _from_file(path: pathlib.Path, what: str) -> ModuleType:
    """The module in a ``.py`` file (its own folder importable while it runs, as for ``python file.py``)."""
    if not path.is_file():
        raise KCompressError(f"{what} file not found: {path} (looked in {path.resolve().parent})")
    spec = importlib.util.spec_from_file_location(f"_kcompress_user_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise KCompressError(f"{what} file {path} cannot be imported as Python code")
    module = importlib.util.module_from_spec(spec)
    try:
        with searching(str(path.resolve().parent)):
            spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - the user's file: one line (traceback with --debug)
        raise KCompressError(f"{what} file {path} raised {type(error).__name__} on import: {error}") from error
    return module


@contextlib.contextmanager
def searching(*folders: str) -> Iterator[None]:
    """``folders`` first on ``sys.path`` (in that order) inside the block; ``sys.path`` as it was after it."""
    saved = list(sys.path)
    sys.path[:0] = list(folders)
    try:
        yield
    finally:
        sys.path[:] = saved


__all__ = ["import_module", "import_reference", "searching", "split_reference"]
