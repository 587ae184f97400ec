"""Assemble docs/benchmarks.md from benchmarks/results/*.md (run after the bench_*.py scripts).

    python benchmarks/make_docs.py
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = ["params", "speed", "speed_matrix_2threads_quiet", "speed_matrix_1thread", "fit", "memory", "sweep", "sweep_executors", "calibration",
         "allocate", "search_distill_lr", "search", "search_distill", "exec_summary", "exec_train", "exec_train_h256svd", "exec_quiet",
         "exec_paper_quiet", "exec_paper", "exec_distill_memory", "exec_grid_lstm", "exec_grid_gru",
         "defaults", "defaults_threads", "bytes_japanese-vowels", "bytes_token", "bytes_silero-vad", "conv_speed"]

#: a heading put before the first of these parts (their results files start at a lower level)
HEADINGS = {
    "defaults": """## Defaults (issue 23): the command a user types against the best hand-tuned one

`python benchmarks/bench_defaults.py` (commands run as subprocesses, 1 thread). Targets: the ratio-4
command within 3 points of dense for kcp, tt and svd (LSTM and GRU: met); `--max-drop 0.01` with no other
flag >= 8x in under 5 minutes (LSTM 131x in 67 s, GRU 27.9x in 75 s: met); `finetune(model, train,
teacher=dense)` within 1 point of dense from a plain KCP x10 fit (LSTM 0.9757: met; GRU 0.9676 against
0.9784, 1.1 points: not met); Silero VAD 4x agreement >= 0.98 (kcp 0.9857, tt 0.9839, svd 0.9909: met).
""",
    "defaults_threads": """### The CLI's default thread count on a loaded machine (two busy loops running beside the command)
""",
    "bytes_japanese-vowels": "## The whole model in bytes (issue 25): `python benchmarks/bench_bytes.py`\n",
}

HEADER = """# Benchmarks

Measured on this project's development machine (2 vCPU, no GPU) with the commands below; every table
records its machine, thread counts, load average and the exact command. Times are medians of repeated
runs; ratios compare against dense fp32 measured in the same run and thread setting. The machine is
shared, so absolute times vary between runs (the load average is recorded); ratios within a table are
the meaningful numbers. Nothing here is asserted by the test suite.

```bash
python benchmarks/bench_params.py     # the KCP paper's comparison (TT, TR, BT, HT, KCP): parameters and MACs, checked
python benchmarks/bench_speed.py      # matrix and whole-LSTM speed, 1 and 2 threads, with peers
python benchmarks/bench_fit.py        # fit time and error against rank, real weights + paper shape
python benchmarks/bench_memory.py     # peak RSS of an LSTM forward at the paper shape
python benchmarks/bench_sweep.py      # one 24-trial sweep: 1 and 2 local processes, Dask with 2 workers
python benchmarks/bench_calibration.py  # data-aware fitting and unlabeled distillation on the bundled data
python benchmarks/bench_exec.py       # execution paths: compressed vs dense forward/training, paper shape, memory
python benchmarks/bench_allocate.py   # automatic allocation vs uniform at 8x (JapaneseVowels)
python benchmarks/bench_search.py     # --max-drop 0.01 budget search (JapaneseVowels LSTM and GRU)
python benchmarks/bench_bytes.py      # the whole model in bytes: fp32, fp16, int8 dynamic, formats, formats + int8
python benchmarks/bench_conv.py       # compressed convolutions against the dense convolution
python benchmarks/make_docs.py        # this page
```
"""


def main() -> None:
    sections = [HEADER]
    summary = HERE / "summary.md"
    if summary.exists():
        sections.append(summary.read_text())
    for name in PARTS:
        path = HERE / "results" / f"{name}.md"
        if path.exists():  # links written from benchmarks/results/ resolve from docs/ once rewritten
            if name in HEADINGS:
                sections.append(HEADINGS[name])
            sections.append(path.read_text().replace("](../../docs/", "]("))
    target = HERE.parent / "docs" / "benchmarks.md"
    target.write_text("\n".join(sections))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
