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

import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from kcompress.errors import KCompressError
from kcompress.io.artifact import METADATA_KEY, _artifact_description, _restore
from kcompress.io.files import (
    PathLike,
    _corrupt,
    _read,
    _reason,
    _safetensors_tensors,
    check_memory,
    file_sha256,
    read_head,
    safetensors_header_of,
)
from kcompress.io.pickles import SCAN_BYTES, unsafe_globals
from kcompress.io.standalone import _check_module_finite, model_from_state_dict
from kcompress.io.usercode import searching

#: checkpoint kinds :func:`load_checkpoint` returns
KINDS = ("state_dict", "module", "torchscript", "safetensors", "artifact")

_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: the most tensors a checkpoint may hold: a recurrent model has dozens, a large transformer a few thousand
MAX_TENSORS = 20_000


@dataclass
class Checkpoint:
    """A loaded file: ``kind`` is one of :data:`KINDS`; ``state_dict`` maps names to tensors; ``module`` is
    the module for kinds ``module``, ``torchscript`` and ``artifact`` (None otherwise); ``sha256`` is the hex
    digest of the file's bytes."""

    path: Path
    kind: str
    state_dict: dict[str, Tensor]
    module: Optional[nn.Module]
    sha256: str


def load_checkpoint(path: PathLike, trust_checkpoint: bool = False) -> Checkpoint:
    """The checkpoint in ``path``, its kind detected from its bytes (see the module docstring).

    Every problem (missing, empty, truncated, not a checkpoint, needs untrusted code, more than
    :data:`MAX_TENSORS` tensors, larger than the memory left) is a one-line :class:`KCompressError` naming
    the file; the file is only read. The format is told from the first bytes (and a safetensors file's
    header) before anything else is read, so a file that is no checkpoint costs nothing whatever its size.
    """
    source = Path(path)
    head = read_head(source)
    header = safetensors_header_of(source) if head[:4] != b"PK\x03\x04" else None
    if head[:4] != b"PK\x03\x04" and header is None and head[:1] != b"\x80":  # \x80: pickle PROTO (legacy)
        raise KCompressError(
            f"{source}: not a checkpoint ({_looks_like(head)}); expected a torch.save file, a safetensors file, "
            "a TorchScript archive or a kcompress artifact"
        )
    if header is not None:
        _check_count(source, len([key for key in header if key != "__metadata__"]))
    check_memory(source, source.stat().st_size, "the checkpoint")
    digest = file_sha256(source)
    if header is not None:
        return _load_safetensors(source, _read(source), header, digest)
    if head[:4] == b"PK\x03\x04":
        return _load_zip(source, digest, trust_checkpoint)
    return _load_torch(source, digest, trust_checkpoint)


def _check_count(path: Path, count: int) -> None:
    """At most :data:`MAX_TENSORS` tensors (or storage records), else a one-line refusal."""
    if count > MAX_TENSORS:
        raise KCompressError(f"{path}: holds {count} tensors, more than the {MAX_TENSORS} a checkpoint of "
                             "kcompress may hold; save only the model's state dict")


def _looks_like(data: bytes) -> str:
    """A few words on what a file that is no checkpoint seems to be (from its first bytes)."""
    if data.startswith(b"\x89PNG"):
        return "it looks like a PNG image"
    if data[:4] == b"PK\x05\x06":
        return "it is an empty zip archive"
    head = data[:512]
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "it looks like a text file"
    return "unrecognised content"


