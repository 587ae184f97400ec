"""The Python globals a pickle would import, read without running it (:func:`pickle_globals`).

torch's weights-only loader refuses a pickle that needs globals outside its allowlist (a whole pickled
module, an ``argparse.Namespace``), and also every pickle written with protocol 4 or 5 (it does not read
``FRAME``, ``STACK_GLOBAL`` or ``MEMOIZE``). To say which globals a refused file needs, its opcodes are
walked with :mod:`pickletools`: nothing is imported or called. ``STACK_GLOBAL`` takes its module and name
from the stack, so the last two values pushed (through the memo as well) are followed. A legacy
``torch.save`` file (``_use_new_zipfile_serialization=False``) is five pickles in a row (magic number,
protocol, system info, the object, the storage keys) and then raw storage bytes; each pickle is walked.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickletools
from typing import IO, Any, Optional, cast

import torch

#: the most bytes of a pickle stream that are walked (a real checkpoint's object pickle is far smaller)
SCAN_BYTES = 16 * 2**20
#: the first object of a legacy torch.save file
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_MEMO_PUT = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}


def pickle_globals(data: bytes) -> set[str]:
    """Every ``module.name`` global the pickle in ``data`` names (all five pickles of a legacy torch.save
    file). A ValueError when ``data`` does not start with complete pickles."""
    stream = io.BytesIO(data[:SCAN_BYTES])
    found, first = _walk(stream)
    if first != _LEGACY_MAGIC:
        return found
    for _ in range(4):  # protocol, system info, the object, the storage keys
        found |= _walk(stream)[0]
    return found


def unsafe_globals(data: bytes) -> set[str]:
    """The globals of :func:`pickle_globals` that torch's weights-only loader does not allow."""
    return pickle_globals(data) - allowed_globals()


def allowed_globals() -> set[str]:
    """The ``module.name`` globals torch's weights-only loader accepts: its own and those the user added
    (``torch.serialization.add_safe_globals``). Empty where this torch does not say."""
    unpickler = getattr(torch, "_weights_only_unpickler", None)
    names: set[str] = set()
    for getter in ("_get_allowed_globals", "_get_user_allowed_globals"):
        function = getattr(unpickler, getter, None)
        if function is not None:
            names |= set(function())
    return names


def _walk(stream: IO[bytes]) -> tuple[set[str], Any]:
    """The globals of the one pickle at ``stream``'s position, and its first argument (a legacy file's first
    pickle is the magic number). A ValueError when the bytes there are no complete pickle."""
    found: set[str] = set()
    pushed: collections.deque[Optional[str]] = collections.deque(maxlen=2)
    memo: dict[Any, str] = {}
    memoized, first = 0, None
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            name = opcode.name
            if first is None and name not in ("PROTO", "FRAME"):
                first = arg
            if name in ("GLOBAL", "INST"):
                found.add(_qualified(*str(arg).split(" ", 1)))
            elif name == "STACK_GLOBAL":
                known = len(pushed) == 2 and None not in pushed
                found.add(_qualified(*cast("collections.deque[str]", pushed)) if known else "(a global computed while unpickling)")  # known: no None
            if name == "MEMOIZE":
                _remember(memo, memoized, pushed)
                memoized += 1
            elif name in _MEMO_PUT:
                _remember(memo, arg, pushed)
            elif name in _MEMO_GET:
                pushed.append(memo.get(arg))
            elif opcode.stack_after:
                pushed.append(arg if isinstance(arg, str) else None)
    except Exception as error:  # noqa: BLE001 - pickletools raises ValueError, UnicodeError, struct.error...
        raise ValueError(f"not a complete pickle ({type(error).__name__}: {error})") from None
    return found, first


def _qualified(module: str, name: str) -> str:
    """``module.name`` under Python 3's names (protocol 2 pickles say ``__builtin__`` for ``builtins``)."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def _remember(memo: dict[Any, str], index: Any, pushed: collections.deque) -> None:
    """Memo entry ``index`` for the value on top of the stack, when that is a string (only strings matter)."""
    if pushed and isinstance(pushed[-1], str):
        memo[index] = pushed[-1]


__all__ = ["SCAN_BYTES", "allowed_globals", "pickle_globals", "unsafe_globals"]
