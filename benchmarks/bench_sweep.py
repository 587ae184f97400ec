"""Wall time of one 24-trial sweep on the bundled example: 1 local process, 2 local processes, and a Dask
scheduler + 2 worker processes (one thread each) on this machine.

    python benchmarks/bench_sweep.py

Each configuration runs the same `kcompress sweep` command into a fresh folder; the Dask scheduler and
workers are started first (their start-up is not timed, as a user's cluster is already running; the
workers' first import of torch and kcompress is, as is the local pool's). The records of the three runs
are compared (same metrics for the same seeds). Writes results/sweep_executors.{json,md}.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import machine_markdown, markdown_table, write_results

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "examples" / "japanese_vowels" / "lstm.pt"
BIN = Path(sys.executable).parent
SWEEP = ["sweep", str(MODEL), "--formats", "kcp,tt,ht,svd", "--ranks", "1,2,4,8,16,32", "--targets", "ih,hh",
         "--eval", "japanese-vowels", "--finetune-epochs", "5", "--finetune-lr", "0.01", "--quiet"]


def timed_sweep(out: Path, extra: list[str]) -> tuple[float, dict[str, Any]]:
    """Seconds of one sweep command and its records by key."""
    command = [str(BIN / "kcompress"), *SWEEP, "--out", str(out), *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    records = {}
    for line in (out / "trials.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["key"]] = record
    return seconds, records


def start_cluster(folder: Path) -> tuple[str, list[subprocess.Popen]]:
    """A scheduler and 2 single-threaded worker processes; returns (address, processes)."""
    from distributed import Client

    scheduler_file = folder / "scheduler.json"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True}
    scheduler = subprocess.Popen([str(BIN / "dask"), "scheduler", "--scheduler-file", str(scheduler_file),
                                  "--no-dashboard", "--port", "0"], **quiet)
    while not scheduler_file.exists():
        time.sleep(0.2)
    workers = subprocess.Popen([str(BIN / "dask"), "worker", "--scheduler-file", str(scheduler_file), "--nworkers",
                                "2", "--nthreads", "1", "--no-dashboard"], **quiet)
    with Client(scheduler_file=str(scheduler_file)) as client:
        client.wait_for_workers(2, timeout=300)
        address = client.scheduler.address
    return address, [workers, scheduler]


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:  # each started in its own session: its group holds only its children
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        results = {}
        for name, extra in (("1 local process", ["--jobs", "1"]), ("2 local processes", ["--jobs", "2"])):
            results[name] = timed_sweep(folder / name.replace(" ", "_"), extra)
        address, processes = start_cluster(folder)
        try:
            results["Dask: scheduler + 2 worker processes"] = timed_sweep(folder / "dask", ["--scheduler", address])
        finally:
            stop(processes)
    reference = results["1 local process"][1]
    for name, (seconds, records) in results.items():
        same = all(records[k]["metric"] == reference[k]["metric"] for k in reference)
        hosts = sorted({str(r.get("worker")) for r in records.values()})
        rows.append({"executor": name, "seconds": round(seconds, 1), "trials": len(records),
                     "same_metrics_as_1_process": same, "workers": len(hosts)})
        print(name, rows[-1])
    base = rows[0]["seconds"]
    table = markdown_table(
        ["executor", "trials", "wall time (s)", "vs 1 process", "workers that ran trials", "same metrics"],
        [[r["executor"], r["trials"], r["seconds"], f"{base / r['seconds']:.2f}x", r["workers"],
          "yes" if r["same_metrics_as_1_process"] else "NO"] for r in rows],
    )
    markdown = f"""## Sweeps: local pool and Dask

The same sweep (4 formats x 6 ranks = 24 trials plus the dense baseline, `--targets ih,hh`, 5 epochs of
fine-tuning each, on the bundled JapaneseVowels LSTM) with one local process, two local processes, and a
Dask scheduler with two single-threaded worker processes on the same machine (`dask scheduler`,
`dask worker --nworkers 2 --nthreads 1`; their start-up not timed). Every worker uses one torch thread.
Wall time of the whole command, run once each, one after the other.

```bash
python benchmarks/bench_sweep.py
# runs: kcompress {' '.join(SWEEP[:-1]).replace(str(MODEL), 'examples/japanese_vowels/lstm.pt')} --jobs 1 | --jobs 2 | --scheduler tcp://...
```

{table}
{machine_markdown()}"""
    write_results("sweep_executors", rows, markdown)


if __name__ == "__main__":
    main()
