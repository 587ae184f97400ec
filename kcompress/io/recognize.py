"""Recognising layers (:func:`find_layers`) in a state dict from names and shapes.

Torch's RNN names (``weight_ih_l{k}[_reverse]``, ``weight_hh_l{k}...``, ``bias_...``) give LSTM
(``4H`` rows) or GRU (``3H`` rows); ``weight_ih``/``weight_hh`` without ``_l{k}`` give LSTMCell or
GRUCell; ``X.weight`` (2-D, floating) with an optional ``X.bias`` gives Linear. A layer is recognised only
when its module holds exactly the tensors torch's layer has (so a projected LSTM, or a module with extra
tensors, stays plain tensors), and never for a path segment starting with ``emb``/``_emb`` (embeddings),
1-D, 3-D+ or empty weights (norms, convs) or vanilla RNNs (``H`` rows: not compressible). Once a layer is
recognised, every missing tensor, wrong shape (``weight_hh`` not ``(G·H, H)``, an empty matrix, a bias of
the wrong length, layer ``l``'s input not matching layer ``l-1``'s output) and NaN/Inf value is a one-line
:class:`KCompressError` naming the tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from kcompress.errors import KCompressError
from kcompress.nn import COMPRESSED_TYPES

_TORCH_LAYERS: dict[str, type[nn.Module]] = {cls.__name__: cls for cls in COMPRESSED_TYPES}
_RNN_KEY = re.compile(r"^(weight|bias)_(ih|hh)_l(\d+)(_reverse)?$")
_CELL_KEYS = {"weight_ih", "weight_hh", "bias_ih", "bias_hh"}
_EMBEDDING = re.compile(r"(^|[._])emb", re.IGNORECASE)
#: what to do with integer (e.g. quantized) weights
INTEGER_HINT = "a quantized checkpoint must be dequantized first, e.g. {k: v.float() for k, v in state_dict.items()}"


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
            _check_floating(prefix, leaves)
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
    if 0 in tensor.shape:
        raise KCompressError(f"{_join(prefix, name)} has shape {tuple(tensor.shape)}; a recurrent layer's matrix "
                             "cannot be empty (input and hidden sizes must be at least 1)")
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
    """A Linear: a 2-D floating non-empty ``weight`` and optionally a 1-D ``bias``, outside embedding-named
    paths."""
    weight, bias = leaves.get("weight"), leaves.get("bias")
    if (weight is None or not set(leaves) <= {"weight", "bias"} or weight.dim() != 2 or 0 in weight.shape
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


def _check_floating(prefix: str, tensors: Mapping[str, Tensor]) -> None:
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise KCompressError(f"{_join(prefix, name)} holds {str(tensor.dtype).replace('torch.', '')} values; "
                                 f"kcompress compresses floating-point weights ({INTEGER_HINT})")


def _check_finite(prefix: str, tensors: Mapping[str, Tensor]) -> None:
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise KCompressError(f"{_join(prefix, name)} contains NaN or Inf values")
