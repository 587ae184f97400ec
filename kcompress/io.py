"""Checkpoints in, compressed artifacts out: safe by default, atomic, never touching the user's file.

Reading (:func:`load_checkpoint`). The kind is detected from the bytes, not the extension:

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

Recognising layers (:func:`find_layers`) from names and shapes: torch's RNN names
(``weight_ih_l{k}[_reverse]``, ``weight_hh_l{k}...``, ``bias_...``) give LSTM (``4H`` rows) or GRU (``3H``
rows); ``weight_ih``/``weight_hh`` without ``_l{k}`` give LSTMCell or GRUCell; ``X.weight`` (2-D, floating)
with an optional ``X.bias`` gives Linear. A layer is recognised only when its module holds exactly the
tensors torch's layer has (so a projected LSTM, or a module with extra tensors, stays plain tensors), and
never for a path segment starting with ``emb``/``_emb`` (embeddings), 1-D or 3-D+ weights (norms, convs)
or vanilla RNNs (``H`` rows: not compressible). Once a layer is recognised, every missing tensor, wrong
shape (``weight_hh`` not ``(G·H, H)``, a bias of the wrong length, layer ``l``'s input not matching layer
``l-1``'s output) and NaN/Inf value is a one-line :class:`KCompressError` naming the tensor.

Writing (:func:`save_artifact`): one safetensors file with every tensor of ``model.state_dict()`` and a
JSON description under the header's ``"kcompress"`` metadata key (versions, options, source checksum, how
to rebuild the model, each compressed layer's ``layer_config()`` and matrix configs, the report, status).
Writes are atomic (temporary file beside the target, fsync, rename, fsync of the folder) and refuse to
replace the input or, without ``overwrite=True``, an existing file. :func:`load` rebuilds a runnable model.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import secrets
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from .errors import KCompressError
from .models import SequenceClassifier
from .nn import COMPRESSED_TYPES, CompressedLSTM, rebuild
from .report import Report

PathLike = Union[str, "os.PathLike[str]"]
#: checkpoint kinds :func:`load_checkpoint` returns
KINDS = ("state_dict", "module", "torchscript", "safetensors", "artifact")
#: key of the JSON description in an artifact's safetensors metadata
METADATA_KEY = "kcompress"
ARTIFACT_SCHEMA_VERSION = 1
#: forward of a model rebuilt from weights alone
WEIGHTS_ONLY = "this checkpoint holds weights only; pass a model or an --evaluator to run it"

_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_TORCH_LAYERS: dict[str, type[nn.Module]] = {cls.__name__: cls for cls in COMPRESSED_TYPES}
_COMPRESSED_LAYERS = tuple(COMPRESSED_TYPES.values())
_RNN_KEY = re.compile(r"^(weight|bias)_(ih|hh)_l(\d+)(_reverse)?$")
_CELL_KEYS = {"weight_ih", "weight_hh", "bias_ih", "bias_hh"}
_EMBEDDING = re.compile(r"(^|[._])emb", re.IGNORECASE)
_MAX_HEADER = 100 * 1024 * 1024
_TEMP_SUFFIX = ".kcompress-tmp"


# ====================================================================== reading checkpoints
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


def _read(path: Path) -> bytes:
    """All bytes of a regular, non-empty file."""
    if not path.exists():
        raise KCompressError(f"{path}: no such file")
    if path.is_dir():
        raise KCompressError(f"{path}: is a directory, not a checkpoint file")
    if not path.is_file():
        raise KCompressError(f"{path}: not a regular file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise KCompressError(f"{path}: cannot read it ({error.strerror or error})") from None
    if not data:
        raise KCompressError(f"{path}: the file is empty")
    return data


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


def _reason(error: BaseException) -> str:
    """``Type: first line of the message`` (at most 160 characters), for one-line errors."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(error).__name__}: {text[:160]}" if text else type(error).__name__


def _corrupt(path: Path, error: BaseException) -> KCompressError:
    return KCompressError(f"{path}: truncated or corrupt checkpoint ({_reason(error)})")


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


def _safetensors_header(data: bytes) -> Optional[dict[str, Any]]:
    """The JSON header of a safetensors file, or None when ``data`` does not start like one."""
    if len(data) < 10:
        return None
    (size,) = struct.unpack("<Q", data[:8])
    if not 2 <= size <= min(len(data) - 8, _MAX_HEADER) or data[8:9] != b"{":
        return None
    try:
        header = json.loads(data[8:8 + size])
    except ValueError:
        return None
    return header if isinstance(header, dict) else None


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


