"""Accuracy against bytes: dense fp32, fp16, torch's int8 dynamic quantization, kcompress's int8 storage alone,
and each format at a ratio, with and without int8 storage (calibrated, no labels, no fine-tuning).

    OMP_NUM_THREADS=1 python benchmarks/bench_bytes.py japanese-vowels --ratio 8
    OMP_NUM_THREADS=1 python benchmarks/bench_bytes.py token --ratio 8

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
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_markdown, write_results  # noqa: E402

import kcompress  # noqa: E402
from kcompress.nn.quantize import quantization_plan, quantize_model, tensor_bytes  # noqa: E402
from kcompress.tuning.evaluate import evaluate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("svd", "kcp", "tt", "ht")


def japanese_vowels() -> tuple[nn.Module, Any, Any, str]:
    from kcompress.io.models import SequenceClassifier
    from kcompress.tuning.data import load_builtin

    model = SequenceClassifier(12, 64, 9)
    model.load_state_dict(torch.load(ROOT / "examples/japanese_vowels/lstm.pt", weights_only=True))
    return model, load_builtin("japanese-vowels", "train"), load_builtin("japanese-vowels", "test"), "ih,hh"


def token() -> tuple[nn.Module, Any, Any, str]:
    """The token classifier of examples/token_model, trained here (deterministic, seconds)."""
    sys.path.insert(0, str(ROOT / "examples" / "token_model"))
    from train import train_model  # type: ignore[import-not-found]

    from kcompress.tuning.data import SequenceData

    model, train, test = train_model()
    train_data = SequenceData(train["inputs"], train["targets"])
    test_data = SequenceData(test["inputs"], test["targets"])
    return model, train_data, test_data, "embedding"


MODELS: dict[str, Callable[[], tuple[nn.Module, Any, Any, str]]] = {"japanese-vowels": japanese_vowels,
                                                                     "token": token}


def file_bytes(state: dict[str, torch.Tensor]) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


def row(name: str, accuracy: float, tensors: int, file: int, dense: dict[str, int], command: str = "") -> dict:
    return {"model": name, "accuracy": round(accuracy, 4), "tensor_bytes": tensors, "file_bytes": file,
            "tensor_ratio": round(dense["tensors"] / tensors, 2),
            "file_ratio": round(dense["file"] / file, 2) if file else None,
            "command": command}


def baselines(model: nn.Module, test: Any, dense: dict[str, int]) -> list[dict]:
    rows = [row("dense fp32", evaluate(model, test), dense["tensors"], dense["file"], dense)]
    half = {k: v.half() for k, v in model.state_dict().items()}
    rounded = copy.deepcopy(model)
    rounded.load_state_dict({k: v.float() for k, v in half.items()})
    rows.append(row("fp16", evaluate(rounded, test), sum(v.numel() * 2 for v in half.values()), file_bytes(half),
                    dense))
    warnings.simplefilter("ignore")
    dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.LSTM, nn.GRU, nn.Linear},
                                                     dtype=torch.qint8)
    size = file_bytes(dynamic.state_dict())
    rows.append(row("int8 dynamic (torch)", evaluate(dynamic, test), size, size, dense))
    ours = copy.deepcopy(model)
    plan = quantization_plan(ours, "int8")
    quantize_model(ours, plan)
    rows.append(row("int8 storage alone (kcompress per-channel)", evaluate(ours, test), tensor_bytes(ours, plan),
                    0, dense))
    return rows


def compressed(model: nn.Module, train: Any, test: Any, dense: dict[str, int], fmt: str, ratio: float,
               targets: str, quantize: Any, distill: int = 0) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small, report = kcompress.compress(model, fmt, ratio=ratio, targets=targets, calibration=train,
                                           quantize=quantize, distill_epochs=distill, check_speed=False)
    with tempfile.TemporaryDirectory() as folder:
        path = kcompress.save_artifact(small, report, Path(folder) / "a.safetensors")
        size = path.stat().st_size
    name = f"{fmt} x{ratio:g}" + (f" + {quantize}" if quantize else "") + (f", distilled {distill}" if distill else "")
    command = (f"--format {fmt} --ratio {ratio:g} --targets {targets} --calibrate DATA"
               + (f" --quantize {quantize}" if quantize else "") + (f" --distill-epochs {distill}" if distill else ""))
    assert report.model_bytes_after == tensor_bytes(small, quantization_plan(small, quantize))
    return row(name, evaluate(small, test), report.model_bytes_after, size, dense, command)


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
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--distill-epochs", type=int, default=30,
                        help="also each format + int8 after this many epochs of unlabeled distillation (0: not)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, train, test, targets = MODELS[args.model]()
    model.eval()
    dense = {"tensors": tensor_bytes(model), "file": file_bytes(model.state_dict())}
    rows = baselines(model, test, dense)
    for fmt in args.formats.split(","):
        for quantize in (None, "int8"):
            rows.append(compressed(model, train, test, dense, fmt, args.ratio, targets, quantize))
            print(rows[-1], flush=True)
        if args.distill_epochs:
            rows.append(compressed(model, train, test, dense, fmt, args.ratio, targets, "int8", args.distill_epochs))
            print(rows[-1], flush=True)
    title = f"{args.model}: accuracy against bytes (ratio {args.ratio:g}, calibrated, no labels, no fine-tuning)"
    text = markdown(rows, title) + "\n" + machine_markdown()
    write_results(f"bytes_{args.model}", rows, text)
    print(text)


if __name__ == "__main__":
    main()
