"""What a user gets without flags (issue 23): each target's default command against the best hand-tuned one.

    python benchmarks/bench_defaults.py                          # every section -> results/defaults.{json,md}
    python benchmarks/bench_defaults.py --sections ratio,search  # -> results/defaults_ratio_search.{json,md}

``ratio``: ``kcompress MODEL --format F --ratio 4 --calibrate japanese-vowels --calibrate-samples 64`` (the
default allocates the ratio) against ``--allocate uniform`` (the previous default); ``search``:
``kcompress MODEL --max-drop 0.01 --calibrate japanese-vowels --eval japanese-vowels`` against the
hand-tuned ``--formats kcp,tt,svd --distill-epochs 30``; ``finetune``: ``kcompress.finetune(model, train,
teacher=dense)`` from a plain KCP x10 fit against ``loss="both", epochs=40, lr=1e-3``; ``vad``: Silero VAD at
4x with the defaults (needs speech recordings, see examples/silero_vad); ``threads``: the ``ratio`` command's
wall time with the default thread count, ``--threads 1`` and ``--threads 2``. Commands run as subprocesses
with ``--eval japanese-vowels`` added to measure them (it changes nothing without ``--max-drop``); the
accuracy is deterministic, times depend on the machine's load (recorded).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_markdown, markdown_table, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "japanese_vowels"
RATIO = ["--ratio", "4", "--calibrate", "japanese-vowels", "--calibrate-samples", "64"]
SEARCH = ["--max-drop", "0.01", "--calibrate", "japanese-vowels", "--eval", "japanese-vowels"]


def run_cli(cell: str, arguments: list[str]) -> dict[str, Any]:
    """``kcompress examples/japanese_vowels/{cell}.pt ARGUMENTS`` (plus ``--eval`` when absent): accuracy,
    ratio of the recurrent weights, seconds, load average before."""
    with tempfile.TemporaryDirectory() as tmp:
        extra = [] if "--eval" in arguments else ["--eval", "japanese-vowels"]
        command = ["kcompress", f"{cell}.pt", *arguments]
        load = os.getloadavg()[0]
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "kcompress", str(EXAMPLES / f"{cell}.pt"), *arguments, *extra,
                               "-q", "-o", f"{tmp}/out.safetensors", "--report", f"{tmp}/report.json"],
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
        report = json.loads(Path(f"{tmp}/report.json").read_text()) if done.returncode in (0, 3) else {}
    metrics = report.get("metrics", {})
    final = metrics.get("finetuned") if metrics.get("finetuned") is not None else metrics.get("compressed")
    search = report.get("search", {})
    ratio = search["steps"][search["chosen"]]["achieved_ratio"] if search.get("steps") else None
    rows = [m for m in report.get("matrices", []) if m.get("rank_used") is not None]
    if ratio is None and rows:
        ratio = sum(m["params_before"] for m in rows) / sum(m["params_after"] for m in rows)
    return {"command": " ".join(command), "exit_code": done.returncode, "dense": metrics.get("baseline"),
            "accuracy": final, "ratio": ratio, "seconds": round(seconds, 1), "load": round(load, 2),
            "error": done.stderr.strip().splitlines()[-1] if done.returncode not in (0, 3) else ""}


def ratio_section() -> list[dict]:
    rows = []
    for cell in ("lstm", "gru"):
        for fmt in ("kcp", "tt", "svd"):
            for label, extra in (("default", []), ("--allocate uniform (previous default)", ["--allocate", "uniform"])):
                rows.append({"target": f"{cell} {fmt} 4x", "variant": label,
                             **run_cli(cell, ["--format", fmt, *RATIO, *extra, "--threads", "1"])})
                print(rows[-1], flush=True)
    return rows


def search_section() -> list[dict]:
    rows = []
    for cell in ("lstm", "gru"):
        for label, extra in (("default", []), ("hand-tuned", ["--formats", "kcp,tt,svd", "--distill-epochs", "30"])):
            rows.append({"target": f"{cell} --max-drop 0.01", "variant": label, **run_cli(cell, [*SEARCH, *extra])})
            print(rows[-1], flush=True)
    return rows


def threads_section() -> list[dict]:
    rows = []
    for label, extra in (("default", []), ("--threads 1", ["--threads", "1"]), ("--threads 2", ["--threads", "2"])):
        rows.append({"target": "lstm kcp 4x, wall time", "variant": label,
                     **run_cli("lstm", ["--format", "kcp", *RATIO, *extra])})
        print(rows[-1], flush=True)
    return rows


def finetune_section() -> list[dict]:
    import kcompress
    from kcompress.io.models import SequenceClassifier
    from kcompress.tuning.data import load_builtin
    from kcompress.tuning.evaluate import evaluate

    torch.set_num_threads(1)
    model = SequenceClassifier.from_state_dict(torch.load(EXAMPLES / "lstm.pt", weights_only=True))
    assert model is not None
    train, test = load_builtin("japanese-vowels", "train"), load_builtin("japanese-vowels", "test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, report = kcompress.compress(model, "kcp", ratio=10)
    rows = []
    for label, settings in (("default: finetune(model, train, teacher=dense)", {}),
                            ('loss="both", epochs=40, lr=1e-3 (the issue)', {"loss": "both", "epochs": 40, "lr": 1e-3}),
                            ('loss="both", epochs=40', {"loss": "both", "epochs": 40})):
        tuned = copy.deepcopy(small)
        start = time.perf_counter()
        result = kcompress.finetune(tuned, train, teacher=model, **settings)
        rows.append({"target": f"lstm kcp x{report.compression_ratio:.1f} fine-tuned", "variant": label,
                     "dense": evaluate(model, test), "plain": evaluate(small, test), "accuracy": evaluate(tuned, test),
                     "ratio": report.compression_ratio, "lr": result.lr, "epochs_run": len(result.history) - 1,
                     "seconds": round(time.perf_counter() - start, 1), "load": round(os.getloadavg()[0], 2)})
        print(rows[-1], flush=True)
    return rows


def vad_section() -> list[dict]:
    sys.path.insert(0, str(ROOT / "examples" / "silero_vad"))
    from compress_vad import Agreement, RecurrentHead, load_features  # noqa: E402
    from silero_port import SileroVAD, torch_threads_kept  # noqa: E402

    import kcompress

    with torch_threads_kept():
        port = SileroVAD.from_jit()
    torch.set_num_threads(1)
    split = load_features(port, 8, 60)
    files = [f.unsqueeze(0) for f in split.train]
    dense = RecurrentHead(port.lstm, port.final_conv)
    reference = dense.probabilities(split.test)
    rows = []
    for fmt in ("kcp", "tt", "svd"):
        for label, extra in (("default", {}), ('allocate="uniform" (previous default)', {"allocate": "uniform"})):
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                head, report = kcompress.compress(dense, fmt, ratio=4, calibration=files, **extra)
            measured = Agreement.measure(reference, RecurrentHead(head.lstm, port.final_conv).probabilities(split.test))
            rows.append({"target": f"silero vad {fmt} 4x", "variant": label, "accuracy": measured.agreement,
                         "ratio": report.compression_ratio, "seconds": round(time.perf_counter() - start, 1),
                         "load": round(os.getloadavg()[0], 2)})
            print(rows[-1], flush=True)
    return rows


SECTIONS = {"ratio": ratio_section, "search": search_section, "finetune": finetune_section, "vad": vad_section,
            "threads": threads_section}


def _cell(value: Any, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", default=",".join(SECTIONS))
    args = parser.parse_args()
    rows = [row for name in args.sections.split(",") for row in SECTIONS[name]()]
    table = markdown_table(["target", "variant", "dense", "accuracy (VAD: agreement)", "ratio", "seconds", "load"],
                           [[r["target"], r["variant"], _cell(r.get("dense")), _cell(r.get("accuracy")),
                             _cell(r.get("ratio"), 2), _cell(r.get("seconds"), 1), _cell(r.get("load"), 2)]
                            for r in rows])
    print(table)
    names = args.sections.split(",")
    write_results("defaults" if set(names) == set(SECTIONS) else "defaults_" + "_".join(names), rows,
                  table + "\n\n" + machine_markdown())


if __name__ == "__main__":
    main()
