"""Sweeps: a grid of trials (format × rank), each one pipeline run (:mod:`kcompress.runs.trials`), the resumable
trials log and the Pareto front.

Trials run in a worker of a local process pool or of a Dask cluster (:mod:`kcompress.runs.executors`), which
receive the input files' bytes once each when their disks are not shared. Only this driver writes
``trials.jsonl``, as each record arrives. A trial's ``key`` hashes its settings, the evaluation and the
input's sha256: a rerun skips every trial whose key already has an ``"ok"`` record (failed trials are retried).
"""

from __future__ import annotations

import concurrent.futures as futures
import math
import pathlib
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

from kcompress.config import FinetuneOptions
from kcompress.errors import KCompressError, error_line
from kcompress.io import PathLike, file_sha256
from kcompress.io.usercode import split_reference
from kcompress.progress import ProgressCallback, ProgressEvent
from kcompress.runs.executors import CONNECT_TIMEOUT, TrialExecutor, open_executor
from kcompress.runs.trials import (
    BASELINE_FORMAT,
    TrialJob,
    TrialSpec,
    append_record,
    is_baseline,
    read_records,
    worker_trial,
)
from kcompress.tuning.evaluate import Budget, EvalSpec, metric_drop

TRIALS_FILE = "trials.jsonl"
#: seconds a sweep waits for a trial to finish before it reports that it is still running
HEARTBEAT_SECONDS = 10.0


# ---------------------------------------------------------------------- the grid
def expand_grid(
    formats: Sequence[str],
    ranks: Sequence[int],
    *,
    targets: str = "ih,hh",
    gates: str = "fused",
    order: Optional[int] = None,
    seed: int = 0,
    finetune: FinetuneOptions = FinetuneOptions(),
    fit_options: Optional[Mapping[str, Any]] = None,
) -> list[TrialSpec]:
    """The dense baseline, then every ``format × rank`` (formats in the given order, duplicates dropped);
    ``fit_options`` go to every trial's format (each trial checks them when it runs)."""
    if not formats or not ranks:
        raise KCompressError("a sweep needs at least one format and one rank")
    if any(is_baseline({"format": name}) for name in formats):
        raise KCompressError(f"{BASELINE_FORMAT!r} is not a sweep format: the dense baseline is always measured")
    common: dict[str, Any] = dict(targets=targets, gates=gates, order=order, seed=seed, finetune=finetune,
                  fit_options=tuple(sorted((fit_options or {}).items())))
    trials = [TrialSpec(BASELINE_FORMAT)]
    trials += [TrialSpec(fmt, rank, **common) for fmt in dict.fromkeys(formats) for rank in dict.fromkeys(ranks)]
    return trials


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
    passed = [r for r in rows if r.get("passed") and not is_baseline(r["trial"])]
    return max(passed, key=lambda r: (r["compression_ratio"], sign * r["metric"]), default=None)


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
    scheduler: Optional[str] = None,
    scheduler_timeout: float = CONNECT_TIMEOUT,
    shared_files: bool = False,
    trust_checkpoint: bool = False,
    model_class: Optional[str] = None,
    budget: Budget = Budget(),
    progress: Optional[ProgressCallback] = None,
) -> SweepResult:
    """Run the trials not yet in ``out_dir/trials.jsonl`` (the dense baseline first) and return every
    trial's record.

    Trials run in ``jobs`` spawned local processes, or on the Dask cluster whose scheduler is at
    ``scheduler`` (``tcp://host:port``; it must answer within ``scheduler_timeout`` seconds); there the
    input files are sent to each worker once unless ``shared_files`` declares that every worker reads them
    at the same paths. Nothing is written before the dense baseline has been measured (an unreachable
    scheduler, a refused checkpoint or broken data is an error that leaves no trace).
    """
    if jobs < 1:
        raise KCompressError(f"jobs must be at least 1, got {jobs}")
    if not any(is_baseline(asdict(trial)) for trial in trials):
        raise KCompressError("a sweep needs the dense baseline among its trials (expand_grid adds it)")
    eval_spec.check()
    if model_class is not None:
        split_reference(model_class, "model", kind="class")
    input_path = pathlib.Path(input_path)
    if not input_path.is_file():
        raise KCompressError(f"input file not found: {input_path}")
    out = pathlib.Path(out_dir)
    log = out / TRIALS_FILE
    sha = file_sha256(input_path)
    fingerprint = {**eval_spec.fingerprint(), **({"model": model_class} if model_class else {})}
    jobs_by_key = {}
    for trial in trials:
        key = trial.key(sha, fingerprint)
        jobs_by_key[key] = TrialJob(trial, key, str(input_path), sha, trust_checkpoint, eval_spec, str(log),
                                    model_class)
    done = {k for k, r in read_records(log).items() if r.get("status") == "ok" and k in jobs_by_key}
    pending = [job for key, job in jobs_by_key.items() if key not in done]
    _emit(progress, ProgressEvent("resume", "sweep", len(done), len(jobs_by_key),
                                  message=f"{len(done)} of {len(jobs_by_key)} trials already in {log}"))
    if pending:
        with open_executor(min(jobs, len(pending)), scheduler, scheduler_timeout) as executor:
            _emit(progress, ProgressEvent("step", "sweep", message=f"running {len(pending)} trials on "
                                                                   f"{executor.description}"))
            shipped = executor.distributed and not shared_files
            files = executor.ship({p: pathlib.Path(p).read_bytes() for p in pending[0].files()}) if shipped else None
            _run_jobs(executor, pending, files, log, len(done), len(jobs_by_key), progress)
    return _result(log, list(jobs_by_key), eval_spec, budget, len(done))


