"""Check the plain-torch Silero VAD port against the shipped TorchScript model on real speech.

    python examples/silero_vad/run.py --files 200     # decision agreement, max |Δp|, timings
    python examples/silero_vad/run.py --quick         # 20 files
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from silero_port import CHUNK, SileroVAD, load_reference, reference_probabilities
from speech import read_16k, speech_files


@dataclass
class Comparison:
    """Totals over the compared chunks."""

    files: int = 0
    chunks: int = 0
    agreeing: int = 0
    speech: int = 0
    max_abs_diff: float = 0.0
    sum_abs_diff: float = 0.0
    reference_seconds: float = 0.0
    port_seconds: float = 0.0

    def add(self, reference: torch.Tensor, port: torch.Tensor) -> None:
        """Count one file's ``(N,)`` probabilities."""
        diff = (reference - port).abs()
        self.files += 1
        self.chunks += reference.numel()
        self.agreeing += int(((reference > 0.5) == (port > 0.5)).sum())
        self.speech += int((reference > 0.5).sum())
        self.max_abs_diff = max(self.max_abs_diff, float(diff.max()))
        self.sum_abs_diff += float(diff.sum())

    def summary(self) -> str:
        """One line of results."""
        return (
            f"files={self.files} chunks={self.chunks} speech_fraction={self.speech / self.chunks:.3f} "
            f"decision_agreement={self.agreeing / self.chunks:.4f} max|Δp|={self.max_abs_diff:.2e} "
            f"mean|Δp|={self.sum_abs_diff / self.chunks:.2e} "
            f"time: jit {self.reference_seconds:.1f} s, port {self.port_seconds:.1f} s"
        )


def compare(count: int) -> Comparison:
    """Run both models on the first ``count`` speech files (skipping ones shorter than one chunk)."""
    reference, port = load_reference(), SileroVAD.from_jit()
    result = Comparison()
    for path in speech_files(count):
        wav = read_16k(path)
        if wav.shape[0] < CHUNK:
            continue
        start = time.perf_counter()
        expected = reference_probabilities(reference, wav)
        middle = time.perf_counter()
        actual = port.probabilities(wav)
        result.reference_seconds += middle - start
        result.port_seconds += time.perf_counter() - middle
        result.add(expected, actual)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=200, help="number of speech files (default 200)")
    parser.add_argument("--quick", action="store_true", help="20 files")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = compare(20 if args.quick else args.files)
    print(result.summary())


if __name__ == "__main__":
    main()
