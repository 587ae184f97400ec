"""Peak resident memory of an LSTM forward at the paper shape, dense against compressed.

    python benchmarks/bench_memory.py

Each configuration runs in a fresh subprocess (so peaks don't mix) that builds the model, runs one
forward of T=16 steps at batch 16 and reports ``ru_maxrss``; the baseline row is the same process with
only the input allocated. Results: benchmarks/results/memory.{json,md}.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from typing import Any

from common import machine_markdown, markdown_table, write_results

CONFIGS = ["input only", "dense", "int8", "kcp", "tt", "ht", "svd"]
SEQ, BATCH, INPUT, HIDDEN = 16, 16, 57600, 256


def measure(config: str) -> dict[str, Any]:
    """Run in the child: build ``config``, run one forward, return peak RSS in MB."""
    import torch
    from bench_speed import _Wrapped, compressed_lstm, kcompress_matrices, shapes
    from torch import nn

    torch.set_num_threads(1)
    x = torch.randn(SEQ, BATCH, INPUT)
    model: Any = None
    params = 0
    if config != "input only":
        shape = shapes()[0]
        if config in ("dense", "int8"):
            model = nn.LSTM(INPUT, HIDDEN).eval()
            if config == "int8":
                model = torch.ao.quantization.quantize_dynamic(_Wrapped(model), {nn.LSTM}, dtype=torch.qint8)
        else:
            # build the compressed layer without ever holding the dense 59M-parameter LSTM
            with torch.device("meta"):
                dense = nn.LSTM(INPUT, HIDDEN)
            dense = dense.to_empty(device="cpu")
            with torch.no_grad():
                for name, param in dense.named_parameters():
                    if not name.startswith("weight_ih"):  # the big matrix is never touched
                        param.normal_(0.0, 0.1)
            matrix = next(module for label, _, module in kcompress_matrices(shape) if f" {config} " in label)
            model = compressed_lstm(shape, dense, matrix)
            del dense
        params = sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            model(x)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"config": config, "params": params, "peak_rss_mb": round(peak_mb, 1)}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(measure(sys.argv[2])))
        return
    rows = []
    for config in CONFIGS:
        result = subprocess.run([sys.executable, __file__, "--child", config], capture_output=True, text=True)
        if result.returncode != 0:
            print(f"{config}: failed: {result.stderr.strip().splitlines()[-1:]}")
            continue
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    base = next(r["peak_rss_mb"] for r in rows if r["config"] == "input only")
    table = [[r["config"], f"{r['params']:,}", r["peak_rss_mb"], round(r["peak_rss_mb"] - base, 1)] for r in rows]
    markdown = (
        f"## Peak memory of an LSTM forward at the paper shape (T={SEQ}, batch {BATCH}, {INPUT}->{HIDDEN})\n\n"
        + machine_markdown() + "\n"
        + markdown_table(["model", "params", "peak RSS MB", "above input-only MB"], table)
    )
    write_results("memory", rows, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
