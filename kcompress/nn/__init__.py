"""Drop-in compressed layers: ``CompressedLinear``, ``CompressedEmbedding``, ``CompressedConv1d``,
``CompressedConv2d``, ``CompressedLSTM``, ``CompressedGRU``, ``CompressedLSTMCell`` and ``CompressedGRUCell`` (same attributes and forward signatures as
torch's).

Each holds its matrices in ``self.matrices`` (keyed by torch's parameter names) and torch's biases as
parameters. ``Cls.from_dense(dense, build)`` builds one from the dense module; :func:`rebuild` recreates
an unfitted one from ``layer.layer_config()`` and the matrices' ``config()`` (to load a state dict into),
with the execution paths the config records (:mod:`kcompress.nn.execution`).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from kcompress import formats
from kcompress.errors import KCompressError
from kcompress.nn.base import CompressedLayer, MatrixBuilder
from kcompress.nn.cells import CompressedGRUCell, CompressedLSTMCell
from kcompress.nn.conv import CompressedConv1d, CompressedConv2d
from kcompress.nn.embedding import CompressedEmbedding
from kcompress.nn.execution import FACTORIZED, MATERIALIZED, MODES
from kcompress.nn.linear import CompressedLinear
from kcompress.nn.paths import auto_paths, choose_paths, closed_form, executed, execution_of, set_execution, trained
from kcompress.nn.recurrent import CompressedGRU, CompressedLSTM

#: torch layer type -> its compressed drop-in
COMPRESSED_TYPES: dict[type[nn.Module], type[CompressedLayer]] = {
    nn.LSTM: CompressedLSTM,
    nn.GRU: CompressedGRU,
    nn.LSTMCell: CompressedLSTMCell,
    nn.GRUCell: CompressedGRUCell,
    nn.Linear: CompressedLinear,
    nn.Embedding: CompressedEmbedding,
    nn.Conv1d: CompressedConv1d,
    nn.Conv2d: CompressedConv2d,
}


def rebuild(layer_config: Mapping[str, Any], matrix_configs: Mapping[str, Mapping[str, Any]]) -> CompressedLayer:
    """An unfitted compressed layer of the shapes described by ``layer.layer_config()`` and
    ``{name: matrix.config()}``, ready for ``load_state_dict``.

    The torch module is created on the ``meta`` device (its dense weights are never allocated) and passed
    to ``from_dense`` with a builder that builds each matrix from its config (``formats.build``, on the
    CPU, uninitialised). The biases copied from the meta module are then replaced by uninitialised CPU
    tensors of the same shapes, so every parameter is real and ``load_state_dict`` fills them all.
    """
    by_name = {cls.dense_type.__name__: cls for cls in COMPRESSED_TYPES.values()}
    kind = layer_config.get("type")
    if kind not in by_name:
        raise KCompressError(f"unknown layer type {kind!r}; expected one of {', '.join(sorted(by_name))}")
    cls = by_name[kind]
    dense = cls.dense_type(**layer_config["kwargs"], device="meta")
    expected = cls.parameter_names(cls.dense_config(dense))[0]
    if set(matrix_configs) != set(expected):
        raise KCompressError(f"{kind} needs matrix configs for {sorted(expected)}, got {sorted(matrix_configs)}")
    layer = cls.from_dense(dense, lambda name, weight, gates: formats.build(dict(matrix_configs[name])))
    for name, bias in list(layer.named_parameters(recurse=False)):
        setattr(layer, name, nn.Parameter(torch.empty(bias.shape, dtype=bias.dtype, device="cpu")))
    paths = layer_config.get("execution", {})
    if not isinstance(paths, Mapping):
        raise KCompressError(f"{kind}: execution must map matrix names to paths, got {paths!r}")
    # "auto" entries: the closed form for now (never slower than dense); load() measures once weights are in
    layer.set_execution({name: closed_form(layer.matrices[name]) or MATERIALIZED if mode == "auto" else mode
                         for name, mode in paths.items()}, requested=paths)
    return layer


__all__ = [
    "COMPRESSED_TYPES",
    "CompressedConv1d",
    "CompressedConv2d",
    "CompressedEmbedding",
    "CompressedGRU",
    "CompressedGRUCell",
    "CompressedLSTM",
    "CompressedLSTMCell",
    "CompressedLayer",
    "CompressedLinear",
    "FACTORIZED",
    "MATERIALIZED",
    "MODES",
    "MatrixBuilder",
    "auto_paths",
    "executed",
    "trained",
    "execution_of",
    "choose_paths",
    "rebuild",
    "set_execution",
]
