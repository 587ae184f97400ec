"""Shared benchmark helpers: median timing, the machine record, JSON and Markdown output.

Timings are medians of repeated runs measured in one process; ratios are always taken against the dense
baseline of the same run and thread setting. Nothing here is asserted by the test suite.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def median_ms(fn: Callable[[], Any], min_time: float = 0.5, min_repeats: int = 3, max_repeats: int = 50) -> float:
    """Median wall time of ``fn()`` in milliseconds after one warm-up call."""
    with torch.no_grad():
        fn()
        samples: list[float] = []
        started = time.perf_counter()
        while len(samples) < min_repeats or (
            time.perf_counter() - started < min_time and len(samples) < max_repeats
        ):
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(samples)


def machine() -> dict[str, Any]:
    """What ran the benchmark: CPU, cores, torch/numpy versions and thread settings."""
    import numpy
    from threadpoolctl import threadpool_info

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "blas": [f"{p.get('internal_api')}:{p.get('num_threads')}" for p in threadpool_info()],
        "load_average": os.getloadavg(),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def write_results(name: str, rows: list[dict[str, Any]], markdown: str) -> Path:
    """Write ``results/<name>.json`` (rows + machine) and ``results/<name>.md``; return the JSON path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1, default=str))
    (RESULTS / f"{name}.md").write_text(markdown)
    return path


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def machine_markdown() -> str:
    info = machine()
    return (
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, numpy {info['numpy']}, "
        f"BLAS pools {', '.join(info['blas'])}, load average {tuple(round(x, 2) for x in info['load_average'])}, "
        f"{info['date']}.\nCommand: `{info['command']}`\n"
    )
