"""Checkpoints in, compressed artifacts out: safe by default, atomic, never touching the user's file.

One module per job; import the names below from ``kcompress.io``:

- :mod:`.checkpoint`: detect a file's kind from its bytes and load it safely (:func:`load_checkpoint`);
- :mod:`.recognize`: LSTM/GRU/LSTMCell/GRUCell/Linear layers in a state dict (:func:`find_layers`);
- :mod:`.standalone`: the model to compress from a state dict (:class:`StandaloneModel`; :func:`model_from_checkpoint` is in :mod:`.checkpoint`);
- :mod:`.artifact`: write an artifact (:func:`save_artifact`) and rebuild a model from one (:func:`load`);
- :mod:`.files`: output paths, atomic writes, sha256.

Imports go one way: files <- recognize <- standalone <- artifact <- checkpoint.
"""

from kcompress.io.artifact import ARTIFACT_SCHEMA_VERSION, METADATA_KEY, artifact_description, load, save_artifact
from kcompress.io.checkpoint import KINDS, Checkpoint, load_checkpoint, model_from_checkpoint
from kcompress.io.files import (
                    PathLike,
                    atomic_write,
                    check_input_file,
                    check_output_path,
                    check_output_paths,
                    default_output_path,
                    file_sha256,
)
from kcompress.io.recognize import LayerSpec, find_layers
from kcompress.io.standalone import WEIGHTS_ONLY, StandaloneModel, model_from_state_dict

__all__ = [
    "ARTIFACT_SCHEMA_VERSION",
    "KINDS",
    "METADATA_KEY",
    "WEIGHTS_ONLY",
    "Checkpoint",
    "LayerSpec",
    "PathLike",
    "StandaloneModel",
    "artifact_description",
    "atomic_write",
    "check_input_file",
    "check_output_path",
    "check_output_paths",
    "default_output_path",
    "file_sha256",
    "find_layers",
    "load",
    "load_checkpoint",
    "model_from_checkpoint",
    "model_from_state_dict",
    "save_artifact",
]
