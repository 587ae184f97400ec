"""Trials and sweeps: compress with one setting, measure a metric, fine-tune; run a grid of such trials in
worker processes, record each in ``trials.jsonl`` (resumable), and pick the Pareto front.

The pieces a single compression run needs are here too (the CLI's ``compress`` command is one trial plus an
artifact): :class:`EvalSpec`/:func:`load_evaluation` (what a metric is and how to measure it),
:func:`metric_drop` (how much worse a metric got, for either direction), :class:`Budget`,
:func:`compress_checked` and :func:`finetune_compressed`.

A sweep's ``trials.jsonl`` holds one JSON object per line, each appended with a single ``os.write`` on an
``O_APPEND`` descriptor and fsynced, so several processes (or machines sharing the directory) may append
to it at once. A trial's ``key`` hashes its settings, the evaluation and the input's sha256: a rerun skips
every trial whose key already has an ``"ok"`` record (failed trials are retried).
"""

from __future__ import annotations

import concurrent.futures as futures
import hashlib
import importlib
import importlib.util
import json
import math
import multiprocessing
import os
import pathlib
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .convert import NOTHING_MATCHED, compress
from .data import BUILTIN_DATASETS, SequenceData, load_builtin, load_data_file
from .errors import KCompressError, KCompressWarning
from .evaluate import check_task, evaluate, higher_is_better
from .finetune import LOSSES, FinetuneResult, finetune
from .io import file_sha256, load_checkpoint, model_from_checkpoint
from .progress import ProgressCallback, ProgressEvent
from .report import Report

DROP_TYPES = ("absolute", "relative")
TRIALS_FILE = "trials.jsonl"
PLOT_FILE = "pareto.png"
#: seconds a sweep waits for a trial to finish before it reports that it is still running
HEARTBEAT_SECONDS = 10.0
_TASK_METRICS = {"classification": "accuracy", "regression": "mse"}

PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------- loading
def load_model(path: PathLike, trust_checkpoint: bool = False) -> tuple[nn.Module, dict[str, str]]:
    """The model in a checkpoint or artifact file (see :mod:`kcompress.io`) and its ``Report.source``
    record (path, kind, sha256)."""
    checkpoint = load_checkpoint(path, trust_checkpoint=trust_checkpoint)
    source = {"path": str(path), "kind": checkpoint.kind, "sha256": checkpoint.sha256}
    return model_from_checkpoint(checkpoint), source


# ---------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class EvalSpec:
    """What to measure. ``data``: a built-in dataset name (its test split is measured, its train split
    fine-tuned on) or a data file (measured and fine-tuned on) with ``task``; ``evaluator``:
    ``"module:function"`` or ``"path/to/file.py:function"``, called with the model and returning a float,
    which then is the metric (``data``, if also given, is only the fine-tuning data)."""

    data: Optional[str] = None
    task: str = "classification"
    evaluator: Optional[str] = None
    lower_is_better: bool = False

    @property
    def higher_is_better(self) -> bool:
        """The evaluator's direction as declared, else the task's (accuracy up, MSE down)."""
        return not self.lower_is_better if self.evaluator else higher_is_better(self.task)

    @property
    def metric_name(self) -> str:
        return self.evaluator or _TASK_METRICS[self.task]

    @property
    def is_builtin(self) -> bool:
        return self.data in BUILTIN_DATASETS

    def check(self) -> None:
        """A KCompressError for a spec that cannot work (cheap: nothing is loaded or imported)."""
        check_task(self.task)
        if self.data is None and self.evaluator is None:
            raise KCompressError("nothing to evaluate: give a dataset, a data file or an evaluator")
        if self.data is not None and not self.is_builtin and not pathlib.Path(self.data).is_file():
            raise KCompressError(
                f"{self.data!r} is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}) nor a data file"
            )
        if self.evaluator is not None:
            _split_evaluator(self.evaluator)

    def fingerprint(self) -> dict[str, Any]:
        """The spec plus the data file's sha256 (for trial keys)."""
        data = asdict(self)
        if self.data is not None and not self.is_builtin:
            data["data_sha256"] = file_sha256(self.data)
        return data


