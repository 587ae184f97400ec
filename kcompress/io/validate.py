"""An artifact's description checked against the tensors its file holds, before anything real is allocated.

A crafted file may declare any sizes. Every check here reads only the description and the tensors' shapes;
modules are built on the ``meta`` device (no storage), and the declared counts are bounded by the number of
tensors first, so a refusal costs milliseconds whatever is declared:

- :func:`check_layers`: each compressed layer's type and constructor kwargs (non-negative integers,
  ``num_layers`` no larger than the file's tensor count), its matrix configs (exactly the matrices the
  layer has, each describing a matrix of the layer's shape) and its biases (present, of the layer's shape);
- :func:`check_architecture`: the same bounds for the model the artifact rebuilds without a user's model;
- :func:`fit_to_model`: a layer's kwargs against the user's model: only what the weights determine (sizes,
  layers, directions, bias) must agree; ``batch_first`` and ``dropout`` are taken from the user's layer;
- :func:`check_values`: each compressed layer's tensors are floating point and of one dtype, and every
  floating point tensor of the file is finite.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from kcompress import formats
from kcompress.errors import KCompressError
from kcompress.io.recognize import _check_finite, _join
from kcompress.io.standalone import _few, _module_at
from kcompress.nn import COMPRESSED_TYPES

#: layer kwargs that no weight determines: a state dict cannot know them, the user's model says them
INTERFACE_KEYS = ("batch_first", "dropout")
_COMPRESSED_BY_NAME = {cls.dense_type.__name__: cls for cls in COMPRESSED_TYPES.values()}


def check_layers(layers: Any, tensors: Mapping[str, Tensor]) -> dict[str, dict[str, Any]]:
    """The description's ``layers`` (``{path: {"layer": layer_config, "matrices": {name: config}}}``),
    each checked against ``tensors`` (see the module docstring)."""
    _expect(layers, dict, "layers")
    if len(layers) > len(tensors):
        raise KCompressError(f"the metadata describes {len(layers)} compressed layers, the file holds "
                             f"{len(tensors)} tensors")
    for name, entry in layers.items():
        _check_layer(name, entry, tensors)
    return layers


def _check_layer(name: str, entry: Any, tensors: Mapping[str, Tensor]) -> None:
    where = f"layers[{name!r}]"
    _expect(entry, dict, where)
    config, matrices = entry.get("layer"), entry.get("matrices")
    _expect(config, dict, f"{where}.layer")
    _expect(matrices, dict, f"{where}.matrices")
    cls = _COMPRESSED_BY_NAME.get(config.get("type"))
    if cls is None:
        raise KCompressError(f"{where}.layer.type is {config.get('type')!r}; expected one of "
                             f"{', '.join(sorted(_COMPRESSED_BY_NAME))}")
    _expect(config.get("kwargs"), dict, f"{where}.layer.kwargs")
    check_sizes(f"{where}.layer.kwargs", config["kwargs"], len(tensors))
    dense = cls.dense_type(**config["kwargs"], device="meta")
    matrix_names, bias_names = cls.parameter_names(cls.dense_config(dense))
    if set(matrices) != set(matrix_names):
        odd = sorted(set(matrices) ^ set(matrix_names))
        raise KCompressError(f"{where}: its {config['type']} has {len(matrix_names)} matrices, the metadata "
                             f"describes {len(matrices)} (differing: {_few(odd)})")
    for matrix in matrix_names:
        with torch.device("meta"):
            shape = _matrix_shape(formats.build(dict(matrices[matrix])))
        expected = tuple(cls.dense_matrix(dense, matrix).shape)
        if shape != expected:
            raise KCompressError(f"{where}.matrices.{matrix} describes a {shape[0]}x{shape[1]} matrix; the "
                                 f"layer's kwargs make it {expected[0]}x{expected[1]}")
    for bias in bias_names:
        declared, key = getattr(dense, bias, None), _join(name, bias)
        if declared is None:
            continue
        if key not in tensors:
            raise KCompressError(f"{key} is missing from the file")
        if tuple(tensors[key].shape) != tuple(declared.shape):
            raise KCompressError(f"{key} is {tuple(tensors[key].shape)} in the file; the layer's kwargs make "
                                 f"it {tuple(declared.shape)}")


def check_sizes(where: str, kwargs: Mapping[str, Any], tensor_count: int) -> None:
    """Integer kwargs are non-negative, and ``num_layers`` (each layer holds tensors) at most ``tensor_count``."""
    for key, value in kwargs.items():
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        if value < 0:
            raise KCompressError(f"{where}.{key} is {value}; expected a non-negative integer")
        if key == "num_layers" and value > tensor_count:
            raise KCompressError(f"{where}.num_layers is {value}, but the file holds only {tensor_count} tensors")


def check_architecture(architecture: Any, tensors: Mapping[str, Tensor]) -> None:
    """The sizes the ``architecture`` declares, bounded as in :func:`check_sizes`; buffers named exist."""
    _expect(architecture, dict, "architecture")
    if architecture.get("kind") == "sequence_classifier":
        _expect(architecture.get("kwargs"), dict, "architecture.kwargs")
        check_sizes("architecture.kwargs", architecture["kwargs"], len(tensors))
    if architecture.get("kind") == "standalone":
        for index, spec in enumerate(architecture.get("layers", [])):
            _expect(spec, dict, f"architecture.layers[{index}]")
            _expect(spec.get("kwargs"), dict, f"architecture.layers[{index}].kwargs")
            check_sizes(f"architecture.layers[{index}].kwargs", spec["kwargs"], len(tensors))
        missing = [name for name in architecture.get("buffers", []) if name not in tensors]
        if missing:
            raise KCompressError(f"architecture.buffers names tensors the file does not hold: {_few(missing)}")


def fit_to_model(model: nn.Module, name: str, entry: Mapping[str, Any], whose: str = "the model's") -> dict[str, Any]:
    """``entry`` for the user's layer at ``name``: its type must be the artifact's torch layer (or the
    drop-in), and the kwargs the weights determine must agree; :data:`INTERFACE_KEYS` come from it.
    ``whose`` names ``model`` in messages."""
    cls = _COMPRESSED_BY_NAME[entry["layer"]["type"]]
    where = name or "(the model itself)"
    current = _module_at(model, name)
    if not isinstance(current, (cls.dense_type, cls)):
        found = "nothing" if current is None else f"a {type(current).__name__}"
        owner = whose.removesuffix("'s")
        raise KCompressError(f"{owner} has {found} at {where}; the artifact has a compressed "
                             f"{cls.dense_type.__name__} there")
    stored = entry["layer"]["kwargs"]
    given = cls.dense_config(current) if isinstance(current, cls.dense_type) else current.layer_config()["kwargs"]  # type: ignore[operator]  # nn.Module attrs typed Tensor | Module
    differ = [key for key in stored if key not in INTERFACE_KEYS and given.get(key) != stored[key]]
    if differ:
        mine = ", ".join(f"{key}={given.get(key)!r}" for key in differ)
        theirs = ", ".join(f"{key}={stored[key]!r}" for key in differ)
        raise KCompressError(f"{whose} {cls.dense_type.__name__} at {where} has {mine}, the artifact's {theirs}")
    kwargs = {**stored, **{key: given[key] for key in INTERFACE_KEYS if key in stored and key in given}}
    return {**entry, "layer": {**entry["layer"], "kwargs": kwargs}}


def check_values(layers: Mapping[str, nn.Module], tensors: Mapping[str, Tensor]) -> None:
    """Each compressed layer's tensors in the file: floating point, all of one dtype; and every floating
    point tensor of the file (the untouched ones too, e.g. a classifier head's): finite."""
    for name, layer in layers.items():
        values = {key: tensors[_join(name, key)] for key in layer.state_dict()}
        dtypes = {key: value.dtype for key, value in values.items()}
        first = next(iter(dtypes), None)
        for key, dtype in dtypes.items():
            assert first is not None  # dtypes is not empty here
            if not dtype.is_floating_point:
                raise KCompressError(f"{_join(name, key)} is {dtype}; a compressed layer holds floating point")
            if dtype != dtypes[first]:
                raise KCompressError(f"{_join(name, key)} is {dtype}, {_join(name, first)} is {dtypes[first]}; "
                                     "one layer's tensors share one dtype")
    _check_finite("", tensors)


def _matrix_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a matrix module (a format's factorization, or a stack of them)."""
    tensorization = getattr(module, "tensorization", None)
    if tensorization is not None:
        return tensorization.out_features, tensorization.in_features
    return module.out_features, module.in_features  # type: ignore[return-value]  # nn.Module attrs typed Tensor | Module


def _expect(value: Any, kind: type, where: str) -> None:
    if not isinstance(value, kind):
        expected = "JSON object" if kind is dict else kind.__name__
        raise KCompressError(f"{where} is {type(value).__name__}; expected a {expected}")
