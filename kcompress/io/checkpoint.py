"""Reading checkpoints (:func:`load_checkpoint`). The kind is detected from the bytes, not the extension:

- a zip holding ``constants.pkl`` or a ``code/`` folder is a TorchScript archive; loading one compiles and
  runs code stored in the file, so it needs ``trust_checkpoint=True`` (as a pickled module does);
- any other zip with a ``data.pkl``, or a pickle stream, is a ``torch.save`` file. It is loaded with
  ``weights_only=True``; a file that needs other Python globals (a whole pickled ``nn.Module``, an
  ``argparse.Namespace``, ...) is refused with the list of those globals (read statically, nothing runs)
  unless ``trust_checkpoint=True``. There is never a silent fallback to unsafe unpickling;
- a safetensors file is a state dict, or a kcompress artifact when its header holds ``"kcompress"``
  metadata.

The state dict is the loaded dict of tensors, or one found under ``"state_dict"``, ``"model_state_dict"``,
``"model"``, ``"module"`` or ``"net"`` (nested up to three levels); a ``"module."`` (DataParallel) or
``"_orig_mod."`` (``torch.compile``) prefix shared by every key is removed.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from kcompress.errors import KCompressError
from kcompress.io.artifact import METADATA_KEY, _artifact_description, _restore
from kcompress.io.files import PathLike, _corrupt, _read, _reason, _safetensors_header, _safetensors_tensors

#: checkpoint kinds :func:`load_checkpoint` returns
KINDS = ("state_dict", "module", "torchscript", "safetensors", "artifact")

_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class Checkpoint:
    """A loaded file: ``kind`` is one of :data:`KINDS`; ``state_dict`` maps names to tensors; ``module`` is
    the module for kinds ``module``, ``torchscript`` and ``artifact`` (None otherwise); ``sha256`` is the hex
    digest of the file's bytes as they were loaded."""

    path: Path
    kind: str
    state_dict: dict[str, Tensor]
    module: Optional[nn.Module]
    sha256: str


def load_checkpoint(path: PathLike, trust_checkpoint: bool = False) -> Checkpoint:
    """The checkpoint in ``path``, its kind detected from its bytes (see the module docstring).

    Every problem (missing, empty, truncated, not a checkpoint, needs untrusted code) is a one-line
    :class:`KCompressError` naming the file; the file is only read.
    """
    source = Path(path)
    data = _read(source)
    digest = hashlib.sha256(data).hexdigest()
    if data[:4] == b"PK\x03\x04":
        return _load_zip(source, data, digest, trust_checkpoint)
    header = _safetensors_header(data)
    if header is not None:
        return _load_safetensors(source, data, header, digest)
    if data[:1] == b"\x80":  # pickle PROTO opcode: a torch.save file in the legacy format
        return _load_torch(source, data, digest, trust_checkpoint)
    raise KCompressError(
        f"{source}: not a checkpoint ({_looks_like(data)}); expected a torch.save file, a safetensors file, "
        "a TorchScript archive or a kcompress artifact"
    )


def _looks_like(data: bytes) -> str:
    """A few words on what a file that is no checkpoint seems to be."""
    if data.startswith(b"\x89PNG"):
        return "it looks like a PNG image"
    if data[:4] == b"PK\x05\x06":
        return "it is an empty zip archive"
    head = data[:512]
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "it looks like a text file"
    return "unrecognised content"


def _load_zip(path: Path, data: bytes, digest: str, trust: bool) -> Checkpoint:
    """A zip: TorchScript archive or ``torch.save`` file, told apart by the records it holds."""
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except Exception as error:  # noqa: BLE001 - zipfile raises many types on damaged archives
        raise _corrupt(path, error) from None
    if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
        return _load_torchscript(path, data, digest, trust)
    if any(name.endswith("data.pkl") for name in names):
        return _load_torch(path, data, digest, trust)
    raise KCompressError(f"{path}: a zip archive that is not a torch checkpoint (no data.pkl record)")