@dataclass(frozen=True)
class Evaluation:
    """A loaded :class:`EvalSpec`: ``measure(model) -> float`` and the fine-tuning data (None without data)."""

    spec: EvalSpec
    measure: Callable[[nn.Module], float]
    train_data: Optional[SequenceData]
    description: str

    @property
    def name(self) -> str:
        return self.spec.metric_name


def load_evaluation(spec: EvalSpec) -> Evaluation:
    """Load the data and/or import the evaluator of ``spec``."""
    spec.check()
    test, train, where = _load_data(spec.data) if spec.data is not None else (None, None, "")
    if spec.evaluator is not None:
        return Evaluation(spec, _import_evaluator(spec.evaluator), train, f"evaluator {spec.evaluator}")
    assert test is not None
    task = spec.task
    return Evaluation(spec, lambda model: evaluate(model, test, task), train, f"{spec.metric_name} on {where}")


def _load_data(data: str) -> tuple[SequenceData, SequenceData, str]:
    """``(evaluation data, fine-tuning data, description)``."""
    if data in BUILTIN_DATASETS:
        return load_builtin(data, "test"), load_builtin(data, "train"), f"{data} (test split)"
    loaded = load_data_file(data)
    return loaded, loaded, data


def _split_evaluator(text: str) -> tuple[str, str]:
    """``"module:function"`` -> ``(module, function)``; a KCompressError for anything else."""
    module, sep, function = text.rpartition(":")
    if not sep or not module or not function.isidentifier():
        raise KCompressError(f"evaluator must be 'module:function' or 'file.py:function', got {text!r}")
    return module, function


def _import_evaluator(text: str) -> Callable[[nn.Module], float]:
    """The evaluator function, wrapped so that it returns a float or raises a KCompressError."""
    module_name, function_name = _split_evaluator(text)
    module = _import_module(module_name)
    function = getattr(module, function_name, None)
    if not callable(function):
        raise KCompressError(f"evaluator {text}: {module_name} has no function {function_name!r}")

    def measure(model: nn.Module) -> float:
        try:
            value = function(model)
        except Exception as error:  # noqa: BLE001 - the user's code: report it in one line (traceback: --debug)
            raise KCompressError(f"evaluator {text} raised {type(error).__name__}: {error}") from error
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise KCompressError(f"evaluator {text} must return a number, got {type(value).__name__}")
        return float(value)

    return measure


