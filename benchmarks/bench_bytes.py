"""Accuracy against bytes: dense fp32, fp16, torch's int8 dynamic quantization, kcompress's int8 storage alone,
and each format at a ratio, with and without int8 storage (calibrated, no labels, no fine-tuning).

    OMP_NUM_THREADS=1 python benchmarks/bench_bytes.py japanese-vowels --ratio 8
    OMP_NUM_THREADS=1 python benchmarks/bench_bytes.py token --ratio 8
    OMP_NUM_THREADS=1 python benchmarks/bench_bytes.py silero-vad --formats svd --size 150KB --distill-epochs 0

With ``--size`` the compressed rows meet a size budget for the whole model's tensor bytes (``--size`` of the
command line) instead of a ratio: "alone" stores float32 (``--quantize none``), "+ int8" lets the allocation
choose float32 or int8 (the default). Silero VAD's metric is the speech-decision agreement with the dense model
(examples/silero_vad/whole_model.py: every convolution and the LSTM compressed, calibrated on
:data:`VAD_CALIBRATION_FILES` speech files, each layer on the compressed earlier layers' outputs).

"tensor bytes" are the bytes of the tensors a file stores (the dense state dict; the artifact's integers,
scales and floats), "file bytes" the whole file (torch.save of the state dict; the artifact with its
metadata header). Writes benchmarks/results/bytes_<model>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_markdown, write_results  # noqa: E402

import kcompress  # noqa: E402
from kcompress.config.checks import check_size  # noqa: E402
from kcompress.names import DEFAULT_SAMPLES  # noqa: E402
from kcompress.nn.quantize import quantization_rules, quantize_model, tensor_bytes  # noqa: E402
from kcompress.tuning.evaluate import evaluate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("svd", "kcp", "tt", "ht")
VAD_CALIBRATION_FILES = 80


@dataclass
class Bench:
    """A model, its calibration inputs, its metric (higher is better) and what ``compress`` selects in it."""

    model: nn.Module
    train: Any
    metric: Callable[[nn.Module], float]
    targets: str = "ih,hh"
    include: Optional[list[str]] = None
    source: str = "dense"

    @property
    def options(self) -> str:
        """The selection as command-line options."""
        include = " ".join(f"--include '{glob}'" for glob in self.include or [])
        source = "" if self.source == "dense" else f" (library: calibrate_options source={self.source})"
        return (include or f"--targets {self.targets}") + source


def japanese_vowels() -> Bench:
    from kcompress.io.models import SequenceClassifier
    from kcompress.tuning.data import load_builtin

    model = SequenceClassifier(12, 64, 9)
    model.load_state_dict(torch.load(ROOT / "examples/japanese_vowels/lstm.pt", weights_only=True))
    test = load_builtin("japanese-vowels", "test")
    return Bench(model, load_builtin("japanese-vowels", "train"), lambda m: evaluate(m, test))


def token() -> Bench:
    """The token classifier of examples/token_model, trained here (deterministic, seconds)."""
    sys.path.insert(0, str(ROOT / "examples" / "token_model"))
    from train import train_model  # type: ignore[import-not-found]

    from kcompress.tuning.data import SequenceData

    model, train, test = train_model()
    test_data = SequenceData(test["inputs"], test["targets"])
    return Bench(model, SequenceData(train["inputs"], train["targets"]), lambda m: evaluate(m, test_data),
                 targets="embedding")


def silero_vad() -> Bench:
    """The whole Silero VAD port (examples/silero_vad): agreement with the dense model on the held-out files."""
    sys.path.insert(0, str(ROOT / "examples" / "silero_vad"))
    from silero_port import SileroVAD  # type: ignore[import-not-found]
    from speech import speech_files  # type: ignore[import-not-found]
    from whole_model import HELD_OUT_EVERY, BatchedVAD, agreement, windows  # type: ignore[import-not-found]

    files = speech_files()
    test = files[::HELD_OUT_EVERY]
    calibration = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY][:VAD_CALIBRATION_FILES]
    dense = BatchedVAD(SileroVAD.from_jit()).eval()
    return Bench(dense, windows(calibration), lambda m: agreement(m, dense, test)[0], include=["*"],
                 source="compressed")


MODELS: dict[str, Callable[[], Bench]] = {"japanese-vowels": japanese_vowels, "token": token,
                                          "silero-vad": silero_vad}


def file_bytes(state: dict[str, torch.Tensor]) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


def row(name: str, accuracy: float, tensors: int, file: int, dense: dict[str, int], command: str = "") -> dict:
    return {"model": name, "accuracy": round(accuracy, 4), "tensor_bytes": tensors, "file_bytes": file,
            "tensor_ratio": round(dense["tensors"] / tensors, 2),
            "file_ratio": round(dense["file"] / file, 2) if file else None,
            "command": command}


def baselines(bench: Bench, dense: dict[str, int]) -> list[dict]:
    model, evaluate = bench.model, bench.metric
    rows = [row("dense fp32", evaluate(model), dense["tensors"], dense["file"], dense)]
    half = {k: v.half() for k, v in model.state_dict().items()}
    rounded = copy.deepcopy(model)
    rounded.load_state_dict({k: v.float() for k, v in half.items()})
    rows.append(row("fp16", evaluate(rounded), sum(v.numel() * 2 for v in half.values()), file_bytes(half),
                    dense))
    warnings.simplefilter("ignore")
    dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.LSTM, nn.GRU, nn.Linear},
                                                     dtype=torch.qint8)
    size = file_bytes(dynamic.state_dict())
    rows.append(row("int8 dynamic (torch)", evaluate(dynamic), size, size, dense))
    ours = copy.deepcopy(model)
    plan = quantization_rules(ours, "int8")
    quantize_model(ours, plan)
    rows.append(row("int8 storage alone (kcompress per-channel)", evaluate(ours), tensor_bytes(ours, plan),
                    0, dense, "--quantize int8 (no compression)"))
    return rows


def compressed(bench: Bench, dense: dict[str, int], fmt: str, ratio: float, size: Optional[str], quantize: Any,
               distill: int = 0) -> dict:
    """One format at ``ratio`` (or within ``size`` bytes, allocated), stored as ``quantize``."""
    samples = len(bench.train) if bench.include else DEFAULT_SAMPLES
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, report = kcompress.compress(bench.model, [fmt] if size else fmt, ratio=None if size else ratio,
                                           size=size, targets=bench.targets, include=bench.include,
                                           calibration=bench.train, calibrate_samples=samples,
                                           calibrate_options={"source": bench.source}, quantize=quantize,
                                           distill_epochs=distill, check_speed=False)
    with tempfile.TemporaryDirectory() as folder:
        path = kcompress.save_artifact(small, report, Path(folder) / "a.safetensors")
        file = path.stat().st_size
    budget = f"--size {size}" if size else f"--ratio {ratio:g}"
    name = (f"{fmt} {'within ' + size if size else f'x{ratio:g}'}" + (f" + {quantize}" if quantize != "none" else "")
            + (f", distilled {distill}" if distill else ""))
    command = (f"--format{'s' if size else ''} {fmt} {budget} {bench.options} --calibrate DATA"
               + (f" --quantize {quantize}" if quantize else "") + (f" --distill-epochs {distill}" if distill else ""))
    assert report.model_bytes_after == tensor_bytes(small, quantization_rules(small, report.quantize))
    assert size is None or report.model_bytes_after <= check_size(size)
    return row(name, bench.metric(small), report.model_bytes_after, file, dense, command)


def markdown(rows: list[dict], title: str) -> str:
    lines = [f"### {title}", "", "| model | accuracy | tensor bytes | x | file bytes | x | options |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        file = f"{r['file_bytes']:,}" if r["file_bytes"] else "–"
        ratio = f"{r['file_ratio']:.1f}" if r["file_bytes"] else "–"
        lines.append(f"| {r['model']} | {r['accuracy']:.4f} | {r['tensor_bytes']:,} | {r['tensor_ratio']:.1f} | "
                     f"{file} | {ratio} | {r['command']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--ratio", type=float, default=8.0)
    parser.add_argument("--size", help="instead of --ratio: a size budget for the whole model's tensors, e.g. 150KB")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--distill-epochs", type=int, default=30,
                        help="also each format + int8 after this many epochs of unlabeled distillation (0: not)")
    args = parser.parse_args()
    torch.manual_seed(0)
    bench = MODELS[args.model]()
    model = bench.model.eval()
    dense = {"tensors": tensor_bytes(model), "file": file_bytes(model.state_dict())}
    rows = baselines(bench, dense)
    for fmt in args.formats.split(","):
        for quantize in ("none", "int8"):
            rows.append(compressed(bench, dense, fmt, args.ratio, args.size, quantize))
            print(rows[-1], flush=True)
        if args.distill_epochs:
            rows.append(compressed(bench, dense, fmt, args.ratio, args.size, "int8", args.distill_epochs))
            print(rows[-1], flush=True)
    metric = "speech-decision agreement with dense" if args.model == "silero-vad" else "accuracy"
    budget = f"size budget {args.size}" if args.size else f"ratio {args.ratio:g}"
    title = f"{args.model}: {metric} against bytes ({budget}, calibrated, no labels, no fine-tuning)"
    text = markdown(rows, title) + "\n" + machine_markdown()
    write_results(f"bytes_{args.model}", rows, text)
    print(text)


if __name__ == "__main__":
    main()
