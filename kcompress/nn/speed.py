"""Stable timing of alternatives: interleaved runs within a minimum time budget, median and spread.

MAC counts mislead on CPUs: a factorized multiply runs several small kernels whose fixed cost and memory
traffic dominate on small matrices (KCP rank 8 needs 5x fewer MACs than a 2048x512 matrix and still runs
slower). So the execution planner (``kcompress.nn.paths``) and the report time the alternatives on this
machine. One noisy sample (another process, a frequency change) must not decide, so
:func:`time_interleaved` runs the candidates in turn, round after round, until each has at least
``min_runs`` samples and the budget is spent, and reports each candidate's median with its spread. Timings
go to the report only, never into an artifact. The full picture is in ``benchmarks/``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Hashable, Mapping, TypeVar

import torch
from torch import nn

#: the batch (rows of x) used by :func:`measured_speedup`
CHECK_BATCH = 16

_Key = TypeVar("_Key", bound=Hashable)


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median of ``runs`` samples and the interquartile range relative to it;
    ``samples`` in round order (round ``i`` of every candidate ran back to back)."""

    median: float
    spread: float
    runs: int
    samples: tuple[float, ...] = ()


@dataclass(frozen=True)
class Speed:
    """``dense / compressed`` time of the same product (> 1: faster) and its relative spread."""

    ratio: float
    spread: float


def time_interleaved(
    candidates: Mapping[_Key, Callable[[], object]], budget: float = 0.05, min_runs: int = 5, max_runs: int = 200
) -> dict[_Key, Timing]:
    """Each candidate timed in turn (one warm-up call each, then rounds) until every one has ``min_runs``
    samples and ``budget`` seconds have passed, or ``max_runs`` rounds."""
    for fn in candidates.values():
        fn()
    samples: dict[_Key, list[float]] = {name: [] for name in candidates}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_runs and (rounds < min_runs or time.perf_counter() - start < budget):
        for name, fn in candidates.items():
            begin = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - begin)
        rounds += 1
    return {name: _summary(values) for name, values in samples.items()}


def _summary(values: list[float]) -> Timing:
    median, spread = _median_spread(values)
    return Timing(median, spread, len(values), tuple(values))


def _median_spread(values: list[float]) -> tuple[float, float]:
    median = statistics.median(values)
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [median, median, median]
    return median, (quartiles[2] - quartiles[0]) / max(abs(median), 1e-12)


def paired(baseline: Timing, other: Timing) -> Speed:
    """``baseline / other`` from the per-round ratios (each round ran both back to back, so a load change
    between rounds cancels): their median and interquartile spread."""
    ratios = [b / max(o, 1e-12) for b, o in zip(baseline.samples, other.samples)]
    return Speed(*_median_spread(ratios))


def measured_speedup(
    matrix: nn.Module, materialized: bool = False, batch: int = CHECK_BATCH, budget: float = 0.05
) -> Speed:
    """``time(x @ W.T) / time(path)`` for ``x (batch, N)``, where the path is ``matrix.multiply`` (factorized)
    or the product with the cached reconstructed weight (``materialized``, about 1 by construction).

    ``W`` is the matrix's own reconstruction, so both sides compute the same product.
    """
    with torch.no_grad():
        weight = matrix.reconstruct().detach().contiguous()  # type: ignore[operator]  # nn.Module attrs typed Tensor | Module
        x = torch.randn(batch, weight.shape[1], dtype=weight.dtype, device=weight.device)
        cached = weight.clone()
        path = (lambda: x @ cached.T) if materialized else (lambda: matrix.multiply(x))  # type: ignore[operator]  # nn.Module attrs typed Tensor | Module
        times = time_interleaved({"dense": lambda: x @ weight.T, "path": path}, budget=budget)
    return paired(times["dense"], times["path"])
