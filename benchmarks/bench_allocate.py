"""Automatic allocation against uniform allocation at the same parameter count (JapaneseVowels, no fine-tuning).

    python benchmarks/bench_allocate.py [--ratio 8] [--samples 256]

For the bundled LSTM and GRU (examples/japanese_vowels/*.pt), recurrent matrices (``targets="ih,hh"``),
calibrated on the training split's inputs (no labels), one thread:
* uniform: every format of {kcp, tt, svd} alone at ``--ratio`` per matrix;
* auto: ``allocate="auto"`` over {kcp, tt, svd} with ``params`` = the parameter count of the most accurate
  uniform allocation (so both use the same budget).
Test accuracy of each, the dense accuracy, parameters and seconds. Results: benchmarks/results/allocate.{json,md}.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from common import machine_markdown, markdown_table, write_results

import kcompress
from kcompress.io.models import SequenceClassifier
from kcompress.tuning.data import load_builtin
from kcompress.tuning.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("kcp", "tt", "svd")


def load(cell: str) -> SequenceClassifier:
    model = SequenceClassifier(12, 64, 9, cell=cell)
    model.load_state_dict(torch.load(ROOT / "examples" / "japanese_vowels" / f"{cell}.pt", weights_only=True))
    return model.eval()


def run(model: SequenceClassifier, test: Any, calibration: Any, samples: int, **kwargs: Any) -> dict[str, Any]:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressed, report = kcompress.compress(model, targets="ih,hh", calibration=calibration,
                                                calibrate_samples=samples, check_speed=False, **kwargs)
    seconds = time.perf_counter() - start
    choice = ", ".join(f"{r['matrix'].split('.')[-1]}: {r['format']} r{r['rank']}"
                       for r in report.allocation.get("rows", []))
    if not choice:
        choice = ", ".join(f"{m.matrix}: {m.format} r{m.rank_used}" for m in report.matrices)
    return {"params": report.compressed_params_after, "ratio": report.compression_ratio,
            "accuracy": evaluate(compressed, test, "classification"), "seconds": seconds, "choice": choice}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=8.0)
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    test = load_builtin("japanese-vowels", "test")
    calibration = load_builtin("japanese-vowels", "train")
    rows = []
    for cell in ("lstm", "gru"):
        model = load(cell)
        dense = evaluate(model, test, "classification")
        uniform = {f: run(model, test, calibration, args.samples, format=f, ratio=args.ratio, allocate="uniform")
                   for f in FORMATS}
        best = max(FORMATS, key=lambda f: (uniform[f]["accuracy"], -uniform[f]["params"]))
        auto = run(model, test, calibration, args.samples, format=list(FORMATS), params=uniform[best]["params"],
                   allocate="auto")
        for name, result in [*((f"uniform {f}", uniform[f]) for f in FORMATS), ("auto kcp,tt,svd", auto)]:
            rows.append({"model": cell, "dense": dense, "allocation": name, **result})
        gain = auto["accuracy"] - uniform[best]["accuracy"]
        met = gain >= 0.03 or (dense - uniform[best]["accuracy"] <= 0.01 and gain >= 0)
        rows.append({"model": cell, "dense": dense, "allocation": f"auto − best uniform ({best})", "gain": gain,
                     "target_met": met})
    table = markdown_table(
        ["model", "allocation", "params", "ratio", "test accuracy", "dense", "choice", "seconds"],
        [[r["model"], r["allocation"], r.get("params", ""), f"{r['ratio']:.2f}x" if "ratio" in r else "",
          f"{r['accuracy']:.4f}" if "accuracy" in r else f"{r['gain']:+.4f} ({'met' if r['target_met'] else 'not met'})",
          f"{r['dense']:.4f}", r.get("choice", ""), f"{r['seconds']:.1f}" if "seconds" in r else ""]
         for r in rows],
    )
    print(table)
    write_results("allocate", rows, table + "\n\n" + machine_markdown())


if __name__ == "__main__":
    main()