def _import_module(name: str) -> Any:
    """A module by dotted name (the current directory importable) or by ``.py`` path."""
    if name.endswith(".py"):
        path = pathlib.Path(name)
        if not path.is_file():
            raise KCompressError(f"evaluator file not found: {name}")
        spec = importlib.util.spec_from_file_location(f"_kcompress_evaluator_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise KCompressError(f"cannot import evaluator module {name!r}: {error}") from error


# ---------------------------------------------------------------------- drop and budget
def metric_drop(baseline: float, value: float, *, higher_is_better: bool, drop_type: str = "absolute") -> float:
    """How much worse ``value`` is than ``baseline`` (positive: worse) for either direction of metric.

    ``relative`` divides by ``|baseline|`` (so negative metrics keep the sign meaning "worse"); against a
    zero baseline any change is infinitely large. NaN stays NaN (and fails every budget).
    """
    if drop_type not in DROP_TYPES:
        raise KCompressError(f"drop type must be one of {', '.join(DROP_TYPES)}, got {drop_type!r}")
    worse = baseline - value if higher_is_better else value - baseline
    if drop_type == "absolute" or math.isnan(worse):
        return worse
    if baseline == 0:
        return 0.0 if worse == 0 else math.copysign(math.inf, worse)
    return worse / abs(baseline)


@dataclass(frozen=True)
class Budget:
    """The largest acceptable drop (None: no budget) and how drops are measured."""

    max_drop: Optional[float] = None
    drop_type: str = "absolute"

    def passed(self, drop: float) -> Optional[bool]:
        """None without a budget; False for a NaN drop."""
        return None if self.max_drop is None else bool(drop <= self.max_drop)


def metrics_record(
    evaluation: Evaluation, baseline: float, compressed: float, finetuned: Optional[float], budget: Budget
) -> dict[str, Any]:
    """``Report.metrics``: the drop is measured from the baseline to the final (fine-tuned if any) metric."""
    final = compressed if finetuned is None else finetuned
    spec = evaluation.spec
    drop = metric_drop(baseline, final, higher_is_better=spec.higher_is_better, drop_type=budget.drop_type)
    return {
        "name": evaluation.name,
        "task": None if spec.evaluator else spec.task,
        "higher_is_better": spec.higher_is_better,
        "baseline": baseline,
        "compressed": compressed,
        "finetuned": finetuned,
        "drop": drop,
        "drop_type": budget.drop_type,
        "max_drop": budget.max_drop,
        "passed": budget.passed(drop),
    }


def apply_metrics(report: Report, metrics: dict[str, Any]) -> None:
    """Store ``metrics`` in the report; its status becomes ``"failed"`` when the budget was missed."""
    report.metrics = metrics
    report.status = "failed" if metrics["passed"] is False else "ok"


# ---------------------------------------------------------------------- one compression
@dataclass(frozen=True)
class FinetuneSettings:
    """Fine-tuning after compression: ``epochs`` (0: none), ``loss`` (task|distill|both) and ``lr``."""

    epochs: int = 0
    loss: str = "distill"
    lr: float = 1e-3


def compress_checked(
    model: nn.Module, progress: Optional[ProgressCallback] = None, **compress_kwargs: Any
) -> tuple[nn.Module, Report]:
    """:func:`kcompress.compress`, with a model that has nothing to compress made an error."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NOTHING_MATCHED, category=KCompressWarning)
        compressed, report = compress(model, progress=progress, **compress_kwargs)
    if not report.matrices:
        raise KCompressError(_nothing_message(report))
    return compressed, report


def _nothing_message(report: Report) -> str:
    reasons = "; ".join(f"{s.name or '(model)'} ({s.layer_type}): {s.reason}" for s in report.skipped)
    detail = f" ({reasons})" if reasons else " (it has no LSTM, GRU, LSTMCell, GRUCell or Linear layer)"
    return f"nothing to compress: {NOTHING_MATCHED}{detail}"


def finetune_compressed(
    compressed: nn.Module,
    dense: nn.Module,
    evaluation: Evaluation,
    settings: FinetuneSettings,
    seed: int = 0,
    progress: Optional[ProgressCallback] = None,
) -> FinetuneResult:
    """Fine-tune ``compressed`` in place on the evaluation's training data, distilling from ``dense``."""
    if evaluation.train_data is None:
        raise KCompressError("fine-tuning needs data: give a built-in dataset or a data file")
    if settings.loss not in LOSSES:
        raise KCompressError(f"unknown fine-tuning loss {settings.loss!r}; use one of: {', '.join(LOSSES)}")
    teacher = dense if settings.loss != "task" else None
    return finetune(compressed, evaluation.train_data, teacher=teacher, epochs=settings.epochs, lr=settings.lr,
                    loss=settings.loss, task=evaluation.spec.task, seed=seed, progress=progress)


# ---------------------------------------------------------------------- trials
@dataclass(frozen=True)
class TrialSpec:
    """One point of a sweep. ``format="dense"`` is the uncompressed baseline (no fit, no fine-tuning)."""

    format: str
    rank: Optional[int] = None
    targets: str = "ih"
    gates: str = "fused"
    order: Optional[int] = None
    seed: int = 0
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)

    def key(self, input_sha256: str, eval_fingerprint: Mapping[str, Any]) -> str:
        """Stable hash of the settings, the evaluation and the input file."""
        payload = {"trial": asdict(self), "eval": dict(eval_fingerprint), "input_sha256": input_sha256}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def expand_grid(
    formats: Sequence[str],
    ranks: Sequence[int],
    *,
    targets: str = "ih",
    gates: str = "fused",
    order: Optional[int] = None,
    seed: int = 0,
    finetune: FinetuneSettings = FinetuneSettings(),
) -> list[TrialSpec]:
    """The dense baseline, then every ``format × rank`` (formats in the given order, duplicates dropped)."""
    if not formats or not ranks:
        raise KCompressError("a sweep needs at least one format and one rank")
    if "dense" in formats:
        raise KCompressError("'dense' is not a sweep format: the dense baseline is always measured")
    common = dict(targets=targets, gates=gates, order=order, seed=seed, finetune=finetune)
    trials = [TrialSpec("dense")]
    trials += [TrialSpec(fmt, rank, **common) for fmt in dict.fromkeys(formats) for rank in dict.fromkeys(ranks)]
    return trials


