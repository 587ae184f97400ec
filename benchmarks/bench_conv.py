"""Speed of CompressedConv1d/2d under its default ("auto") plan against the dense convolution.

    python benchmarks/bench_conv.py [--quick] [--threads 1]

Grid: Conv1d (length 128) and Conv2d (12x12) with channels in = out in {16, 64, 256}, kernels 3 and 9
(Conv1d) or 3 and 5 (Conv2d), padding "same", batches 1, 16 and 64; each kernel 4x smaller in SVD (the
two-convolution path) and in KCP (the im2col path), with random factors (speed does not depend on them). The layer's plan is what ``set_execution(layer,
"auto")`` picks on this machine (timed at the planner's own probe input, batches 1 and 16); the table then
times it against ``nn.Conv*`` with the same (reconstructed) kernel at each batch, interleaved
(:func:`kcompress.nn.speed.time_interleaved`, median of per-round ratios). Target (issue 26): the default plan never below 0.9x of dense.
Results: benchmarks/results/conv_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools

import torch
from common import machine_markdown, markdown_table, write_results
from torch import nn

from kcompress.formats import get_format
from kcompress.nn import COMPRESSED_TYPES, set_execution
from kcompress.nn.speed import paired, time_interleaved

SPATIAL = {1: (128,), 2: (12, 12)}
KERNELS = {1: (3, 9), 2: (3, 5)}


def compressed(dense: nn.Module, fmt_name: str) -> nn.Module:
    """``dense`` with its kernel fitted 4x smaller by ``fmt_name``."""
    fmt = get_format(fmt_name)

    def build(name: str, weight: torch.Tensor, gates: int) -> nn.Module:
        tz = fmt.default_tensorization(*weight.shape)
        module = fmt(tz, fmt.rank_for_ratio(tz, 4.0))
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.normal_(0, 0.1)
        return module

    return COMPRESSED_TYPES[type(dense)].from_dense(dense, build).eval()


def measure(dims: int, channels: int, kernel: int, fmt_name: str, batches: list[int], budget: float) -> list[dict]:
    cls = nn.Conv1d if dims == 1 else nn.Conv2d
    dense = cls(channels, channels, kernel, padding="same").eval()
    layer = compressed(dense, fmt_name)
    with torch.no_grad():
        dense.weight.copy_(layer.kernel())
    plan = set_execution(layer, "auto")[""]["weight"]
    rows = []
    for batch in batches:
        x = torch.randn(batch, channels, *SPATIAL[dims])
        with torch.no_grad():
            times = time_interleaved({"dense": lambda: dense(x), "default": lambda: layer(x)}, budget=budget)
        speed = paired(times["dense"], times["default"])
        rows.append({"conv": f"Conv{dims}d", "channels": channels, "kernel": kernel, "format": fmt_name,
                     "batch": batch, "plan": plan, "dense_ms": times["dense"].median * 1e3,
                     "default_ms": times["default"].median * 1e3, "speedup": speed.ratio, "spread": speed.spread})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="channels 16 and 64, batches 1 and 16")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    channels = (16, 64) if args.quick else (16, 64, 256)
    batches = [1, 16] if args.quick else [1, 16, 64]
    rows = []
    for dims, width, fmt_name in itertools.product((1, 2), channels, ("svd", "kcp")):
        for kernel in KERNELS[dims]:
            rows.extend(measure(dims, width, kernel, fmt_name, batches, 0.05 if args.quick else 0.3))
    worst = min(rows, key=lambda row: row["speedup"])
    table = markdown_table(
        ["conv", "channels", "kernel", "format", "batch", "default plan", "dense ms", "default ms", "dense/default"],
        [[r["conv"], r["channels"], r["kernel"], r["format"], r["batch"], r["plan"], f"{r['dense_ms']:.3f}",
          f"{r['default_ms']:.3f}", f"{r['speedup']:.2f} (±{r['spread']:.0%})"] for r in rows])
    summary = (f"Lowest dense/default ratio: {worst['speedup']:.2f} ({worst['conv']}, {worst['channels']} channels, "
               f"kernel {worst['kernel']}, {worst['format']}, batch {worst['batch']}, {worst['plan']}); target >= 0.9.\n")
    write_results("conv_speed", rows, f"## Compressed convolutions (issue 26): default plan vs dense\n\n{__doc__}\n"
                  f"{machine_markdown()}Threads: {args.threads}.\n\n{summary}\n{table}")
    print(summary)


if __name__ == "__main__":
    main()