def _run_jobs(executor: TrialExecutor, pending: list[TrialJob], files: Optional[Mapping[str, Any]],
              log: pathlib.Path, done: int, total: int, progress: Optional[ProgressCallback]) -> None:
    """The dense baseline alone first (a broken checkpoint or evaluation fails once, not per trial, and
    before the log or its folder exists), then the rest; each record appended to the log as it arrives."""
    tally = WorkerTally(executor)
    baseline = [job for job in pending if job.trial.baseline]
    for batch in (baseline, [job for job in pending if not job.trial.baseline]):
        for record in _completed(executor, batch, files, tally, progress):
            if is_baseline(record["trial"]) and record["status"] != "ok":
                raise KCompressError(f"the dense baseline could not be measured: {record['error']}")
            log.parent.mkdir(parents=True, exist_ok=True)
            append_record(log, record)
            tally.add(record)
            done += 1
            _emit(progress, ProgressEvent("trial", trial_label(record["trial"]), done, total,
                                          record.get("metric"), _summary(record)))
    _emit(progress, ProgressEvent("workers", "sweep", message=tally.summary()))


def _completed(executor: TrialExecutor, batch: list[TrialJob], files: Optional[Mapping[str, Any]],
               tally: "WorkerTally", progress: Optional[ProgressCallback]) -> Iterator[dict[str, Any]]:
    """Records of ``batch`` as they finish; a trial whose worker was lost is recorded as failed with Dask's
    reason; a heartbeat event (per-worker counts) whenever none finishes for a while."""
    running = {executor.executor.submit(worker_trial, job, files): job for job in batch}
    start = time.monotonic()
    while running:
        finished, _ = futures.wait(running, timeout=HEARTBEAT_SECONDS, return_when=futures.FIRST_COMPLETED)
        if not finished:
            message = f"{len(running)} trial(s) left, {time.monotonic() - start:.0f} s; {tally.summary()}"
            _emit(progress, ProgressEvent("wait", "sweep", message=message))
        for future in finished:
            job = running.pop(future)
            try:
                yield future.result()
            except futures.process.BrokenProcessPool:
                raise KCompressError("a worker process died (out of memory?); rerun to resume the sweep") from None
            except Exception as error:  # noqa: BLE001 - e.g. Dask's KilledWorker: record it, run the others
                yield _lost(job, error)


def _lost(job: TrialJob, error: BaseException) -> dict[str, Any]:
    """The record of a trial that returned no record (its worker died more often than the scheduler allows)."""
    return {"key": job.key, "trial": asdict(job.trial), "input_sha256": job.input_sha256, "status": "error",
            "error": f"worker lost: {error_line(error)}", "seconds": None,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": None, "worker": None}


class WorkerTally:
    """Trials done / running / failed per worker, for progress lines."""

    def __init__(self, executor: TrialExecutor) -> None:
        self.executor = executor
        self.done: Counter = Counter()
        self.failed: Counter = Counter()

    def add(self, record: Mapping[str, Any]) -> None:
        worker = _worker_label(record)
        (self.done if record["status"] == "ok" else self.failed)[worker] += 1

    def summary(self) -> str:
        """``"tcp://10.0.0.2:4321: 3 done, 1 running, 0 failed; ..."`` (running: on a Dask cluster only)."""
        running = self.executor.running()
        workers = sorted(set(self.done) | set(self.failed) | set(running))
        busy = (lambda worker: f"{running[worker]} running, ") if self.executor.distributed else (lambda worker: "")
        return "; ".join(f"{worker}: {self.done[worker]} done, {busy(worker)}{self.failed[worker]} failed"
                         for worker in workers) or "no trial finished yet"


def _worker_label(record: Mapping[str, Any]) -> str:
    """The worker that ran a record's trial (``"lost"`` when its worker died)."""
    return record.get("worker") or "lost"


def _result(log: pathlib.Path, keys: list[str], spec: EvalSpec, budget: Budget, resumed: int) -> SweepResult:
    """Rows of the grid from the log, with drops against the dense baseline, and the front."""
    records = read_records(log)
    rows = [dict(records[key]) for key in keys if key in records]
    baseline = next(r for r in rows if is_baseline(r["trial"]))
    for row in rows:
        if row["status"] == "ok" and row["metric"] is not None and baseline["metric"] is not None:
            row["drop"] = metric_drop(baseline["metric"], row["metric"], higher_is_better=spec.higher_is_better,
                                      drop_type=budget.drop_type)
            row["passed"] = budget.passed(row["drop"])
    front = pareto_front([r for r in rows if r["status"] == "ok"], spec.higher_is_better)
    return SweepResult(rows, resumed, front, baseline, spec, budget, log)


def trial_label(trial: Mapping[str, Any]) -> str:
    """``"kcp r8"`` (``"dense"`` for the baseline) from a record's ``trial``."""
    return trial["format"] if is_baseline(trial) else f"{trial['format']} r{trial['rank']}"


def _summary(record: Mapping[str, Any]) -> str:
    where = f" on {record['host']} ({record['worker']})" if record.get("host") else ""
    if record["status"] != "ok":
        return f"failed{where}: {record['error']}"
    if record["metric"] is None:
        return f"metric not finite, ratio {record['compression_ratio']:.2f}× ({record['seconds']:.1f} s{where})"
    return (f"metric {record['metric']:.4g}, ratio {record['compression_ratio']:.2f}× "
            f"({record['seconds']:.1f} s{where})")


def _emit(progress: Optional[ProgressCallback], event: ProgressEvent) -> None:
    if progress is not None:
        progress(event)


__all__ = [
    "HEARTBEAT_SECONDS", "SweepResult", "TRIALS_FILE", "WorkerTally", "best_within_budget", "expand_grid",
    "pareto_front", "run_sweep", "trial_label",
]