def _load_torch(path: Path, data: bytes, digest: str, trust: bool) -> Checkpoint:
    """A ``torch.save`` file: weights-only, or fully unpickled when trusted and weights-only refuses it."""
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch.load raises many types on damaged input
        needed = _unsafe_globals(data, error)
        if not needed:
            raise _corrupt(path, error) from None
        if not trust:
            raise KCompressError(
                f"{path}: refusing to unpickle it: it needs the Python globals {', '.join(sorted(needed))} "
                "(e.g. a whole pickled model), and unpickling them runs code from the file; re-save it as a "
                "state dict or safetensors, or pass --trust-checkpoint (trust_checkpoint=True) if you trust it"
            ) from None
        obj = _unpickle_trusted(path, data)
    return _checkpoint_from_object(path, obj, digest)


def _unsafe_globals(data: bytes, error: BaseException) -> list[str]:
    """The globals a ``torch.save`` file needs beyond the weights-only allowlist (read without running).

    Zip files are disassembled by ``get_unsafe_globals_in_checkpoint``; for the legacy pickle format the
    first offending global is taken from the weights-only error.
    """
    if not isinstance(error, pickle.UnpicklingError):
        return []
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - legacy or damaged file: fall back to the error message
        return re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(error))


def _unpickle_trusted(path: Path, data: bytes) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - arbitrary code ran; report whatever it raised
        raise KCompressError(f"{path}: could not unpickle it ({_reason(error)})") from None


def _checkpoint_from_object(path: Path, obj: Any, digest: str) -> Checkpoint:
    """A whole module (possibly under a nesting key), or the state dict found in ``obj``."""
    module = _find_nested(obj, lambda value: isinstance(value, nn.Module))
    if module is not None:
        return Checkpoint(path, "module", dict(module.state_dict()), module, digest)
    state_dict = _find_nested(obj, _is_tensor_dict)
    if state_dict is None:
        raise KCompressError(f"{path}: no state dict found ({_describe_object(obj)}); expected a dict of "
                             f"tensors, or one under {', '.join(repr(k) for k in _NESTED_KEYS)}")
    return Checkpoint(path, "state_dict", _strip_wrappers(dict(state_dict)), None, digest)


def _find_nested(obj: Any, accept: Callable[[Any], bool], depth: int = 3) -> Any:
    """``obj`` itself or the first value under :data:`_NESTED_KEYS` (recursively) that ``accept`` takes."""
    if accept(obj):
        return obj
    if depth == 0 or not isinstance(obj, Mapping):
        return None
    for key in _NESTED_KEYS:
        found = _find_nested(obj.get(key), accept, depth - 1) if key in obj else None
        if found is not None:
            return found
    return None


def _is_tensor_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()))


def _describe_object(obj: Any) -> str:
    if isinstance(obj, Mapping):
        keys = ", ".join(repr(k) for k in list(obj)[:6])
        return f"a dict with keys {keys}" if keys else "an empty dict"
    return f"a {type(obj).__name__}"


def _strip_wrappers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Without a :data:`_WRAPPER_PREFIXES` prefix that every key shares (repeatedly)."""
    for prefix in _WRAPPER_PREFIXES:
        if all(key.startswith(prefix) and len(key) > len(prefix) for key in state_dict):
            return _strip_wrappers({key[len(prefix):]: value for key, value in state_dict.items()})
    return state_dict


def _load_torchscript(path: Path, data: bytes, digest: str, trust: bool) -> Checkpoint:
    """A TorchScript archive (only when trusted); its parameters and buffers are the state dict."""
    if not trust:
        raise KCompressError(
            f"{path}: is a TorchScript archive, and loading one runs code stored in the file; pass "
            "--trust-checkpoint (trust_checkpoint=True) if you trust it, or save its state_dict() instead"
        )
    try:
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as error:  # noqa: BLE001 - the TorchScript loader raises many types
        raise _corrupt(path, error) from None
    return Checkpoint(path, "torchscript", dict(module.state_dict()), module, digest)


def _load_safetensors(path: Path, data: bytes, header: Mapping[str, Any], digest: str) -> Checkpoint:
    """A safetensors state dict, or a kcompress artifact (rebuilt into a runnable model)."""
    tensors = _safetensors_tensors(path, data)
    metadata = header.get("__metadata__")
    if isinstance(metadata, dict) and METADATA_KEY in metadata:
        model = _restore(path, _artifact_description(path, metadata), tensors, None)
        return Checkpoint(path, "artifact", tensors, model, digest)
    if not tensors:
        raise KCompressError(f"{path}: the safetensors file holds no tensors")
    return Checkpoint(path, "safetensors", _strip_wrappers(tensors), None, digest)
