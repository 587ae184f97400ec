"""One sweep trial, self-contained, and the trials log.

A :class:`TrialJob` carries what a worker needs (the settings, the input file's path and sha256, the
evaluation spec, the seed, the user's model class) and :func:`execute_trial` returns its record: the
pipeline's stages (:func:`kcompress.runs.pipeline.compress_stages`) on the dense model the worker loaded once.
Where the worker cannot read the job's files, their bytes come with it and are written to a local cache
once. Only the driver writes the log (:func:`append_record`): one JSON object per line, each appended with
a single ``os.write`` on an ``O_APPEND`` descriptor and fsynced; :func:`read_records` reads it back.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import socket
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from typing import Any, Mapping, Optional

from kcompress._threads import threads
from kcompress.config import CompressConfig, FinetuneOptions, RecoveryOptions
from kcompress.errors import error_line
from kcompress.formats import FORMATS, get_format
from kcompress.io import PathLike, atomic_write
from kcompress.report.record import json_finite
from kcompress.runs.executors import worker_name
from kcompress.runs.pipeline import CompressionRun, compress_stages, load_input, measure
from kcompress.tuning.evaluate import EvalSpec, Evaluation, load_evaluation

#: the trial format of the uncompressed baseline: the registered format that keeps a matrix as it is
BASELINE_FORMAT = next(name for name, cls in FORMATS.items() if not cls.compresses)



@dataclass(frozen=True)
class TrialSpec:
    """One point of a sweep. :data:`BASELINE_FORMAT` is the uncompressed baseline (no fit, no fine-tuning);
    ``fit_options`` are the format's options as sorted ``(key, value)`` pairs (hashable)."""

    format: str
    rank: Optional[int] = None
    targets: str = "ih,hh"
    gates: str = "fused"
    order: Optional[int] = None
    seed: int = 0
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)
    fit_options: tuple[tuple[str, Any], ...] = ()

    @property
    def baseline(self) -> bool:
        return is_baseline({"format": self.format})

    def config(self) -> CompressConfig:
        """The trial's compression settings (checked; no speed check: timings taken beside other busy
        workers would mislead)."""
        return CompressConfig.from_keywords(self.format, rank=self.rank, targets=self.targets, gates=self.gates,
                                            order=self.order, seed=self.seed,
                                            fit_options=dict(self.fit_options) or None, check_speed=False
                                            ).replace(recovery=RecoveryOptions(finetune=self.finetune))

    def key(self, input_sha256: str, eval_fingerprint: Mapping[str, Any]) -> str:
        """Stable hash of the settings, the evaluation and the input file (without ``fit_options`` when there
        are none, so the keys of logs written before trials had options stay valid)."""
        trial = {name: value for name, value in asdict(self).items() if name != "fit_options" or value}
        payload = {"trial": trial, "eval": dict(eval_fingerprint), "input_sha256": input_sha256}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def is_baseline(trial: Mapping[str, Any]) -> bool:
    """Whether a trial (its fields, as the log holds them) is the uncompressed baseline."""
    return not get_format(trial["format"]).compresses



@dataclass(frozen=True)
class TrialJob:
    """What a worker needs to run one trial (picklable). ``log_path`` is where the driver records it;
    ``model_class`` (``"file.py:Class"``) builds the user's model from a state dict."""

    trial: TrialSpec
    key: str
    input_path: str
    input_sha256: str
    trust_checkpoint: bool
    eval_spec: EvalSpec
    log_path: str
    model_class: Optional[str] = None

    def files(self) -> list[str]:
        """The local files the trial reads: the input, a data file, an evaluator's or model's ``.py`` file."""
        spec = self.eval_spec
        paths = [self.input_path, None if spec.data is None or spec.is_builtin else spec.data,
                 _py_file(spec.evaluator), _py_file(self.model_class)]
        return list(dict.fromkeys(path for path in paths if path is not None))


def _py_file(reference: Optional[str]) -> Optional[str]:
    module = None if reference is None else reference.rpartition(":")[0]
    return module if module and module.endswith(".py") else None


def run_trial(job: TrialJob) -> dict[str, Any]:
    """Run one trial in this process, append its record to ``job.log_path`` and return it."""
    record = execute_trial(job)
    append_record(job.log_path, record)
    return record


def worker_trial(job: TrialJob, files: Optional[Mapping[str, bytes]] = None) -> dict[str, Any]:
    """A trial in a worker process: one torch and BLAS thread (the pool or cluster provides the parallelism),
    the worker's own settings restored afterwards."""
    with threads(1):
        return execute_trial(job, files)