def _load_zip(path: Path, digest: str, trust: bool) -> Checkpoint:
    """A zip: TorchScript archive or ``torch.save`` file, told apart by the records it holds (read from the
    archive's directory at its end, before any record is read)."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            names = [record.filename for record in records]
            _check_count(path, sum(1 for name in names if "/data/" in name))
    except KCompressError:
        raise
    except Exception as error:  # noqa: BLE001 - zipfile raises many types on damaged archives
        raise _corrupt(path, error) from None
    if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
        return _load_torchscript(path, digest, trust)
    if any(name.endswith("data.pkl") for name in names):
        return _load_torch(path, digest, trust)
    raise KCompressError(f"{path}: a zip archive that is not a torch checkpoint (no data.pkl record)")


def _pickle_bytes(path: Path) -> bytes:
    """The pickles of a torch.save file, where the globals it needs are named: a zip's ``data.pkl`` record, or
    the start of a legacy file (at most :data:`SCAN_BYTES` either way)."""
    if read_head(path, 4) != b"PK\x03\x04":
        return read_head(path, SCAN_BYTES)
    with zipfile.ZipFile(path) as archive:
        record = next(r for r in archive.infolist() if r.filename.endswith("data.pkl"))
        return archive.read(record) if record.file_size <= SCAN_BYTES else b""


def _load_torch(path: Path, digest: str, trust: bool) -> Checkpoint:
    """A ``torch.save`` file: weights-only, or fully unpickled when trusted and the weights-only loader
    refuses it."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the refusal below says it all
            warnings.simplefilter("ignore")
            obj = _torch_load(path, weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch.load raises many types on damaged input
        if not isinstance(error, pickle.UnpicklingError):
            raise _corrupt(path, error) from None
        if not trust:
            raise _refusal(path, error) from None
        obj = _unpickle_trusted(path)
    return _checkpoint_from_object(path, obj, digest)


def _torch_load(path: Path, weights_only: bool) -> Any:
    """``torch.load`` from an open file (given a path, torch guesses the format from its name)."""
    with open(path, "rb") as handle:
        return torch.load(handle, map_location="cpu", weights_only=weights_only)


def _refusal(path: Path, error: BaseException) -> KCompressError:
    """Why the weights-only loader refused a file: the globals it needs (read statically), or the loader's
    own reason when it needs none; a damaged pickle is called corrupt."""
    try:
        needed = unsafe_globals(_pickle_bytes(path))
    except Exception:  # noqa: BLE001 - no complete pickle (ValueError), a damaged zip record: corrupt
        return _corrupt(path, error)
    advice = ("re-save it as a state dict or safetensors, or pass --trust-checkpoint (trust_checkpoint=True) if "
              "you trust it")
    if needed:
        return KCompressError(f"{path}: refusing to unpickle it: it needs the Python globals "
                              f"{', '.join(sorted(needed))} (e.g. a whole pickled model), and unpickling them "
                              f"runs code from the file; {advice}")
    return KCompressError(f"{path}: torch's weights-only loader cannot read it ({_weights_only_reason(error)}); "
                          f"{advice}")


def _weights_only_reason(error: BaseException) -> str:
    """What torch's weights-only error says it met (e.g. ``Unsupported operand 149``), on one line."""
    text = str(error)
    detail = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else ""
    detail = " ".join(detail.split("Check the documentation", 1)[0].split())
    if detail.startswith(f"Unsupported operand {pickle.FRAME[0]}"):
        detail += " (pickle protocol 4 or later; that loader reads protocol 2, torch.save's default)"
    return detail[:240] or _reason(error)


def _unpickle_trusted(path: Path) -> Any:
    """The fully unpickled file, with the working directory and the file's folder importable (a pickled
    model's class lives in the user's module, e.g. ``mymodel.py`` beside it)."""
    try:
        with searching(os.getcwd(), str(path.resolve().parent)):
            return _torch_load(path, weights_only=False)
    except ImportError as error:
        raise KCompressError(f"{path}: could not unpickle it ({_reason(error)}): the module of a pickled class "
                             "must be importable; run kcompress from the folder that holds it, or add that folder "
                             "to PYTHONPATH") from None
    except Exception as error:  # noqa: BLE001 - arbitrary code ran; report whatever it raised
        raise KCompressError(f"{path}: could not unpickle it ({_reason(error)})") from None


def _checkpoint_from_object(path: Path, obj: Any, digest: str) -> Checkpoint:
    """A whole module (possibly under a nesting key), or the state dict found in ``obj``."""
    module = _find_nested(obj, lambda value: isinstance(value, nn.Module))
    if module is not None:
        state = dict(module.state_dict())
        _check_count(path, len(state))
        return Checkpoint(path, "module", state, module, digest)
    state_dict = _find_nested(obj, _is_tensor_dict)
    if state_dict is None:
        raise KCompressError(f"{path}: no state dict found ({_describe_object(obj)}); expected a dict of "
                             f"tensors, or one under {', '.join(repr(k) for k in _NESTED_KEYS)}")
    _check_count(path, len(state_dict))
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


def _load_torchscript(path: Path, digest: str, trust: bool) -> Checkpoint:
    """A TorchScript archive (only when trusted); its parameters and buffers are the state dict."""
    if not trust:
        raise KCompressError(
            f"{path}: is a TorchScript archive, and loading one runs code stored in the file; pass "
            "--trust-checkpoint (trust_checkpoint=True) if you trust it, or save its state_dict() instead"
        )
    try:
        with open(path, "rb") as handle:
            module = torch.jit.load(handle, map_location="cpu")
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


def model_from_checkpoint(checkpoint: Checkpoint) -> nn.Module:
    """The model to compress: the module itself (kinds ``module`` and ``artifact``), else built from the
    state dict by :func:`model_from_state_dict` (a TorchScript archive through its state dict)."""
    if checkpoint.kind == "artifact":
        assert checkpoint.module is not None  # set for kinds artifact and module
        return checkpoint.module
    if checkpoint.kind == "module":
        assert checkpoint.module is not None  # set for kinds artifact and module
        _check_module_finite(checkpoint.module, checkpoint.path)
        return checkpoint.module
    return model_from_state_dict(checkpoint.state_dict, str(checkpoint.path))