def _safetensors_tensors(path: Path, data: bytes) -> dict[str, Tensor]:
    try:
        return dict(safetensors.torch.load(data))
    except Exception as error:  # noqa: BLE001 - the Rust parser raises SafetensorError and others
        raise _corrupt(path, error) from None


def _artifact_description(path: Path, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON description stored under :data:`METADATA_KEY`, checked for its schema version."""
    try:
        description = json.loads(metadata[METADATA_KEY])
    except (TypeError, ValueError) as error:
        raise KCompressError(f"{path}: damaged kcompress metadata ({_reason(error)})") from None
    if not isinstance(description, dict):
        raise KCompressError(f"{path}: damaged kcompress metadata (not a JSON object)")
    version = description.get("schema_version")
    if not isinstance(version, int) or version > ARTIFACT_SCHEMA_VERSION:
        raise KCompressError(f"{path}: artifact schema version {version!r} is not supported by this kcompress "
                             f"(it reads version {ARTIFACT_SCHEMA_VERSION}); upgrade kcompress")
    return description


# ====================================================================== recognising layers
@dataclass(frozen=True)
class LayerSpec:
    """A torch layer recognised in a state dict: ``name`` its qualified path (``""``: the state dict is
    this one layer), ``type`` the torch class name (LSTM, GRU, LSTMCell, GRUCell, Linear), ``kwargs`` its
    constructor arguments. A state dict does not say ``batch_first`` or ``dropout``: RNNs get torch's
    defaults (``batch_first=False``, no dropout)."""

    name: str
    type: str
    kwargs: dict[str, Any] = field(hash=False)

    def build(self, device: Optional[Union[str, torch.device]] = None) -> nn.Module:
        """The dense torch layer (freshly initialised)."""
        return _TORCH_LAYERS[self.type](**self.kwargs, device=device)

    def describe(self) -> str:
        """``LSTM(input_size=12, hidden_size=16, ...)`` (for error messages)."""
        arguments = ", ".join(f"{k}={v}" for k, v in self.kwargs.items() if k != "batch_first")
        return f"{self.type}({arguments})"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerSpec":
        if data["type"] not in _TORCH_LAYERS:
            raise KCompressError(f"unknown layer type {data['type']!r}")
        return cls(str(data["name"]), data["type"], dict(data["kwargs"]))


def find_layers(state_dict: Mapping[str, Tensor]) -> list[LayerSpec]:
    """The LSTM/GRU/LSTMCell/GRUCell/Linear layers in ``state_dict``, in its key order.

    Raises :class:`KCompressError` naming the tensor when a recognised layer misses a tensor, has a
    tensor of the wrong shape, or holds NaN/Inf values (see the module docstring for the rules).
    """
    specs = []
    for prefix, leaves in _leaf_groups(state_dict).items():
        spec = _rnn_spec(prefix, leaves) or _cell_spec(prefix, leaves) or _linear_spec(prefix, leaves)
        if spec is not None:
            _check_finite(prefix, leaves)
            specs.append(spec)
    return specs


def _leaf_groups(state_dict: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """``{module path: {tensor name: tensor}}`` for the modules that hold tensors and no submodules."""
    groups: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state_dict.items():
        parent, _, leaf = key.rpartition(".")
        groups.setdefault(parent, {})[leaf] = tensor
    containers = {ancestor for parent in groups for ancestor in _strict_ancestors(parent)}
    return {prefix: leaves for prefix, leaves in groups.items() if prefix not in containers}


def _strict_ancestors(path: str) -> Iterable[str]:
    """``"a.b.c"`` -> ``""``, ``"a"``, ``"a.b"``; ``""`` has none."""
    if not path:
        return []
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(len(parts))]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _matrix(prefix: str, leaves: Mapping[str, Tensor], name: str) -> Tensor:
    """``leaves[name]``, which must exist and be 2-D."""
    tensor = leaves.get(name)
    if tensor is None:
        raise KCompressError(f"{_join(prefix, name)} is missing (found {', '.join(sorted(leaves))})")
    if tensor.dim() != 2:
        raise KCompressError(f"{_join(prefix, name)} has shape {tuple(tensor.shape)}; expected a matrix")
    return tensor


def _gates(prefix: str, name: str, weight_hh: Tensor) -> Optional[int]:
    """4 (LSTM) or 3 (GRU) from ``weight_hh (G·H, H)``; None for a vanilla RNN (``G = 1``, not compressible)."""
    rows, hidden = weight_hh.shape
    gates = rows // hidden if hidden and rows % hidden == 0 else 0
    if gates == 1:
        return None
    if gates not in (3, 4):
        raise KCompressError(f"{_join(prefix, name)} has shape {(rows, hidden)}; expected (G·H, H) with "
                             "G = 4 (LSTM) or 3 (GRU)")
    return gates


def _rnn_spec(prefix: str, leaves: Mapping[str, Tensor]) -> Optional[LayerSpec]:
    """An LSTM/GRU when every tensor has a torch RNN name (``weight_ih_l0``, ``bias_hh_l1_reverse``, ...)."""
    matches = [_RNN_KEY.match(name) for name in leaves]
    if not all(matches):
        return None
    weight_ih, weight_hh = _matrix(prefix, leaves, "weight_ih_l0"), _matrix(prefix, leaves, "weight_hh_l0")
    gates = _gates(prefix, "weight_hh_l0", weight_hh)
    if gates is None:
        return None
    kwargs = {
        "input_size": weight_ih.shape[1],
        "hidden_size": weight_hh.shape[1],
        "num_layers": 1 + max(int(m.group(3)) for m in matches if m),
        "bias": any(m.group(1) == "bias" for m in matches if m),
        "batch_first": False,
        "bidirectional": any(m.group(4) for m in matches if m),
    }
    return _checked(LayerSpec(prefix, "LSTM" if gates == 4 else "GRU", kwargs), leaves)


def _cell_spec(prefix: str, leaves: Mapping[str, Tensor]) -> Optional[LayerSpec]:
    """An LSTMCell/GRUCell: ``weight_ih``, ``weight_hh`` and optionally ``bias_ih``/``bias_hh``."""
    if not {"weight_ih", "weight_hh"} <= set(leaves) <= _CELL_KEYS:
        return None
    weight_ih, weight_hh = _matrix(prefix, leaves, "weight_ih"), _matrix(prefix, leaves, "weight_hh")
    gates = _gates(prefix, "weight_hh", weight_hh)
    if gates is None:
        return None
    kwargs = {"input_size": weight_ih.shape[1], "hidden_size": weight_hh.shape[1],
              "bias": bool({"bias_ih", "bias_hh"} & set(leaves))}
    return _checked(LayerSpec(prefix, "LSTMCell" if gates == 4 else "GRUCell", kwargs), leaves)


def _linear_spec(prefix: str, leaves: Mapping[str, Tensor]) -> Optional[LayerSpec]:
    """A Linear: a 2-D floating ``weight`` and optionally a 1-D ``bias``, outside embedding-named paths."""
    weight, bias = leaves.get("weight"), leaves.get("bias")
    if (weight is None or not set(leaves) <= {"weight", "bias"} or weight.dim() != 2
            or not weight.is_floating_point() or (bias is not None and bias.dim() != 1)
            or _EMBEDDING.search(prefix)):
        return None
    kwargs = {"in_features": weight.shape[1], "out_features": weight.shape[0], "bias": bias is not None}
    return _checked(LayerSpec(prefix, "Linear", kwargs), leaves)


def _checked(spec: LayerSpec, leaves: Mapping[str, Tensor]) -> LayerSpec:
    """``spec`` after checking that ``leaves`` are exactly the tensors of that torch layer, shape for shape."""
    expected = {name: tuple(t.shape) for name, t in spec.build(device="meta").state_dict().items()}
    for name, shape in expected.items():
        if name not in leaves:
            raise KCompressError(f"{_join(spec.name, name)} is missing for the {spec.describe()} "
                                 "that the other tensors describe")
        if tuple(leaves[name].shape) != shape:
            raise KCompressError(f"{_join(spec.name, name)} has shape {tuple(leaves[name].shape)}; expected "
                                 f"{shape} for the {spec.describe()} that the other tensors describe")
    return spec


def _check_finite(prefix: str, tensors: Mapping[str, Tensor]) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise KCompressError(f"{_join(prefix, name)} contains NaN or Inf values")


# ====================================================================== models from checkpoints
class StandaloneModel(nn.Module):
    """A state dict made a module: the recognised layers (dense torch modules) at their qualified paths and
    every other tensor as a buffer at its path (plain ``nn.Module`` containers in between), so
    ``state_dict()`` has exactly the checkpoint's keys. It holds weights only: ``forward`` raises."""

    def __init__(self, layers: Sequence[LayerSpec], buffers: Mapping[str, Tensor]) -> None:
        super().__init__()
        if any(not spec.name for spec in layers):
            raise KCompressError("a StandaloneModel holds layers at named paths, not at the root")
        self.layer_specs = list(layers)
        self.buffer_names = list(buffers)
        for spec in self.layer_specs:
            _place(self, spec.name, spec.build())
        for name, tensor in buffers.items():
            _place_buffer(self, name, tensor)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise KCompressError(WEIGHTS_ONLY)

    def describe(self) -> dict[str, Any]:
        """How to rebuild it: the layer specs and buffer names (the artifact's ``architecture``)."""
        return {"kind": "standalone", "layers": [s.to_dict() for s in self.layer_specs],
                "buffers": list(self.buffer_names)}


def model_from_checkpoint(checkpoint: Checkpoint) -> nn.Module:
    """The model to compress: the module itself (kinds ``module`` and ``artifact``), else built from the
    state dict by :func:`model_from_state_dict` (a TorchScript archive through its state dict)."""
    if checkpoint.kind == "artifact":
        return checkpoint.module
    if checkpoint.kind == "module":
        _check_module_finite(checkpoint.module, checkpoint.path)
        return checkpoint.module
    return model_from_state_dict(checkpoint.state_dict, str(checkpoint.path))


def model_from_state_dict(state_dict: Mapping[str, Tensor], source: str = "state dict") -> nn.Module:
    """A :class:`SequenceClassifier` when the tensors are exactly one (``rnn.*``, ``head.*``), the torch layer
    itself when they are one layer's, else a :class:`StandaloneModel`; ``state_dict()`` of the result has
    the same keys and values (and dtypes). Errors name ``source``."""
    try:
        specs = find_layers(state_dict)
    except KCompressError as error:
        raise KCompressError(f"{source}: {error}") from None
    if not specs:
        names = ", ".join(list(state_dict)[:5])
        raise KCompressError(f"{source}: no LSTM, GRU, LSTMCell, GRUCell or Linear weights found among its "
                             f"{len(state_dict)} tensors ({names}{', ...' if len(state_dict) > 5 else ''})")
    if len(specs) == 1 and specs[0].name == "":
        model = specs[0].build()
    else:
        model = _classifier(specs, state_dict) or _standalone(specs, state_dict)
    _load_exact(model, state_dict)
    return model


def _classifier(specs: Sequence[LayerSpec], state_dict: Mapping[str, Tensor]) -> Optional[nn.Module]:
    """The :class:`SequenceClassifier` when the state dict is exactly an ``rnn`` LSTM/GRU and a ``head``."""
    if not any(spec.name == "rnn" and spec.type in ("LSTM", "GRU") for spec in specs):
        return None  # from_state_dict needs a well-formed rnn; it checks every other key and shape itself
    return SequenceClassifier.from_state_dict(state_dict)


def _standalone(specs: Sequence[LayerSpec], state_dict: Mapping[str, Tensor]) -> StandaloneModel:
    layer_keys = {key for key in state_dict if key.rpartition(".")[0] in {s.name for s in specs}}
    return StandaloneModel(specs, {k: v for k, v in state_dict.items() if k not in layer_keys})


def _check_module_finite(model: nn.Module, path: Path) -> None:
    """NaN/Inf in the parameters of a module's compressible layers -> error naming the tensor."""
    for name, module in model.named_modules():
        if type(module) in COMPRESSED_TYPES:
            try:
                _check_finite(name, dict(module.named_parameters(recurse=False)))
            except KCompressError as error:
                raise KCompressError(f"{path}: {error}") from None


def _load_exact(model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Load ``tensors`` (strict) after giving each parameter/buffer the dtype it has in ``tensors``, so the
    model holds exactly those values."""
    for name, value in model.state_dict(keep_vars=True).items():
        if name in tensors and value.dtype != tensors[name].dtype:
            value.data = value.data.to(tensors[name].dtype)
    model.load_state_dict(dict(tensors), strict=True)


def _module_at(root: nn.Module, path: str) -> Optional[nn.Module]:
    if not path:
        return root
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _container(root: nn.Module, path: str) -> nn.Module:
    """The module at ``path`` under ``root``, creating plain ``nn.Module`` containers where missing."""
    module = root
    for part in path.split(".") if path else []:
        child = module._modules.get(part)
        if child is None:
            child = nn.Module()
            _add(module, part, child, path)
        module = child
    return module


def _add(parent: nn.Module, name: str, child: nn.Module, path: str) -> None:
    try:
        parent.add_module(name, child)
    except (KeyError, TypeError) as error:
        raise KCompressError(f"cannot place a module at {path!r} ({_reason(error)})") from None


def _place(root: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``path`` (replacing what is there, making missing containers); returns the root,
    which is ``module`` itself when ``path`` is ``""``."""
    if not path:
        return module
    parent_path, _, name = path.rpartition(".")
    _add(_container(root, parent_path), name, module, path)
    return root


def _place_buffer(root: nn.Module, key: str, tensor: Tensor) -> None:
    parent_path, _, name = key.rpartition(".")
    try:
        _container(root, parent_path).register_buffer(name, tensor)
    except (KeyError, TypeError) as error:
        raise KCompressError(f"cannot hold tensor {key!r} ({_reason(error)})") from None


# ====================================================================== writing artifacts
def default_output_path(input_path: PathLike, format: str, rank: Any = None, ratio: Optional[float] = None) -> Path:
    """Beside the input, never the input: ``model.pt`` -> ``model.kcp-r8.safetensors`` (rank 8),
    ``model.tt-x100.safetensors`` (ratio 100), ``model.tt-r2_4.safetensors`` (per-bond ranks)."""
    source = Path(input_path)
    tag = str(format).lower()
    if rank is not None:
        tag += "-r" + ("_".join(str(r) for r in rank) if isinstance(rank, (list, tuple)) else str(rank))
    elif ratio is not None:
        tag += f"-x{float(ratio):g}"
    return source.with_name(f"{source.stem}.{tag}.safetensors")


def check_output_path(path: PathLike, *, overwrite: bool = False, source: Optional[PathLike] = None) -> Path:
    """``path`` if an artifact may be written there: not the ``source`` file, not a directory, new (or
    ``overwrite``), in an existing writable directory. Otherwise a :class:`KCompressError`."""
    target = Path(path)
    if source is not None and _same_file(target, Path(source)):
        raise KCompressError(f"{target} is the input file; choose another output path")
    if target.is_dir():
        raise KCompressError(f"{target} is a directory; give the artifact's file path")
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise KCompressError(f"{target} exists; pass --overwrite (overwrite=True) to replace it, "
                             "or choose another path")
    folder = target.parent
    if not folder.is_dir():
        raise KCompressError(f"cannot write {target}: directory {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise KCompressError(f"cannot write {target}: directory {folder} is not writable")
    return target


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return a.resolve() == b.resolve()


def file_sha256(path: PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _source_digest(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError as error:
        raise KCompressError(f"{path}: cannot read the source file ({error.strerror or error})") from None


def save_artifact(
    model: nn.Module,
    report: Report,
    path: PathLike,
    *,
    overwrite: bool = False,
    source_path: Optional[PathLike] = None,
    options: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write ``model`` (compressed) and its ``report`` as one safetensors artifact, atomically.

    Every tensor of ``model.state_dict()`` is stored (contiguous CPU copies); the header's ``"kcompress"``
    metadata holds the JSON description (see :func:`artifact_description`). With ``source_path``, the
    output may not be that file, and its path and sha256 are recorded (also in ``report.source`` when it
    has none yet). ``options`` defaults to ``report.options``. Nothing is left behind on failure.
    """
    target = check_output_path(path, overwrite=overwrite, source=source_path)
    if source_path is not None and not report.source.get("sha256"):
        report.source = {**report.source, "path": str(source_path), "sha256": _source_digest(Path(source_path))}
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in model.state_dict().items()}
    description = artifact_description(model, report, options)
    metadata = {METADATA_KEY: json.dumps(description, sort_keys=True, default=str)}
    atomic_write(target, safetensors.torch.save(tensors, metadata=metadata), overwrite)
    return target


def artifact_description(
    model: nn.Module, report: Report, options: Optional[Mapping[str, Any]] = None
) -> dict[str, Any]:
    """The JSON-able description stored in an artifact: versions, format, options, seed, source, how to
    rebuild the model (``architecture``), each compressed layer's configs (``layers``), report, status."""
    options = dict(report.options if options is None else options)
    return {
        "schema_version": ARTIFACT_SCHEMA_VERSION,
        "versions": _versions(),
        "format": report.format,
        "options": options,
        "seed": options.get("seed"),
        "source": dict(report.source),
        "architecture": _architecture(model),
        "layers": _compressed_layers(model),
        "report": json.loads(report.to_json(indent=None)),
        "status": report.status,
    }


def _versions() -> dict[str, str]:
    from . import __version__

    return {"kcompress": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__}


def _architecture(model: nn.Module) -> dict[str, Any]:
    """``sequence_classifier`` (constructor kwargs), ``standalone`` (layer specs, buffer names), or
    ``module`` (any other model: only its compressed layers are described)."""
    if type(model) is SequenceClassifier:
        return {"kind": "sequence_classifier", "kwargs": _classifier_kwargs(model)}
    if isinstance(model, StandaloneModel):
        return model.describe()
    return {"kind": "module", "class": f"{type(model).__module__}.{type(model).__qualname__}"}


def _classifier_kwargs(model: SequenceClassifier) -> dict[str, Any]:
    """The constructor kwargs of a (possibly compressed) :class:`SequenceClassifier`."""
    rnn = model.rnn
    return {
        "input_size": rnn.input_size,
        "hidden_size": rnn.hidden_size,
        "num_classes": model.head.out_features,
        "num_layers": rnn.num_layers,
        "cell": "lstm" if isinstance(rnn, (nn.LSTM, CompressedLSTM)) else "gru",
        "bidirectional": rnn.bidirectional,
        "dropout": rnn.dropout,
    }


def _compressed_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{path: {"layer": layer_config(), "matrices": {name: matrix config()}}}`` of every compressed layer."""
    return {
        name: {"layer": module.layer_config(),
               "matrices": {key: matrix.config() for key, matrix in module.matrices.items()}}
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, _COMPRESSED_LAYERS)
    }


def atomic_write(path: Path, data: bytes, overwrite: bool) -> None:
    """``data`` to ``path`` through a temporary file in the same directory (write, flush, fsync, rename,
    fsync of the directory); the temporary file is removed on any failure. Without ``overwrite`` the
    rename is a hard link, which fails instead of replacing a file that appeared meanwhile."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}{_TEMP_SUFFIX}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite and path.exists():
            os.chmod(temporary, path.stat().st_mode & 0o7777)
        _publish(temporary, path, overwrite)
    except OSError as error:
        raise KCompressError(f"cannot write {path} ({error.strerror or error})") from None
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def _publish(temporary: Path, path: Path, overwrite: bool) -> None:
    """Give the written temporary file its final name."""
    if overwrite:
        os.replace(temporary, path)
        return
    try:
        os.link(temporary, path)
    except FileExistsError:
        raise KCompressError(f"{path} exists; pass --overwrite (overwrite=True) to replace it") from None
    except OSError:  # no hard links on this filesystem
        if path.exists():
            raise KCompressError(f"{path} exists; pass --overwrite (overwrite=True) to replace it") from None
        os.replace(temporary, path)


def _fsync_directory(folder: Path) -> None:
    """Persist the rename (best effort: some platforms cannot open directories)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ====================================================================== loading artifacts
def load(path: PathLike, model: Optional[nn.Module] = None) -> nn.Module:
    """The model stored in a kcompress artifact.

    With ``model`` (the user's dense model, or one of the same architecture), the compressed layers are
    rebuilt (:func:`kcompress.nn.rebuild`) and put in place at the recorded paths of that instance, and all
    tensors are loaded (strict); the instance is modified and returned (the rebuilt layer itself when the
    model is one layer). Everything is checked before the model is touched. Without ``model``, the
    :class:`SequenceClassifier` or :class:`StandaloneModel` is rebuilt; an artifact of another model class
    comes back as a weights-only :class:`StandaloneModel` holding its compressed layers.
    """
    source = Path(path)
    data = _read(source)
    header = _safetensors_header(data)
    metadata = header.get("__metadata__") if header is not None else None
    if not isinstance(metadata, dict) or METADATA_KEY not in metadata:
        raise KCompressError(f"{source}: not a kcompress artifact (no {METADATA_KEY!r} safetensors metadata)")
    return _restore(source, _artifact_description(source, metadata), _safetensors_tensors(source, data), model)


def _restore(path: Path, description: Mapping[str, Any], tensors: Mapping[str, Tensor],
             model: Optional[nn.Module]) -> nn.Module:
    """Rebuild the compressed layers, check the planned state against ``tensors``, place and load."""
    try:
        layers = {name: rebuild(entry["layer"], entry["matrices"]) for name, entry in description["layers"].items()}
        if model is None:
            model = _build_architecture(description["architecture"], tensors, layers)
        else:
            _check_compatible(model, layers)
        _check_state(model, layers, tensors)
        for name, layer in layers.items():
            model = _place(model, name, _on_device_of(layer, _module_at(model, name)))
        _load_exact(model, tensors)
    except KCompressError as error:
        raise KCompressError(f"{path}: {error}") from None
    except Exception as error:  # noqa: BLE001 - the description is file content: damaged in any way
        raise KCompressError(f"{path}: damaged kcompress artifact ({_reason(error)})") from None
    return model


def _build_architecture(architecture: Mapping[str, Any], tensors: Mapping[str, Tensor],
                        layers: Mapping[str, nn.Module]) -> nn.Module:
    """The model described by an artifact's ``architecture`` (dense layers where compressed ones go)."""
    kind = architecture["kind"]
    if kind == "sequence_classifier":
        return SequenceClassifier(**architecture["kwargs"])
    if kind == "standalone":
        specs = [LayerSpec.from_dict(entry) for entry in architecture["layers"]]
        return StandaloneModel(specs, {name: tensors[name] for name in architecture["buffers"]})
    if kind == "module":
        return StandaloneModel([], {k: t for k, t in tensors.items() if not any(_under(k, p) for p in layers)})
    raise KCompressError(f"unknown architecture kind {kind!r}")


def _under(key: str, path: str) -> bool:
    """Whether state-dict ``key`` belongs to the module at ``path``."""
    return not path or key == path or key.startswith(path + ".")


def _check_compatible(model: nn.Module, layers: Mapping[str, nn.Module]) -> None:
    """Each compressed layer's path holds, in the user's model, the same torch layer (or its drop-in)."""
    for name, layer in layers.items():
        where = name or "(the model itself)"
        current = _module_at(model, name)
        if not isinstance(current, (layer.dense_type, type(layer))):
            found = "nothing" if current is None else f"a {type(current).__name__}"
            raise KCompressError(f"the model has {found} at {where}; the artifact has a compressed "
                                 f"{layer.dense_type.__name__} there")
        expected = layer.layer_config()["kwargs"]
        if isinstance(current, layer.dense_type) and type(layer).dense_config(current) != expected:
            raise KCompressError(f"the model's {layer.dense_type.__name__} at {where} has "
                                 f"{type(layer).dense_config(current)}, the artifact's {expected}")


def _check_state(model: nn.Module, layers: Mapping[str, nn.Module], tensors: Mapping[str, Tensor]) -> None:
    """The model with ``layers`` in place has exactly the keys and shapes of ``tensors``."""
    planned = {k: tuple(v.shape) for k, v in model.state_dict().items() if not any(_under(k, p) for p in layers)}
    for name, layer in layers.items():
        planned.update({_join(name, k): tuple(v.shape) for k, v in layer.state_dict().items()})
    problems = [f"missing {k}" for k in sorted(set(planned) - set(tensors))]
    problems += [f"unexpected {k}" for k in sorted(set(tensors) - set(planned))]
    problems += [f"{k} is {tuple(tensors[k].shape)} in the file, {planned[k]} in the model"
                 for k in planned if k in tensors and tuple(tensors[k].shape) != planned[k]]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise KCompressError(f"the artifact does not fit the model: {'; '.join(problems[:3])}{more}")


def _on_device_of(layer: nn.Module, current: Optional[nn.Module]) -> nn.Module:
    """``layer`` moved to the device of the module it replaces (CPU when there is none)."""
    reference = next(iter(current.parameters()), None) if current is not None else None
    return layer if reference is None else layer.to(reference.device)


__all__ = [
    "ARTIFACT_SCHEMA_VERSION",
    "KINDS",
    "METADATA_KEY",
    "WEIGHTS_ONLY",
    "Checkpoint",
    "LayerSpec",
    "StandaloneModel",
    "artifact_description",
    "check_output_path",
    "default_output_path",
    "atomic_write",
    "file_sha256",
    "find_layers",
    "load",
    "load_checkpoint",
    "model_from_checkpoint",
    "model_from_state_dict",
    "save_artifact",
]
