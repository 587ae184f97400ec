"""Threads chosen for the work, and the caller's settings restored afterwards.

Fits and other small-kernel work run on one thread: on a 2-core machine that is doing anything else, a
second torch or OpenBLAS thread made them 10-20x slower (one CP-ALS step went from 0.07 s to 32 s with two
OpenBLAS threads next to torch's; an ADTN fit of 100 steps took 0.8-2.7 s with one thread and 7.9-20.8 s with
two). Big GEMMs (evaluating or fine-tuning a model) may use more: the CLI's ``--threads N`` sets them, and
its default (:func:`default_model_threads`) is half the cores left idle by the load, so one on a 2-core
machine (where torch's own default of two made a compression 47.5 s instead of 12.7 s under load).
Every setting is restored when the block ends, so library calls leave the user's torch and BLAS settings as
they found them.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator, Optional

import torch
from threadpoolctl import threadpool_limits

from kcompress.errors import KCompressError

#: threads a fit uses (override with the environment variable ``KCOMPRESS_FIT_THREADS``)
DEFAULT_FIT_THREADS = 1


@contextlib.contextmanager
def threads(count: Optional[int]) -> Iterator[int]:
    """torch's intra-op threads and every loaded BLAS pool (OpenBLAS, MKL, BLIS) set to ``count`` inside the
    block, the caller's settings restored after; ``None`` changes nothing. Yields torch's thread count."""
    if count is None:
        yield torch.get_num_threads()
        return
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise KCompressError(f"threads must be a positive integer, got {count!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        with threadpool_limits(limits=count, user_api="blas"):
            yield count
    finally:
        torch.set_num_threads(previous)


def fit_thread_count() -> int:
    """Threads a fit uses: :data:`DEFAULT_FIT_THREADS`, or the environment's ``KCOMPRESS_FIT_THREADS``."""
    value = os.environ.get("KCOMPRESS_FIT_THREADS", str(DEFAULT_FIT_THREADS))
    if not value.strip().isdigit() or int(value) < 1:
        raise KCompressError(f"KCOMPRESS_FIT_THREADS must be a positive integer, got {value!r}")
    return int(value)


def fit_threads() -> contextlib.AbstractContextManager[int]:
    """:func:`threads` for a fit (:func:`fit_thread_count`)."""
    return threads(fit_thread_count())


def default_model_threads() -> int:
    """Threads for a command's model work when none are asked for: half the CPUs the 1-minute load average
    leaves idle, at most torch's own setting, at least one (so one on a 2-core machine: a second thread
    competing with any other process cost more than it gained)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(torch.get_num_threads(), (cpus - math.ceil(load)) // 2))


@contextlib.contextmanager
def threads_used(count: Optional[int]) -> Iterator[dict[str, int]]:
    """:func:`threads` with ``count`` (None: :func:`default_model_threads`) for a command's model work; yields
    ``{"fit": fits' threads, "model": threads for evaluating and fine-tuning}`` (what a report records)."""
    fit = fit_thread_count()
    with threads(count if count is not None else default_model_threads()) as model:
        yield {"fit": fit, "model": model}