@dataclass(frozen=True)
class TrialJob:
    """What a worker needs to run one trial (picklable)."""

    trial: TrialSpec
    key: str
    input_path: str
    input_sha256: str
    trust_checkpoint: bool
    eval_spec: EvalSpec
    log_path: str


def run_trial(job: TrialJob) -> dict[str, Any]:
    """Run one trial, append its record to the log and return it (errors become ``"error"`` records)."""
    start = time.perf_counter()
    record: dict[str, Any] = {"key": job.key, "trial": asdict(job.trial), "input_sha256": job.input_sha256}
    try:
        record.update(status="ok", **_measure_trial(job))
    except Exception as error:  # noqa: BLE001 - one failed trial must not end the sweep; it is retried on rerun
        record.update(status="error", error=_one_line(error))
    record.update(seconds=round(time.perf_counter() - start, 3), finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    append_record(job.log_path, record)
    return record


def _measure_trial(job: TrialJob) -> dict[str, Any]:
    """Compress, measure, fine-tune and measure again; the record's numbers."""
    dense = _cached_model(job.input_path, job.input_sha256, job.trust_checkpoint)
    evaluation = _cached_evaluation(job.eval_spec)
    trial = job.trial
    if trial.format == "dense":
        metric = evaluation.measure(dense)
        return {"metric": metric, "compressed": metric, "finetuned": None, "compression_ratio": 1.0,
                "model_compression_ratio": 1.0, "predicted_speedup": 1.0, "max_relative_error": 0.0, "warnings": []}
    with warnings.catch_warnings(record=True):  # the report keeps them
        # no speed check: timings taken beside other busy workers would mislead
        compressed, report = compress_checked(dense, format=trial.format, rank=trial.rank, targets=trial.targets,
                                              gates=trial.gates, order=trial.order, seed=trial.seed,
                                              check_speed=False)
    compressed_metric = evaluation.measure(compressed)
    finetuned = None
    if trial.finetune.epochs > 0:
        finetune_compressed(compressed, dense, evaluation, trial.finetune, seed=trial.seed)
        finetuned = evaluation.measure(compressed)
    errors = [m.relative_error for m in report.matrices if m.relative_error is not None]
    return {
        "metric": compressed_metric if finetuned is None else finetuned,
        "compressed": compressed_metric,
        "finetuned": finetuned,
        "compression_ratio": report.compression_ratio,
        "model_compression_ratio": report.model_compression_ratio,
        "predicted_speedup": report.predicted_speedup,
        "max_relative_error": max(errors, default=None),
        "rank_used": [m.rank_used for m in report.matrices if m.format != "dense"],
        "warnings": list(report.warnings),
    }


@lru_cache(maxsize=2)
def _cached_model(path: str, sha256: str, trust_checkpoint: bool) -> nn.Module:
    """The dense model, loaded once per worker (``sha256`` in the key: a changed file is reloaded)."""
    return load_model(path, trust_checkpoint)[0]


@lru_cache(maxsize=2)
def _cached_evaluation(spec: EvalSpec) -> Evaluation:
    return load_evaluation(spec)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, KCompressError) else f"{type(error).__name__}: {text}"


def init_worker() -> None:
    """Worker start-up: one torch thread each (the pool provides the parallelism)."""
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or inter-op work already ran: the intra-op pin is what matters
        pass


