"""Sweeps on a real Dask cluster (``distributed.LocalCluster``, two worker processes): the same records as the
local pool, a complete and valid log when a worker process is killed mid-sweep, and one-line errors (nothing
written) when the scheduler cannot be reached or Dask is missing."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading

import pytest

distributed = pytest.importorskip("distributed")

import dask  # noqa: E402 - only with the extra installed

from kcompress.errors import KCompressError  # noqa: E402
from kcompress.runs.sweep import TRIALS_FILE, expand_grid, run_sweep  # noqa: E402
from kcompress.runs.trials import read_records  # noqa: E402
from kcompress.tuning.evaluate import EvalSpec  # noqa: E402
from tests.cli.test_cli import one_error_line, run  # noqa: E402
from tests.runs.test_sweep import save_tiny_data, save_tiny_model  # noqa: E402

#: fields that say where and when a trial ran, not what it measured
pytestmark = pytest.mark.slow  # examples, subprocesses or exports: seconds each


WHERE = {"host", "worker", "seconds", "finished"}

SLOW_METRIC = """
import time
def count(model):
    time.sleep(0.4)
    return float(sum(p.numel() for p in model.parameters()))
"""


@pytest.fixture(scope="module")
def cluster():
    """One scheduler and two single-threaded worker processes, and a client for the tests' own questions."""
    with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None) as local:
        with distributed.Client(local) as client:
            yield local, client


@pytest.fixture()
def inputs(tmp_path):
    return save_tiny_model(tmp_path / "tiny.pt"), save_tiny_data(tmp_path / "d.npz")


def _measured(result) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in WHERE} for row in result.rows]


def test_cluster_results_equal_the_local_pool(cluster, inputs, tmp_path) -> None:
    local_cluster, client = cluster
    model, data = inputs
    trials = expand_grid(["kcp", "svd"], [1, 2], seed=3)
    spec = EvalSpec(data=str(data))
    events = []
    remote = run_sweep(model, trials, spec, tmp_path / "remote", scheduler=local_cluster.scheduler_address,
                       progress=events.append)
    pool = run_sweep(model, trials, spec, tmp_path / "local", jobs=1)
    assert all(row["status"] == "ok" for row in remote.rows), remote.errors
    assert _measured(remote) == _measured(pool)
    workers = set(client.scheduler_info()["workers"])
    assert {row["worker"] for row in remote.rows} <= workers and all(row["host"] for row in remote.rows)
    summary = [e.message for e in events if e.stage == "workers"]
    assert summary and all(w in summary[0] for w in {row["worker"] for row in remote.rows})
    assert "done" in summary[0] and "running" in summary[0] and "failed" in summary[0]


def test_a_killed_worker_leaves_a_complete_valid_log(cluster, inputs, tmp_path) -> None:
    local_cluster, client = cluster
    model, _ = inputs
    metric = tmp_path / "slow_metric.py"
    metric.write_text(SLOW_METRIC)
    trials = expand_grid(["svd"], [1, 2, 3, 4, 5])
    killed: list[int] = []
    lock = threading.Lock()

    def kill_a_busy_worker(event) -> None:
        if event.stage != "trial" or event.name == "dense":
            return
        with lock:
            if killed:
                return
            busy = [worker for worker, keys in client.processing().items() if keys]
            if busy:
                pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    out = tmp_path / "killed"
    result = run_sweep(model, trials, EvalSpec(evaluator=f"{metric}:count"), out,
                       scheduler=local_cluster.scheduler_address, progress=kill_a_busy_worker)
    assert killed, "no worker was busy when the first trial finished"
    lines = (out / TRIALS_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one whole JSON record
    assert len(result.rows) == len(trials) and set(read_records(out / TRIALS_FILE)) == {r["key"] for r in result.rows}
    for row in result.rows:  # rescheduled on the other worker, or recorded failed with the reason
        assert row["status"] == "ok" or row["error"].startswith("worker lost"), row
    assert len(records) == len(trials)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_scheduler_is_one_line_and_writes_nothing(inputs, tmp_path) -> None:
    model, data = inputs
    address = f"tcp://127.0.0.1:{_free_port()}"
    out = tmp_path / "never"
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(KCompressError, match=f"cannot connect to the Dask scheduler at {address}"):
            run_sweep(model, expand_grid(["svd"], [1]), EvalSpec(data=str(data)), out, scheduler=address)
        result = run("sweep", model, "--formats", "svd", "--ranks", "1", "--eval", data, "--out", out,
                     "--scheduler", address)
    assert result.exit_code == 1 and address in one_error_line(result.stderr)
    assert not out.exists()


def test_missing_dask_is_one_line(inputs, tmp_path, monkeypatch) -> None:
    model, data = inputs
    monkeypatch.setitem(sys.modules, "distributed", None)
    out = tmp_path / "never"
    result = run("sweep", model, "--formats", "svd", "--ranks", "1", "--eval", data, "--out", out,
                 "--scheduler", "tcp://127.0.0.1:1")
    assert result.exit_code == 1 and "kcompress[distributed]" in one_error_line(result.stderr)
    assert not out.exists()
    usage = run("sweep", model, "--eval", data, "--scheduler", "tcp://127.0.0.1:1", "--jobs", "2")
    assert usage.exit_code == 2
