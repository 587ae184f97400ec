"""Pin numpy's BLAS threads around numeric work.

On small machines numpy's OpenBLAS and torch's thread pool oversubscribe the cores: one CP-ALS step went
from 0.07 s to 32 s with two OpenBLAS threads next to torch's. Fits run inside :func:`blas_threads`,
which limits the BLAS libraries numpy loaded and leaves ``torch.get_num_threads()`` untouched.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from threadpoolctl import threadpool_info, threadpool_limits

#: BLAS threads used while fitting (override with ``KCOMPRESS_BLAS_THREADS``)
DEFAULT_FIT_BLAS_THREADS = 1


@contextlib.contextmanager
def blas_threads(count: int | None = None) -> Iterator[None]:
    """Limit BLAS thread pools (OpenBLAS, MKL, BLIS loaded by numpy/scipy) to ``count`` inside the block."""
    import os

    if count is None:
        count = int(os.environ.get("KCOMPRESS_BLAS_THREADS", DEFAULT_FIT_BLAS_THREADS))
    with threadpool_limits(limits=count, user_api="blas"):
        yield


def thread_report() -> dict[str, object]:
    """Thread counts in effect: torch's intra-op pool and each loaded BLAS pool (for benchmark records)."""
    import torch

    return {
        "torch_threads": torch.get_num_threads(),
        "blas": [
            {"library": pool.get("internal_api"), "threads": pool.get("num_threads")}
            for pool in threadpool_info()
            if pool.get("user_api") == "blas"
        ],
    }
