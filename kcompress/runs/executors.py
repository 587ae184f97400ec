"""Where a sweep's trials run: a local process pool, or a Dask cluster through ``Client.get_executor()``.

Both are :class:`concurrent.futures.Executor`; :func:`open_executor` picks one. The local pool spawns
``jobs`` processes on this machine. With a scheduler address (``--scheduler`` or Dask's own
``DASK_SCHEDULER_ADDRESS``) the trials go to that cluster's workers: ``distributed`` is imported only then,
so local sweeps need no Dask. The address is checked first, and the scheduler must answer within a timeout
(:data:`CONNECT_TIMEOUT` seconds unless told otherwise). Local workers exit when their driver is gone, and
an interrupted sweep terminates them. Dask does the scheduling, the transport and the rescheduling of a trial
whose worker died (up to the scheduler's ``distributed.scheduler.allowed-failures`` times, then
``KilledWorker``). Input files are sent to every worker once (``Client.scatter(..., broadcast=True)``)
unless the caller declares their paths shared.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as futures
import multiprocessing
import multiprocessing.connection
import os
import re
import socket
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from kcompress.errors import KCompressError

#: Dask's own environment variable for the scheduler's address
SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"
#: the exit code of a local worker whose driver is gone
EXIT_ORPHANED = 1
#: seconds to wait for a Dask scheduler to answer (``--scheduler-timeout``)
CONNECT_TIMEOUT = 5.0
#: the schemes of Dask's transports
_SCHEMES = ("tcp", "tls", "ws", "wss", "ucx")
_ADDRESS = re.compile(r"^(?:(?P<scheme>[a-z][a-z0-9+.-]*)://)?(?P<host>\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+):(?P<port>\d{1,5})$")


def scheduler_address(option: Optional[str]) -> Optional[str]:
    """The scheduler to use, checked by :func:`check_address`: the option, else ``$DASK_SCHEDULER_ADDRESS``,
    else None (local pool). A bad address is a one-line KCompressError naming where it came from."""
    if option:
        return check_address(option, f"--scheduler {option}")
    value = os.environ.get(SCHEDULER_ENV)
    return check_address(value, f"${SCHEDULER_ENV}={value}") if value else None


def check_address(address: str, where: Optional[str] = None) -> str:
    """``address`` as ``scheme://host:port`` (a bare ``host:port`` is ``tcp://``, as for Dask), or a one-line
    KCompressError naming ``where`` it came from (default: the address itself)."""
    if address.startswith("inproc://"):  # a cluster in this very process (LocalCluster(processes=False))
        return address
    found = _ADDRESS.match(address.strip())
    scheme = (found.group("scheme") or "tcp") if found else ""
    if found is None or scheme not in _SCHEMES or not 0 < int(found.group("port")) < 2**16:
        raise KCompressError(f"{where or address}: not a Dask scheduler address; expected tcp://HOST:PORT "
                             f"(or {', '.join(f'{s}://' for s in _SCHEMES[1:])} with a port)")
    return f"{scheme}://{found.group('host')}:{found.group('port')}"


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


def open_executor(jobs: int, scheduler: Optional[str] = None, timeout: float = CONNECT_TIMEOUT) -> TrialExecutor:
    """A local pool of ``jobs`` spawned processes, or an executor on the Dask scheduler at ``scheduler``.

    A bad address, a missing ``distributed`` package, a ``tls://`` address without certificates and a
    scheduler that does not answer as one within ``timeout`` seconds (a closed port, a server that accepts
    and says nothing, a web server) are one-line KCompressErrors naming the address.
    """
    if scheduler is None:
        if jobs < 1:
            raise KCompressError(f"jobs must be at least 1, got {jobs}")
        pool = futures.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                           initializer=exit_with_parent)
        return TrialExecutor(pool, f"{jobs} local process{'es' if jobs > 1 else ''}")
    scheduler = check_address(scheduler)
    try:
        from distributed import Client
    except ImportError:
        raise KCompressError(f"--scheduler {scheduler} needs Dask's distributed package: "
                             "pip install 'kcompress[distributed]'") from None
    connection = _connection_args(scheduler)
    _probe(scheduler, connection, timeout)
    try:
        client = Client(scheduler, timeout=timeout, set_as_default=False)
    except Exception as error:  # noqa: BLE001 - OSError, TimeoutError: one line
        raise _unreachable(scheduler, error, timeout) from None
    workers = client.scheduler_info().get("workers", {})
    threads = sum(worker.get("nthreads", 0) for worker in workers.values())
    return TrialExecutor(client.get_executor(pure=False), f"Dask scheduler {scheduler} ({len(workers)} workers, "
                         f"{threads} threads)", client)


def _connection_args(scheduler: str) -> dict[str, Any]:
    """Dask's client-side connection arguments from its configuration; a ``tls://`` address needs them."""
    from distributed.security import Security

    arguments = Security().get_connection_args("client")
    if scheduler.startswith("tls://") and arguments.get("ssl_context") is None:
        raise KCompressError(f"cannot connect to the Dask scheduler at {scheduler}: tls:// needs certificates in "
                             "Dask's configuration (distributed.comm.tls.ca-file, .client.cert, .client.key); "
                             "see docs/distributed.md")
    return arguments