def execute_trial(job: TrialJob, files: Optional[Mapping[str, bytes]] = None) -> dict[str, Any]:
    """Run one trial and return its record (errors become ``"error"`` records); ``files`` maps the job's
    paths to their bytes where the worker cannot read them (they are written to a local cache once)."""
    start = time.perf_counter()
    record: dict[str, Any] = {"key": job.key, "trial": asdict(job.trial), "input_sha256": job.input_sha256}
    try:
        record.update(status="ok", **_measure_trial(_localized(job, files) if files else job))
    except Exception as error:  # noqa: BLE001 - one failed trial must not end the sweep; it is retried on rerun
        record.update(status="error", error=error_line(error))
    record.update(seconds=round(time.perf_counter() - start, 3), finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
                  host=socket.gethostname(), worker=worker_name())
    return record


def _measure_trial(job: TrialJob) -> dict[str, Any]:
    """The pipeline's stages on the worker's cached model: fit, measure, fine-tune, measure."""
    loaded = _cached_run(job.input_path, job.input_sha256, job.trust_checkpoint, job.model_class)
    run = CompressionRun(dense=loaded.dense, source=loaded.source, evaluation=_cached_evaluation(job.eval_spec))
    trial = job.trial
    if trial.baseline:
        metric = measure(run, run.dense, "dense model")
        return {"metric": metric, "compressed": metric, "finetuned": None, "compression_ratio": 1.0,
                "model_compression_ratio": 1.0, "predicted_speedup": 1.0, "max_relative_error": 0.0, "warnings": []}
    config = trial.config()
    with warnings.catch_warnings(record=True):  # the report keeps them
        compress_stages(run, config)
    report = run.report
    assert report is not None
    errors = [m.relative_error for m in report.matrices if m.relative_error is not None]
    return {
        "metric": run.metric,
        "compressed": run.compressed_metric,
        "finetuned": run.finetuned_metric,
        "compression_ratio": report.compression_ratio,
        "model_compression_ratio": report.model_compression_ratio,
        "predicted_speedup": report.predicted_speedup,
        "max_relative_error": max(errors, default=None),
        "rank_used": [m.rank_used for m in report.matrices if m.compressed],
        "warnings": list(report.warnings),
        "config": config.to_dict(),
    }


@lru_cache(maxsize=2)
def _cached_run(path: str, sha256: str, trust_checkpoint: bool, model_class: Optional[str]) -> CompressionRun:
    """The loaded dense model, once per worker (``sha256`` in the key: a changed file is reloaded)."""
    return load_input(path, trust_checkpoint=trust_checkpoint, model_class=model_class)


@lru_cache(maxsize=2)
def _cached_evaluation(spec: EvalSpec) -> Evaluation:
    return load_evaluation(spec)


def _localized(job: TrialJob, files: Mapping[str, bytes]) -> TrialJob:
    """``job`` with each path in ``files`` replaced by a local copy of those bytes."""
    local = {path: _local_copy(path, data) for path, data in files.items()}

    def moved(reference: Optional[str]) -> Optional[str]:
        module, _, name = (reference or "").rpartition(":")
        return f"{local[module]}:{name}" if module in local else reference

    spec = job.eval_spec
    spec = replace(spec, data=local.get(spec.data or "", spec.data), evaluator=moved(spec.evaluator))
    return replace(job, input_path=local.get(job.input_path, job.input_path), eval_spec=spec,
                   model_class=moved(job.model_class))


def _local_copy(path: str, data: bytes) -> str:
    """``data`` in this machine's temporary folder under its sha256 and ``path``'s file name (written once)."""
    folder = pathlib.Path(tempfile.gettempdir()) / "kcompress-files" / hashlib.sha256(data).hexdigest()[:20]
    target = folder / pathlib.Path(path).name
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(target, data, overwrite=True)  # trials running side by side may write it at once
    return str(target)


# ---------------------------------------------------------------------- the trials log
def append_record(path: PathLike, record: Mapping[str, Any]) -> None:
    """Append one JSON line with a single ``os.write`` on an ``O_APPEND`` descriptor, then fsync."""
    line = (json.dumps(json_finite(record), sort_keys=True, allow_nan=False, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"short write to {path}: {written} of {len(line)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: PathLike) -> dict[str, dict[str, Any]]:
    """``{key: latest record}`` from a trials log; unreadable lines (a torn last line) are ignored."""
    records: dict[str, dict[str, Any]] = {}
    if not os.path.exists(path):
        return records
    with open(path, encoding="utf8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "key" in record:
                records[record["key"]] = record
    return records


__all__ = ["BASELINE_FORMAT", "is_baseline", "TrialJob", "TrialSpec", "append_record", "execute_trial", "read_records",
           "run_trial", "worker_trial"]
