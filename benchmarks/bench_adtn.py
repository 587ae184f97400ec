"""ADTN fit speed (1024x1024, one thread) and fit quality on the bundled example's weights (docs/adtn.md).

    python benchmarks/bench_adtn.py

Prints wall and CPU seconds: on a shared machine the CPU seconds are what one quiet thread would take.
"""

import pathlib
import sys
import time

import torch

torch.set_num_threads(1)
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import trained_like  # noqa: E402

from kcompress.formats.adtn import ADTN  # noqa: E402


def timed(W, depth, **options):
    tz = ADTN.default_tensorization(*W.shape)
    wall, cpu = time.perf_counter(), time.process_time()
    m = ADTN.fit(W, tz, depth, **options)
    return time.perf_counter() - wall, time.process_time() - cpu, m.fit_info

g = torch.Generator().manual_seed(0)
for label, W in (("gaussian", torch.randn(1024, 1024, generator=g) / 32), ("trained-like", trained_like(1024, 1024))):
    wall, cpu, info = timed(W, 4)
    print(f"1024x1024 {label} depth 4: wall {wall:.1f} s, cpu {cpu:.1f} s, {info.iterations} iterations, "
          f"relative error {info.relative_error:.3f}", flush=True)
for name in ("lstm", "gru"):
    sd = torch.load(ROOT / "examples" / "japanese_vowels" / f"{name}.pt", weights_only=True)
    for key in ("rnn.weight_ih_l0", "rnn.weight_hh_l0", "head.weight"):
        W = sd[key]
        errors = []
        for depth in (2, 4):
            wall, cpu, info = timed(W, depth)
            errors.append(f"depth {depth}: {info.relative_error:.3f} ({info.iterations} it, {cpu:.1f} s cpu)")
        print(f"{name} {key} {tuple(W.shape)}: " + "; ".join(errors), flush=True)
