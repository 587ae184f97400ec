"""The accuracy budget search on JapaneseVowels: the smallest model within --max-drop, and how long it takes.

    python benchmarks/bench_search.py [--max-drop 0.01] [--threads 1] [-- extra kcompress options]

Runs, for the bundled LSTM and GRU, the command

    kcompress examples/japanese_vowels/{cell}.pt --formats kcp,tt,svd --targets ih,hh \\
        --calibrate japanese-vowels --eval japanese-vowels --max-drop 0.01 \\
        --finetune-epochs 40 --finetune-lr 0.02 --threads 1 -o <tmp> --report <tmp>

as a subprocess and records its wall time, exit code, the chosen compression ratio of the recurrent
weights and the trajectory (per step: accuracy right after the fit, the recovery that ran because the step
was failing, final accuracy). Results: benchmarks/results/{--name, default search}.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine_markdown, markdown_table, write_results

from kcompress.report.allocation_table import recovery_label

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-drop", default="0.01")
    parser.add_argument("--threads", default="1")
    parser.add_argument("--name", default="search", help="results file name under benchmarks/results/")
    parser.add_argument("extra", nargs="*")
    args = parser.parse_args()
    rows, trajectories = [], []
    for cell in ("lstm", "gru"):
        with tempfile.TemporaryDirectory() as tmp:
            report_path = Path(tmp) / "report.json"
            command = [sys.executable, "-m", "kcompress", str(ROOT / "examples" / "japanese_vowels" / f"{cell}.pt"),
                       "--formats", "kcp,tt,svd", "--targets", "ih,hh", "--calibrate", "japanese-vowels",
                       "--eval", "japanese-vowels", "--max-drop", args.max_drop, "--finetune-epochs", "40",
                       "--finetune-lr", "0.02", "--threads", args.threads, "-q", "-o", str(Path(tmp) / "out.safetensors"),
                       "--report", str(report_path), *args.extra]
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            report = json.loads(report_path.read_text()) if report_path.exists() else {}
        search = report.get("search", {})
        chosen = search["steps"][search["chosen"]] if search.get("steps") else {}
        rows.append({"model": cell, "exit_code": done.returncode, "seconds": seconds,
                     "ratio": chosen.get("achieved_ratio"), "metric": chosen.get("metric"),
                     "baseline": report.get("metrics", {}).get("baseline"), "drop": chosen.get("drop"),
                     "steps": len(search.get("steps", [])), "trajectory": search.get("steps", []),
                     "command": " ".join(command[1:])})
        trajectories += [[cell, i + 1, f"{s['achieved_ratio']:.2f}x", f"{s['fitted_metric']:.4f}",
                          recovery_label(s), f"{s['metric']:.4f}", f"{s['drop']:.4f}", "pass" if s["passed"] else "fail",
                          f"{s['seconds']:.1f}"]
                         for i, s in enumerate(search.get("steps", []))]
    table = markdown_table(["model", "exit code", "ratio found (recurrent weights)", "accuracy", "dense", "drop",
                            "steps", "wall seconds"],
                           [[r["model"], r["exit_code"], f"{r['ratio']:.2f}x" if r["ratio"] else "—",
                             f"{r['metric']:.4f}" if r["metric"] is not None else "—",
                             f"{r['baseline']:.4f}" if r["baseline"] is not None else "—",
                             f"{r['drop']:.4f}" if r["drop"] is not None else "—", r["steps"], f"{r['seconds']:.0f}"]
                            for r in rows])
    steps = markdown_table(["model", "step", "ratio", "accuracy after fit", "recovery", "accuracy", "drop", "result",
                            "seconds"], trajectories)
    print(table + "\n\n" + steps)
    write_results(args.name, rows, table + "\n\n" + steps + "\n\n" + machine_markdown())


if __name__ == "__main__":
    main()