# ---------------------------------------------------------------------- the trials log
def append_record(path: PathLike, record: Mapping[str, Any]) -> None:
    """Append one JSON line with a single ``os.write`` on an ``O_APPEND`` descriptor, then fsync."""
    line = (json.dumps(_finite(record), sort_keys=True, allow_nan=False, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, line)
        if written != len(line):
            raise OSError(f"short write to {path}: {written} of {len(line)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinity inside it replaced by None (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


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


# ---------------------------------------------------------------------- Pareto front
def pareto_front(rows: Iterable[Mapping[str, Any]], higher_is_better: bool) -> list[Mapping[str, Any]]:
    """The rows no other row beats on both compression ratio and metric, by increasing ratio.

    Rows without a finite metric are left out; of rows with equal ratio and metric the first is kept.
    """
    sign = 1.0 if higher_is_better else -1.0
    usable = [r for r in rows if r.get("metric") is not None and math.isfinite(r["metric"])]
    ordered = sorted(usable, key=lambda r: (-r["compression_ratio"], -sign * r["metric"]))
    front, best = [], -math.inf
    for row in ordered:
        if sign * row["metric"] > best:
            front.append(row)
            best = sign * row["metric"]
    return front[::-1]


def best_within_budget(rows: Iterable[Mapping[str, Any]], higher_is_better: bool) -> Optional[Mapping[str, Any]]:
    """The most compressed row that passed its budget (ties: the better metric), or None."""
    sign = 1.0 if higher_is_better else -1.0
    passed = [r for r in rows if r.get("passed") and r["trial"]["format"] != "dense"]
    return max(passed, key=lambda r: (r["compression_ratio"], sign * r["metric"]), default=None)


def plot_pareto(rows: Sequence[Mapping[str, Any]], front: Sequence[Mapping[str, Any]], path: PathLike,
                metric_name: str) -> bool:
    """Metric against compression ratio (log x), one series per format, the front and the dense baseline;
    False (nothing written) when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        return False
    figure = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for fmt in dict.fromkeys(r["trial"]["format"] for r in rows if r["trial"]["format"] != "dense"):
        points = sorted((r["compression_ratio"], r["metric"]) for r in rows if r["trial"]["format"] == fmt)
        axes.plot(*zip(*points), marker="o", label=fmt)
    for row in rows:
        if row["trial"]["format"] == "dense":
            axes.axhline(row["metric"], color="grey", linestyle="--", label="dense")
    if front:  # the best metric reachable at each compression ratio or more
        axes.plot([r["compression_ratio"] for r in front], [r["metric"] for r in front], color="black",
                  linewidth=1, drawstyle="steps-pre", label="Pareto front")
    axes.set_xscale("log")
    ratios = [r["compression_ratio"] for r in rows]
    label = FuncFormatter(lambda value, _: f"{value:g}×")
    axes.xaxis.set_major_formatter(label)
    axes.xaxis.set_minor_formatter(label if max(ratios) < 10 * min(ratios) else NullFormatter())
    axes.set_xlabel("compression ratio (compressed layers)")
    axes.set_ylabel(metric_name)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(os.fspath(path))
    return True


# ---------------------------------------------------------------------- the sweep
@dataclass
class SweepResult:
    """Every trial of the grid (its latest record, with ``drop`` and ``passed`` added), in grid order."""

    rows: list[dict[str, Any]]
    resumed: int
    front: list[Mapping[str, Any]]
    baseline: dict[str, Any]
    eval_spec: EvalSpec
    budget: Budget
    trials_path: pathlib.Path

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] != "ok"]

    @property
    def best(self) -> Optional[Mapping[str, Any]]:
        return best_within_budget(self.rows, self.eval_spec.higher_is_better)


def run_sweep(
    input_path: PathLike,
    trials: Sequence[TrialSpec],
    eval_spec: EvalSpec,
    out_dir: PathLike,
    *,
    jobs: int = 1,
    trust_checkpoint: bool = False,
    budget: Budget = Budget(),
    progress: Optional[ProgressCallback] = None,
) -> SweepResult:
    """Run the trials not yet in ``out_dir/trials.jsonl`` (the dense baseline first) in ``jobs`` spawned
    worker processes, each pinned to one torch thread; returns every trial's record."""
    if jobs < 1:
        raise KCompressError(f"jobs must be at least 1, got {jobs}")
    eval_spec.check()
    input_path = pathlib.Path(input_path)
    if not input_path.is_file():
        raise KCompressError(f"input file not found: {input_path}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = out / TRIALS_FILE
    sha, fingerprint = file_sha256(input_path), eval_spec.fingerprint()
    jobs_by_key = {}
    for trial in trials:
        key = trial.key(sha, fingerprint)
        jobs_by_key[key] = TrialJob(trial, key, str(input_path), sha, trust_checkpoint, eval_spec, str(log))
    done = {k for k, r in read_records(log).items() if r.get("status") == "ok" and k in jobs_by_key}
    pending = [job for key, job in jobs_by_key.items() if key not in done]
    _emit(progress, ProgressEvent("resume", "sweep", len(done), len(jobs_by_key),
                                  message=f"{len(done)} of {len(jobs_by_key)} trials already in {log}"))
    if pending:
        _run_jobs(pending, jobs, len(done), len(jobs_by_key), progress)
    return _result(log, list(jobs_by_key), eval_spec, budget, len(done))


def _run_jobs(pending: list[TrialJob], jobs: int, done: int, total: int, progress: Optional[ProgressCallback]) -> None:
    """The pool: the dense baseline alone first (a broken evaluation fails once, not per trial), then the rest."""
    context = multiprocessing.get_context("spawn")
    pool = futures.ProcessPoolExecutor(max_workers=min(jobs, len(pending)), mp_context=context,
                                       initializer=init_worker)
    try:
        baseline = [job for job in pending if job.trial.format == "dense"]
        for batch in (baseline, [job for job in pending if job.trial.format != "dense"]):
            for record in _completed(pool, batch, progress):
                done += 1
                _emit(progress, ProgressEvent("trial", trial_label(record["trial"]), done, total,
                                              record.get("metric"), _summary(record)))
                if record["trial"]["format"] == "dense" and record["status"] != "ok":
                    raise KCompressError(f"the dense baseline could not be measured: {record['error']}")
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)  # Ctrl-C or a failed baseline: start nothing more
        raise
    pool.shutdown()


def _completed(pool: futures.Executor, batch: list[TrialJob], progress: Optional[ProgressCallback]) -> Iterable[dict]:
    """Records of ``batch`` as they finish; a heartbeat event whenever none finishes for a while."""
    running = {pool.submit(run_trial, job) for job in batch}
    start = time.monotonic()
    while running:
        finished, running = futures.wait(running, timeout=HEARTBEAT_SECONDS, return_when=futures.FIRST_COMPLETED)
        if not finished:
            message = f"{len(running)} trial(s) running, {time.monotonic() - start:.0f} s"
            _emit(progress, ProgressEvent("wait", "sweep", message=message))
        for future in finished:
            try:
                yield future.result()
            except futures.process.BrokenProcessPool:
                raise KCompressError("a worker process died (out of memory?); rerun to resume the sweep") from None


def _result(log: pathlib.Path, keys: list[str], spec: EvalSpec, budget: Budget, resumed: int) -> SweepResult:
    """Rows of the grid from the log, with drops against the dense baseline, and the front."""
    records = read_records(log)
    rows = [dict(records[key]) for key in keys if key in records]
    baseline = next(r for r in rows if r["trial"]["format"] == "dense")
    for row in rows:
        if row["status"] == "ok" and row["metric"] is not None and baseline["metric"] is not None:
            row["drop"] = metric_drop(baseline["metric"], row["metric"], higher_is_better=spec.higher_is_better,
                                      drop_type=budget.drop_type)
            row["passed"] = budget.passed(row["drop"])
    front = pareto_front([r for r in rows if r["status"] == "ok"], spec.higher_is_better)
    return SweepResult(rows, resumed, front, baseline, spec, budget, log)


def trial_label(trial: Mapping[str, Any]) -> str:
    """``"kcp r8"`` (``"dense"`` for the baseline) from a record's ``trial``."""
    return "dense" if trial["format"] == "dense" else f"{trial['format']} r{trial['rank']}"


def _summary(record: Mapping[str, Any]) -> str:
    if record["status"] != "ok":
        return f"failed: {record['error']}"
    if record["metric"] is None:
        return f"metric not finite, ratio {record['compression_ratio']:.2f}× ({record['seconds']:.1f} s)"
    return f"metric {record['metric']:.4g}, ratio {record['compression_ratio']:.2f}× ({record['seconds']:.1f} s)"


def _emit(progress: Optional[ProgressCallback], event: ProgressEvent) -> None:
    if progress is not None:
        progress(event)


__all__ = [
    "Budget", "DROP_TYPES", "EvalSpec", "Evaluation", "FinetuneSettings", "SweepResult", "TrialSpec",
    "apply_metrics", "compress_checked", "expand_grid", "file_sha256", "finetune_compressed", "load_evaluation",
    "load_model", "metric_drop", "metrics_record", "pareto_front", "plot_pareto", "read_records", "run_sweep",
    "trial_label",
]