def _probe(scheduler: str, connection: Mapping[str, Any], timeout: float) -> None:
    """Ask the scheduler who it is, within ``timeout`` seconds (in a thread of its own, so a caller's event
    loop does not matter); a KCompressError unless a Dask scheduler answers."""
    from distributed.comm import connect

    async def identity() -> Any:
        comm = await asyncio.wait_for(connect(scheduler, timeout=timeout, **connection), timeout)
        try:
            await asyncio.wait_for(comm.write({"op": "identity", "reply": True}), timeout)
            return await asyncio.wait_for(comm.read(), timeout)
        finally:
            comm.abort()

    host, _, port = scheduler.split("://", 1)[1].rpartition(":")
    if scheduler.startswith(("tcp://", "tls://", "ws://", "wss://")):  # a closed port fails here at once
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
        except OSError as error:
            raise _unreachable(scheduler, error, timeout) from None
    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: outcome.update(_outcome(identity)), daemon=True,
                              name="kcompress-scheduler-probe")
    thread.start()
    thread.join(2 * timeout)
    if "error" in outcome or "answer" not in outcome:
        raise _unreachable(scheduler, outcome.get("error", TimeoutError()), timeout)
    answer = outcome["answer"]
    if not (isinstance(answer, Mapping) and answer.get("type") == "Scheduler"):
        raise KCompressError(f"cannot connect to the Dask scheduler at {scheduler}: the server there answered, "
                             "but not as a Dask scheduler")


def _outcome(coroutine: Callable[[], Any]) -> dict[str, Any]:
    """``{"answer": result}`` or ``{"error": exception}`` of running ``coroutine()`` in a new event loop."""
    try:
        return {"answer": asyncio.run(coroutine())}
    except Exception as error:  # noqa: BLE001 - any failure to connect or to read is reported as one line
        return {"error": error}


def _unreachable(scheduler: str, error: BaseException, timeout: float) -> KCompressError:
    reason = " ".join(str(error).split())
    if isinstance(error, (asyncio.TimeoutError, TimeoutError)) and not reason:
        reason = f"no answer within {timeout:g} s (--scheduler-timeout sets how long to wait)"
    return KCompressError(f"cannot connect to the Dask scheduler at {scheduler}: {reason[:300] or type(error).__name__}")


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
    processes = getattr(pool, "_processes", None) or {}
    for process in list(processes.values()):
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


__all__ = ["CONNECT_TIMEOUT", "SCHEDULER_ENV", "TrialExecutor", "check_address", "exit_with_parent", "open_executor",
           "scheduler_address", "worker_name"]
