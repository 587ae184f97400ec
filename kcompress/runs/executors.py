"""Where a sweep's trials run: a local process pool, or a Dask cluster through ``Client.get_executor()``.

Both are :class:`concurrent.futures.Executor`; :func:`open_executor` picks one. The local pool spawns
``jobs`` processes on this machine. With a scheduler address (``--scheduler`` or Dask's own
``DASK_SCHEDULER_ADDRESS``) the trials go to that cluster's workers: ``distributed`` is imported only then,
so local sweeps need no Dask. Dask does the scheduling, the transport and the rescheduling of a trial
whose worker died (up to the scheduler's ``distributed.scheduler.allowed-failures`` times, then
``KilledWorker``). Input files are sent to every worker once (``Client.scatter(..., broadcast=True)``)
unless the caller declares their paths shared.
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import multiprocessing.connection
import os
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from kcompress.errors import KCompressError

#: Dask's own environment variable for the scheduler's address
SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"
#: the exit code of a local worker whose driver is gone
EXIT_ORPHANED = 1


def scheduler_address(option: Optional[str]) -> Optional[str]:
    """The scheduler to use: the option, else ``$DASK_SCHEDULER_ADDRESS``, else None (local pool)."""
    return option or os.environ.get(SCHEDULER_ENV) or None


@dataclass
class TrialExecutor:
    """An executor and, for a Dask cluster, its client. Use as a context manager (closes both)."""

    executor: futures.Executor
    description: str
    client: Any = None

    @property
    def distributed(self) -> bool:
        return self.client is not None

    def ship(self, files: Mapping[str, bytes]) -> dict[str, Any]:
        """Files for a cluster's workers, each scattered to every worker once: ``{path: Dask future}`` (a
        trial given these receives the bytes). Local pool workers read the paths themselves."""
        assert self.client is not None, "only a Dask cluster's workers need the files' bytes"
        return {path: self.client.scatter(data, broadcast=True, hash=False) for path, data in files.items()}

    def running(self) -> Counter:
        """Tasks now running per worker address (empty for the local pool, which does not say)."""
        if self.client is None:
            return Counter()
        try:
            return Counter({worker: len(keys) for worker, keys in self.client.processing().items() if keys})
        except Exception:  # noqa: BLE001 - progress only: a scheduler hiccup must not end the sweep
            return Counter()

    def close(self, cancel: bool = False) -> None:
        """Stop the executor and close the client. With ``cancel`` (the sweep was interrupted or failed) what
        has not finished is cancelled and local workers are terminated at once, mid-trial: nothing waits
        for a long fit that nobody will read."""
        if self.client is None:
            if cancel:
                _terminate_workers(self.executor)
            self.executor.shutdown(wait=not cancel, cancel_futures=cancel)
            return
        self.executor.shutdown(wait=not cancel)
        self.client.close()

    def __enter__(self) -> "TrialExecutor":
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        self.close(cancel=kind is not None)


def open_executor(jobs: int, scheduler: Optional[str] = None) -> TrialExecutor:
    """A local pool of ``jobs`` spawned processes, or an executor on the Dask scheduler at ``scheduler``.

    A missing ``distributed`` package or an unreachable scheduler is a one-line KCompressError (the connect
    timeout is Dask's ``distributed.comm.timeouts.connect``).
    """
    if scheduler is None:
        if jobs < 1:
            raise KCompressError(f"jobs must be at least 1, got {jobs}")
        pool = futures.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                           initializer=exit_with_parent)
        return TrialExecutor(pool, f"{jobs} local process{'es' if jobs > 1 else ''}")
    try:
        from distributed import Client
    except ImportError:
        raise KCompressError(f"--scheduler {scheduler} needs Dask's distributed package: "
                             "pip install 'kcompress[distributed]'") from None
    try:
        client = Client(scheduler, set_as_default=False)
    except Exception as error:  # noqa: BLE001 - OSError, TimeoutError, ValueError for a bad address: one line
        reason = " ".join(str(error).split()) or type(error).__name__
        raise KCompressError(f"cannot connect to the Dask scheduler at {scheduler}: {reason}") from None
    workers = client.scheduler_info().get("workers", {})
    threads = sum(worker.get("nthreads", 0) for worker in workers.values())
    return TrialExecutor(client.get_executor(pure=False), f"Dask scheduler {scheduler} ({len(workers)} workers, "
                         f"{threads} threads)", client)


def exit_with_parent() -> None:
    """In a local pool's worker: end this process as soon as the driver that spawned it is gone (killed
    with SIGKILL, say), instead of finishing a trial that nobody will read. A daemon thread waits on the
    parent's sentinel, which becomes ready when the parent exits."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="kcompress-parent-watch", daemon=True).start()


def _terminate_workers(pool: futures.Executor) -> None:
    """SIGTERM to every worker process of a local pool (``terminate_workers`` from Python 3.14 on)."""
    terminate = getattr(pool, "terminate_workers", None)
    if terminate is not None:
        terminate()
        return
    for process in list(getattr(pool, "_processes", None) or {}.values()):
        process.terminate()


def worker_name() -> str:
    """This process as a worker: its Dask worker address, else ``pid N``."""
    if "distributed" in sys.modules:  # a Dask worker has imported it; a local pool worker never does
        from distributed import get_worker

        try:
            return str(get_worker().address)
        except ValueError:  # not inside a Dask task
            pass
    return f"pid {os.getpid()}"


__all__ = ["SCHEDULER_ENV", "TrialExecutor", "open_executor", "scheduler_address", "worker_name"]
