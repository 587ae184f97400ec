"""Artifacts: :func:`save_artifact` writes one safetensors file with every tensor of ``model.state_dict()``
and a JSON description under the header's ``"kcompress"`` metadata key (versions, options, source checksum,
how to rebuild the model, each compressed layer's ``layer_config()`` and matrix configs, the report,
status); :func:`load` rebuilds a runnable model from one, checking the description against the tensors."""

from __future__ import annotations

import base64
import json
import re
import zlib
from pathlib import Path
from typing import Any, Mapping, Optional

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from kcompress.errors import KCompressError
from kcompress.io.files import (
    PathLike,
    _read,
    _reason,
    _safetensors_tensors,
    _source_digest,
    atomic_write,
    check_output_path,
    safetensors_header_of,
)
from kcompress.io.models import SequenceClassifier
from kcompress.io.quantized import pack, unpack
from kcompress.io.recognize import LayerSpec, _join
from kcompress.io.standalone import StandaloneModel, _load_exact, _module_at, _place
from kcompress.io.validate import check_architecture, check_layers, check_values, fit_to_model
from kcompress.nn import COMPRESSED_TYPES, CompressedLSTM, choose_paths, rebuild
from kcompress.nn.quantize import quantization_rules
from kcompress.report.record import Report

#: key of the JSON description in an artifact's safetensors metadata
METADATA_KEY = "kcompress"
#: the version this kcompress writes for a quantized artifact (2: integer tensors, ``"quantization"``); an
#: artifact without quantization is written as version 1, which earlier versions read
ARTIFACT_SCHEMA_VERSION = 2
_COMPRESSED_LAYERS = tuple(COMPRESSED_TYPES.values())
#: report keys that time this run (fit seconds, measured speed and its spread): kept in the Report, left out
#: of the artifact
_TIMING_KEY = re.compile(r"(^|_)seconds$|^measured_speedup$|^speed_spread$")
#: report warnings that state a measured time or speed
_TIMING_WARNING = re.compile(r"\bmeasured\b.*\b(slower|faster)\b")
#: a quantized artifact stores its description compressed (zlib, then base64) after this prefix: on a small
#: model the JSON would otherwise outweigh the tensors
_PACKED = "zlib:"
#: the largest description a packed one may inflate to
_MAX_DESCRIPTION = 64 * 2**20


def _artifact_description(path: Path, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON description stored under :data:`METADATA_KEY`, checked for its schema version."""
    try:
        description = json.loads(_unpacked(metadata[METADATA_KEY]))
    except (TypeError, ValueError, RecursionError, zlib.error) as error:
        raise KCompressError(f"{path}: damaged kcompress metadata ({_reason(error)})") from None
    if not isinstance(description, dict):
        raise KCompressError(f"{path}: damaged kcompress metadata (not a JSON object)")
    version = description.get("schema_version")
    if not isinstance(version, int) or version > ARTIFACT_SCHEMA_VERSION:
        raise KCompressError(f"{path}: artifact schema version {version!r} is not supported by this kcompress "
                             f"(it reads version {ARTIFACT_SCHEMA_VERSION}); upgrade kcompress")
    return description


def _packed(text: str) -> str:
    return _PACKED + base64.b64encode(zlib.compress(text.encode("utf8"), 9)).decode("ascii")


def _unpacked(text: Any) -> Any:
    """The JSON of a description, inflated when it is packed (at most :data:`_MAX_DESCRIPTION` bytes)."""
    if not isinstance(text, str) or not text.startswith(_PACKED):
        return text
    inflater = zlib.decompressobj()
    raw = inflater.decompress(base64.b64decode(text[len(_PACKED):], validate=True), _MAX_DESCRIPTION)
    if inflater.unconsumed_tail:
        raise ValueError(f"the description inflates beyond {_MAX_DESCRIPTION} bytes")
    return raw.decode("utf8")


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

    Every tensor of ``model.state_dict()`` is stored (contiguous CPU copies), those that ``report.quantize``
    plans (:func:`kcompress.nn.quantize.quantization_rules`) as integers and scales (:mod:`.quantized`); the
    header's ``"kcompress"`` metadata holds the JSON description (see :func:`artifact_description`). With
    ``source_path``, the output may not be that file, and its path and sha256 are recorded (also in
    ``report.source`` when it has none yet). ``options`` defaults to ``report.options``. Nothing is left behind on failure.
    """
    target = check_output_path(path, overwrite=overwrite, source=source_path)
    if source_path is not None and not report.source.get("sha256"):
        report.source = {**report.source, "path": str(source_path), "sha256": _source_digest(Path(source_path))}
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in model.state_dict().items()}
    tensors, quantized = pack(tensors, quantization_rules(model, report.quantize))
    description = artifact_description(model, report, options, quantized)
    text = json.dumps(description, sort_keys=True, default=str)
    metadata = {METADATA_KEY: _packed(text) if quantized else text}
    atomic_write(target, safetensors.torch.save(tensors, metadata=metadata), overwrite)
    return target


