"""Silero VAD compressed as a whole: the STFT conv, the four encoder convolutions, the LSTM and the output conv
in one parameter budget (``allocate="auto"``), calibrated on a few speech files, no fine-tuning.

    python examples/silero_vad/whole_model.py                      # ratio 4, svd; a few minutes on 2 cores
    python examples/silero_vad/whole_model.py --ratio 5 --formats svd,kcp --calibration-files 40

Speech files as in ``speech.py`` (every 4th file held out for the metric, the calibration files taken from
the others). The metric is the speech-decision agreement (p > 0.5 on both sides) with the dense port over
every 32 ms chunk of the held-out files; "whole-model ratio" is all parameters before / after (biases and
the layers the allocation keeps dense included).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from silero_port import CHUNK, CONTEXT, SileroVAD
from speech import read_16k, speech_files
from torch import Tensor, nn

import kcompress

HELD_OUT_EVERY = 4
WINDOW = 32  # chunks per calibration window (1 s)


class BatchedVAD(nn.Module):
    """The port over a batch of equal-length chunk windows: ``chunks (B, T, 576)`` -> probabilities ``(B, T)``
    (the layers are the port's own, so compressing this compresses it)."""

    def __init__(self, port: SileroVAD) -> None:
        super().__init__()
        self.port = port

    def forward(self, chunks: Tensor) -> Tensor:
        batch, steps = chunks.shape[:2]
        features = self.port.encode(chunks.reshape(batch * steps, -1)).view(batch, steps, -1)
        hidden, _ = self.port.lstm(features)
        logits = self.port.final_conv(F.relu(hidden).transpose(1, 2))[:, 0]
        return torch.sigmoid(logits)


def chunked(wav: Tensor) -> Tensor:
    """``wav (T,)`` -> ``(T // 512, 576)``: each chunk with 64 samples of context, as ``SileroVAD.features``."""
    steps = wav.shape[0] // CHUNK
    return F.pad(wav[: steps * CHUNK], (CONTEXT, 0)).unfold(0, CONTEXT + CHUNK, CHUNK)


def windows(files: list, length: int = WINDOW) -> Tensor:
    """Non-overlapping windows ``(n, length, 576)`` of the files' chunks (each file's tail dropped)."""
    parts = []
    for path in files:
        chunks = chunked(read_16k(path))
        count = chunks.shape[0] // length
        parts.extend(chunks[: count * length].view(count, length, CONTEXT + CHUNK))
    return torch.stack(parts)


@torch.no_grad()
def agreement(model: nn.Module, reference: nn.Module, files: list) -> tuple[float, float, int]:
    """Decision agreement and mean |Δp| over every chunk of ``files``, and the chunk count."""
    same = total = 0
    delta = 0.0
    for path in files:
        chunks = chunked(read_16k(path)).unsqueeze(0)
        p, q = model(chunks), reference(chunks)
        same += int(((p > 0.5) == (q > 0.5)).sum())
        delta += float((p - q).abs().sum())
        total += p.numel()
    return same / total, delta / total, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=4.0, help="whole-budget ratio over the compressed matrices")
    parser.add_argument("--formats", default="svd")
    parser.add_argument("--calibration-files", type=int, default=20)
    parser.add_argument("--test-files", type=int, default=None)
    parser.add_argument("--source", default="dense", choices=("dense", "compressed"),
                        help="calibrate each layer on the dense model's inputs or on the compressed earlier layers'")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    files = speech_files()
    test = files[::HELD_OUT_EVERY][: args.test_files]
    calibration = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY][: args.calibration_files]
    dense = BatchedVAD(SileroVAD.from_jit()).eval()
    data = windows(calibration)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, report = kcompress.compress(dense, format=args.formats.split(","), ratio=args.ratio, allocate="auto",
                                           include=["*"], calibration=data, calibrate_samples=len(data),
                                           calibrate_options={"source": args.source})
    seconds = time.perf_counter() - start
    agree, delta, chunks = agreement(model, dense, test)
    print(f"calibration: {len(calibration)} files, {len(data)} windows of {WINDOW} chunks; test: {len(test)} files, "
          f"{chunks} chunks")
    for row in report.matrices:
        print(f"  {row.layer}.{row.matrix} {row.shape[0]}x{row.shape[1]}: {row.format} rank {row.rank_used}, "
              f"{row.params_before:,} -> {row.params_after:,}")
    print(f"whole model: {report.model_params_before:,} -> {report.model_params_after:,} parameters "
          f"({report.model_compression_ratio:.2f}x); agreement {agree:.4f}, mean |dp| {delta:.4f}; "
          f"compress {seconds:.0f} s")


if __name__ == "__main__":
    main()
