"""The file pipeline: checkpoint file in, compressed artifact out (``load -> compress -> save``).

Every check that needs no fitting runs first: the output path (not the input, new unless ``overwrite``,
in an existing writable directory), the checkpoint itself, and the compression arguments (``compress``
validates and plans every matrix before its first fit). Nothing is written unless everything succeeded,
and the write is atomic (:func:`kcompress.io.save_artifact`).
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any, Optional

from torch import nn

from .convert import NOTHING_MATCHED, compress
from .errors import KCompressError, KCompressWarning
from .io import PathLike, check_output_path, default_output_path, load_checkpoint, model_from_checkpoint, save_artifact
from .report import Report

_DEFAULT_FORMAT = inspect.signature(compress).parameters["format"].default


def compress_file(
    input_path: PathLike,
    output_path: Optional[PathLike] = None,
    *,
    overwrite: bool = False,
    trust_checkpoint: bool = False,
    **compress_kwargs: Any,
) -> tuple[Path, Report]:
    """Compress the checkpoint at ``input_path`` and write the artifact; returns ``(artifact path, report)``.

    ``output_path`` defaults to :func:`kcompress.io.default_output_path` beside the input.
    ``compress_kwargs`` go to :func:`kcompress.compress` (``format``, ``rank`` or ``ratio``, ``include``,
    ...). A model with nothing to compress is an error. ``report.source`` records the input's path, kind
    and sha256. Every problem is a one-line :class:`KCompressError`, and then nothing is written.
    """
    source = Path(input_path)
    if output_path is None:
        fmt, rank, ratio = (compress_kwargs.get(k) for k in ("format", "rank", "ratio"))
        output_path = default_output_path(source, fmt or _DEFAULT_FORMAT, rank, ratio)
    target = Path(output_path)
    check_output_path(target, overwrite=overwrite, source=source)
    checkpoint = load_checkpoint(source, trust_checkpoint=trust_checkpoint)
    compressed, report = _compress(model_from_checkpoint(checkpoint), source, compress_kwargs)
    report.source = {"path": str(source), "kind": checkpoint.kind, "sha256": checkpoint.sha256}
    save_artifact(compressed, report, target, overwrite=overwrite, source_path=source)
    return target, report


def _compress(model: nn.Module, source: Path, compress_kwargs: dict[str, Any]) -> tuple[nn.Module, Report]:
    """:func:`kcompress.compress`, with nothing compressed made an error naming the file and the reasons."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NOTHING_MATCHED, category=KCompressWarning)
        compressed, report = compress(model, **compress_kwargs)
    if not report.matrices:
        reasons = "; ".join(f"{s.name or '(model)'}: {s.reason}" for s in report.skipped)
        raise KCompressError(f"{source}: nothing to compress ({reasons or NOTHING_MATCHED})")
    return compressed, report


__all__ = ["compress_file"]