def artifact_description(
    model: nn.Module, report: Report, options: Optional[Mapping[str, Any]] = None,
    quantized: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """The JSON-able description stored in an artifact: versions, format, options, seed, source, how to
    rebuild the model (``architecture``), each compressed layer's configs (``layers``), report, status, and
    with ``quantized`` (:func:`.quantized.pack`'s description) how its integer tensors are stored."""
    options = dict(report.options if options is None else options)
    extra = {"quantization": dict(quantized)} if quantized else {}
    return {
        "schema_version": ARTIFACT_SCHEMA_VERSION if quantized else 1,
        **extra,
        "versions": _versions(),
        "format": report.format,
        "options": options,
        "seed": options.get("seed"),
        "source": dict(report.source),
        "architecture": _architecture(model),
        "layers": _compressed_layers(model),
        "report": _without_timings(json.loads(report.to_json(indent=None))),
        "status": report.status,
    }


def _without_timings(data: Any) -> Any:
    """``data`` without :data:`_TIMING_KEY` entries, :data:`_TIMING_WARNING` warnings (at any depth) and the
    matrices' measured execution paths, so the same input, options and seed give a byte-identical artifact."""
    if isinstance(data, list):
        return [_without_timings(value) for value in data]
    if not isinstance(data, dict):
        return data
    kept = {key: _without_timings(value) for key, value in data.items() if not _TIMING_KEY.search(key)}
    if isinstance(kept.get("warnings"), list):
        kept["warnings"] = [text for text in kept["warnings"] if not _TIMING_WARNING.search(str(text))]
    if isinstance(kept.get("matrices"), list):  # the path "auto" measured: the layer config keeps the request
        kept["matrices"] = [{k: v for k, v in row.items() if k != "execution"} if isinstance(row, dict) else row
                            for row in kept["matrices"]]
    return kept


def _versions() -> dict[str, str]:
    from kcompress._version import __version__

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
               "matrices": {key: matrix.config() for key, matrix in module.matrices.items()}}  # type: ignore[operator]  # nn.Module attrs typed Tensor | Module
        for name, module in model.named_modules(remove_duplicate=False)
        if isinstance(module, _COMPRESSED_LAYERS)
    }


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
    header = safetensors_header_of(source)  # only the header is read before the file is known to be one
    metadata = header.get("__metadata__") if header is not None else None
    if not isinstance(metadata, dict) or METADATA_KEY not in metadata:
        raise KCompressError(f"{source}: not a kcompress artifact (no {METADATA_KEY!r} safetensors metadata)")
    data = _read(source)
    return _restore(source, _artifact_description(source, metadata), _safetensors_tensors(source, data), model)


def _restore(path: Path, description: Mapping[str, Any], tensors: Mapping[str, Tensor],
             model: Optional[nn.Module]) -> nn.Module:
    """Dequantize the integer tensors (:func:`.quantized.unpack`), check everything (:func:`_checked_layers`),
    then rebuild the compressed layers, place them and load."""
    try:
        if "quantization" in description:
            tensors = unpack(tensors, description["quantization"])
        entries = _checked_layers(description, tensors, model)
        layers = _rebuild(entries)
        if model is None:
            model = _build_architecture(description["architecture"], tensors, layers)
        for name, layer in layers.items():
            model = _place(model, name, _on_device_of(layer, _module_at(model, name)))
        _load_exact(model, tensors)
        choose_paths(model)
    except KCompressError as error:
        raise KCompressError(f"{path}: {_shortened(str(error))}") from None
    except Exception as error:  # noqa: BLE001 - the description is file content: damaged in any way
        raise KCompressError(f"{path}: damaged kcompress artifact ({_reason(error)})") from None
    return model


def _checked_layers(description: Mapping[str, Any], tensors: Mapping[str, Tensor],
                    model: Optional[nn.Module]) -> dict[str, dict[str, Any]]:
    """The compressed layers' entries after every check that allocates nothing real (:mod:`.validate`): the
    description against the tensors, then the model planned on the ``meta`` device against their shapes."""
    entries = check_layers(description["layers"], tensors)
    architecture = description["architecture"]
    if model is not None:
        entries = {name: fit_to_model(model, name, entry) for name, entry in entries.items()}
    else:
        check_architecture(architecture, tensors)
    with torch.device("meta"):
        planned = _rebuild(entries)
        target = model if model is not None else _build_architecture(architecture, tensors, planned)
    if model is None and architecture["kind"] != "module":  # the dense layers it puts at those paths
        for name, entry in entries.items():
            fit_to_model(target, name, entry, whose="the described architecture's")
    _check_state(target, planned, tensors)
    check_values(planned, tensors)
    return entries


def _rebuild(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, nn.Module]:
    return {name: rebuild(entry["layer"], entry["matrices"]) for name, entry in entries.items()}


def _shortened(message: str, limit: int = 400) -> str:
    return message if len(message) <= limit else message[:limit] + " ..."


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
