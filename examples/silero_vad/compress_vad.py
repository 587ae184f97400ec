"""Compress Silero VAD's LSTM with every kcompress format and measure it on real speech, before and after a
short distillation fine-tune; int8 dynamic quantization of the same LSTM as the reference.

    python examples/silero_vad/compress_vad.py                     # registered formats (not adtn), ratios 2,4,8
    python examples/silero_vad/compress_vad.py --formats kcp,svd --ranks 16,64
    python examples/silero_vad/compress_vad.py --quick             # 1 format, 1 rank, few files (< 20 s)

The speech files (see speech.py) are split by position: every 4th file is held out for the metrics, the
others are the fine-tuning data. Only the LSTM changes: the conv front-end and the output conv are the
dense model's, frozen, so the LSTM's input features are computed once per file. Metrics over every 32 ms
chunk of the held-out files, against the dense model: speech-decision agreement (p > 0.5 on both sides)
and mean |Δp|. Fine-tuning distils the dense model's per-chunk speech probabilities into the compressed
LSTM (``kcompress.finetune(loss="distill")``, binary KL; no labels), with early stopping on a validation
fifth of the training windows.
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import pathlib
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from silero_port import CHUNK, SileroVAD
from speech import read_16k, speech_files
from torch import Tensor, nn

from kcompress import KCompressWarning, compress
from kcompress.formats import FORMATS
from kcompress.nn import executed
from kcompress.tuning.data import SequenceData
from kcompress.tuning.finetune import finetune

HERE = pathlib.Path(__file__).resolve().parent
NOT_COMPRESSIBLE = ("dense", "stack")  # registry entries that are not compression formats
#: left out of the default --formats (still available by name), and why
SLOW_FORMATS = {
    "adtn": "its Adam fit (2,000 steps by default) takes minutes per 512 x 128 matrix on 2 cores "
            "(0.07-0.2 s per step at depth 8-32)",
}
HELD_OUT_EVERY = 4  # every 4th file (by position) is a test file
WINDOW = 256  # fine-tuning windows of at most 256 chunks (8.2 s), each from a zero state
EVAL_BATCH = 64
CHECK_CHUNKS = 1000  # held-out chunks also run through the compressed LSTM's own (factorized) forward


# ---------------------------------------------------------------------- the recurrent part of the model
class RecurrentHead(nn.Module):
    """The LSTM and the output conv of :class:`SileroVAD`: features ``(B, T, 128)`` -> per-chunk outputs.

    ``forward(x, lengths=None)`` returns two-class logits ``(B, T, 2)`` = ``(0, z)`` with ``sigmoid(z)``
    the speech probability, so a softmax gives ``(1 - p, p)`` and kcompress's classification distillation
    loss is a binary KL per chunk. Steps past ``lengths`` get logits ``(0, 0)`` for student and teacher
    alike, so padding adds nothing to the loss. The output conv is frozen.
    """

    def __init__(self, lstm: nn.Module, final_conv: nn.Conv1d) -> None:
        super().__init__()
        self.lstm = lstm
        self.final_conv = copy.deepcopy(final_conv).requires_grad_(False)

    def logits(self, x: Tensor) -> Tensor:
        """``(B, T, 128)`` -> speech logits ``(B, T)`` (padding at the end does not change earlier steps)."""
        hidden, _ = self.lstm(x)
        return self.final_conv(F.relu(hidden).transpose(1, 2))[:, 0]

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        z = self.logits(x)
        if lengths is not None:
            z = z * (torch.arange(z.shape[1], device=z.device) < lengths.to(z.device)[:, None])
        return torch.stack((torch.zeros_like(z), z), dim=-1)

    def probabilities(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Speech probabilities ``(T_i,)`` of each feature sequence ``(T_i, 128)``, batched by length."""
        order = sorted(range(len(features)), key=lambda i: features[i].shape[0])
        result: list[Optional[Tensor]] = [None] * len(features)
        training = self.training
        self.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(order), EVAL_BATCH):
                    group = order[start : start + EVAL_BATCH]
                    padded = nn.utils.rnn.pad_sequence([features[i] for i in group], batch_first=True)
                    p = torch.sigmoid(self.logits(padded))
                    for row, i in enumerate(group):
                        result[i] = p[row, : features[i].shape[0]]
        finally:
            self.train(training)
        return result  # type: ignore[return-value]


def direct_check(compressed: nn.Module, final_conv: nn.Conv1d, features: Sequence[Tensor],
                 expected: Sequence[Tensor]) -> float:
    """Max |Δp| between ``expected`` and the compressed LSTM's factorized forward (products with the factors)."""
    with executed(compressed, "factorized"):
        got = RecurrentHead(compressed, final_conv).probabilities(features)
    return max(float((a - b).abs().max()) for a, b in zip(expected, got))


def lstm_parameters(lstm: nn.Module) -> int:
    """Values in the LSTM's parameters."""
    return sum(p.numel() for p in lstm.parameters())


def serialized_kib(module: nn.Module) -> float:
    """Size of ``torch.save(module.state_dict())`` in KiB (what storing the layer costs, format overhead included)."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getbuffer().nbytes / 1024


# ---------------------------------------------------------------------- data
@dataclass
class Split:
    """LSTM input features ``(T, 128)`` of the training and held-out files (from the frozen front-end)."""

    train: list[Tensor]
    test: list[Tensor]
    train_files: int
    test_files: int
    seconds: float

    @property
    def test_chunks(self) -> int:
        return sum(f.shape[0] for f in self.test)

    def check_files(self, chunks: int = CHECK_CHUNKS) -> list[int]:
        """Indices of the first held-out files holding at most ``chunks`` chunks in all (at least one)."""
        chosen, total = [], 0
        for index, feature in enumerate(self.test):
            if chosen and total + feature.shape[0] > chunks:
                break
            chosen.append(index)
            total += feature.shape[0]
        return chosen

    @property
    def check_chunks(self) -> int:
        return sum(self.test[i].shape[0] for i in self.check_files())


def load_features(port: SileroVAD, train_files: Optional[int], test_files: Optional[int]) -> Split:
    """Every speech file (or the first ``train_files``/``test_files`` of each part) through the front-end."""
    start = time.perf_counter()
    files = speech_files()
    test_paths = files[::HELD_OUT_EVERY][:test_files]
    train_paths = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY][:train_files]

    def features(paths: list[pathlib.Path]) -> list[Tensor]:
        out = []
        with torch.no_grad():
            for path in paths:
                wav = read_16k(path)
                if wav.shape[0] >= CHUNK:
                    out.append(port.features(wav)[0])
        return out

    train, test = features(train_paths), features(test_paths)
    return Split(train, test, len(train), len(test), time.perf_counter() - start)


def training_windows(features: Sequence[Tensor], window: int = WINDOW) -> SequenceData:
    """The training files cut into windows of at most ``window`` chunks; targets are dummies (distillation
    reads none)."""
    pieces = [f[i : i + window] for f in features for i in range(0, f.shape[0], window)]
    inputs = nn.utils.rnn.pad_sequence(pieces, batch_first=True)
    lengths = torch.tensor([p.shape[0] for p in pieces])
    return SequenceData(inputs, torch.zeros(len(pieces), dtype=torch.long), lengths)


# ---------------------------------------------------------------------- metrics
@dataclass
class Agreement:
    """Against the dense model over every held-out chunk."""

    agreement: float
    mean_abs_diff: float

    @classmethod
    def measure(cls, reference: Sequence[Tensor], probabilities: Sequence[Tensor]) -> "Agreement":
        ref, got = torch.cat(list(reference)), torch.cat(list(probabilities))
        return cls(float(((ref > 0.5) == (got > 0.5)).double().mean()), float((ref - got).abs().double().mean()))


@dataclass
class Row:
    """One configuration's results."""

    format: str
    rank: str
    params: int
    ratio: float
    size_kib: float
    relative_error: Optional[float]
    before: Agreement
    after: Optional[Agreement] = None
    epochs: Optional[int] = None
    best_epoch: Optional[int] = None
    seconds: float = 0.0
    direct_diff: Optional[float] = None  # max |Δp| between the reconstructed and the factorized forward
    notes: list[str] = field(default_factory=list)

    def cells(self) -> list[str]:
        def fmt(value: Optional[float], spec: str) -> str:
            return "—" if value is None else format(value, spec)

        after = self.after
        tuned = "—" if self.epochs is None else f"{self.best_epoch}/{self.epochs}"
        return [
            self.format, self.rank, f"{self.params:,}", f"{self.ratio:.1f}x", f"{self.size_kib:.0f}",
            fmt(self.relative_error, ".3f"),
            f"{self.before.agreement:.4f}", f"{self.before.mean_abs_diff:.4f}",
            fmt(after.agreement if after else None, ".4f"), fmt(after.mean_abs_diff if after else None, ".4f"),
            tuned, f"{self.seconds:.1f}",
        ]


HEADERS = ["format", "rank", "LSTM params", "ratio", "KiB", "rel. error", "agree", "mean |Δp|",
           "agree (FT)", "mean |Δp| (FT)", "FT best/epochs", "seconds"]


# ---------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Settings:
    targets: str
    epochs: int
    lr: float
    batch_size: int
    patience: Optional[int]
    temperature: float
    seed: int


def int8_row(dense: RecurrentHead, reference: list[Tensor], test: list[Tensor]) -> Row:
    """``torch.ao.quantization.quantize_dynamic`` of the LSTM (wrapped: on a bare root it does nothing)."""
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notices of torch.ao.quantization
        wrapped = torch.ao.quantization.quantize_dynamic(
            nn.Sequential(copy.deepcopy(dense.lstm)), {nn.LSTM}, dtype=torch.qint8
        )
    lstm = wrapped[0]
    if type(lstm) is nn.LSTM:
        raise RuntimeError("quantize_dynamic left the LSTM unchanged")
    head = RecurrentHead(lstm, dense.final_conv)
    before = Agreement.measure(reference, head.probabilities(test))
    params = lstm_parameters(dense.lstm)
    size = serialized_kib(lstm)
    return Row("int8 (dynamic)", "—", params, serialized_kib(dense.lstm) / size, size, None, before,
               seconds=time.perf_counter() - start)


def compressed_row(
    dense: RecurrentHead,
    fmt: str,
    rank: Optional[int],
    ratio: Optional[float],
    split: Split,
    reference: list[Tensor],
    windows: SequenceData,
    settings: Settings,
) -> Row:
    """Compress the LSTM, measure it, distil into it, measure again."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", KCompressWarning)
        lstm, report = compress(dense.lstm, format=fmt, rank=rank, ratio=ratio, targets=settings.targets,
                                seed=settings.seed, check_speed=False)
    notes = [str(w.message) for w in caught if issubclass(w.category, KCompressWarning)]
    student = RecurrentHead(lstm, dense.final_conv)  # its plan: fused kernels where they win
    probabilities = student.probabilities(split.test)
    before = Agreement.measure(reference, probabilities)
    check = split.check_files()
    targeted = [m for m in report.matrices if m.format != "dense"]
    ranks = list(dict.fromkeys(str(m.rank_used) for m in targeted))  # ih, then hh when they differ
    errors = [m.relative_error for m in targeted if m.relative_error is not None]
    params = lstm_parameters(lstm)
    row = Row(fmt, "/".join(ranks), params, lstm_parameters(dense.lstm) / params, serialized_kib(lstm),
              sum(errors) / len(errors) if errors else None, before, notes=notes)
    if settings.epochs > 0:
        result = finetune(student, windows, teacher=dense, loss="distill", epochs=settings.epochs, lr=settings.lr,
                          batch_size=settings.batch_size, patience=settings.patience,
                          temperature=settings.temperature, seed=settings.seed)
        probabilities = student.probabilities(split.test)
        row.after = Agreement.measure(reference, probabilities)
        row.epochs, row.best_epoch = len(result.history) - 1, result.best_epoch
    row.direct_diff = direct_check(lstm, dense.final_conv, [split.test[i] for i in check],
                                   [probabilities[i] for i in check])
    row.seconds = time.perf_counter() - start
    return row


def parse_list(text: Optional[str], kind: type) -> Optional[list]:
    return None if text is None else [kind(item) for item in text.split(",") if item.strip()]


def chosen_formats(requested: Optional[list[str]], console: Console) -> list[str]:
    available = [name for name in FORMATS if name not in NOT_COMPRESSIBLE]
    if requested is None:
        for name in available:
            if name in SLOW_FORMATS:
                console.print(f"[yellow]{name} left out by default: {SLOW_FORMATS[name]}; ask for it with --formats[/]")
        return [name for name in available if name not in SLOW_FORMATS]
    chosen = []
    for name in requested:
        if name.lower() in available:
            chosen.append(name.lower())
        else:
            console.print(f"[yellow]format {name!r} is not registered in this kcompress "
                          f"(registered: {', '.join(available)}); skipped[/]")
    return chosen


def table(rows: Sequence[Row], title: str) -> Table:
    result = Table(title=title)
    for header in HEADERS:
        result.add_column(header, justify="left" if header == "format" else "right", no_wrap=True)
    for row in rows:
        result.add_row(*row.cells())
    return result


def markdown_table(rows: Sequence[Row]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    align = "|" + "|".join(":---" if h == "format" else "---:" for h in HEADERS) + "|"
    return "\n".join([line(HEADERS), align] + [line(row.cells()) for row in rows])


def _max_direct(rows: Sequence[Row]) -> str:
    values = [row.direct_diff for row in rows if row.direct_diff is not None]
    return f"{max(values):.1e}" if values else "(no compressed rows)"


def write_results(path: pathlib.Path, rows: Sequence[Row], split: Split, command: str, settings: Settings,
                  dense_params: int, total_seconds: float) -> None:
    notes = sorted({note for row in rows for note in row.notes})
    run = {row.format for row in rows}
    not_run = [name for name in FORMATS if name not in NOT_COMPRESSIBLE and name not in run]
    text = f"""# Silero VAD: compressed LSTM results

Generated by `examples/silero_vad/compress_vad.py`; do not edit by hand.

```
{command}
```

- Machine: {os.cpu_count()} CPU cores ({platform.machine()}, {platform.system()}), torch {torch.__version__}
  with {torch.get_num_threads()} thread(s), Python {platform.python_version()}. Total run time {total_seconds:.0f} s.
- Model: Silero VAD 6.x TorchScript weights (`silero_vad.jit`, **MIT license**,
  https://github.com/snakers4/silero-vad), ported to plain torch (`silero_port.py`). Its `LSTM(128, 128)`
  has {dense_params:,} parameters (ih and hh matrices 512 x 128 each, plus biases); compressed with
  `targets="{settings.targets}"`, gates fused. The conv front-end and output conv are unchanged.
- Audio: Debian `asterisk-core-sounds-en-wav` (one speaker, 8 kHz prompts, **CC-BY-SA-3.0**) and
  `alsa-utils` voice samples, resampled to 16 kHz. Every {HELD_OUT_EVERY}th file (by sorted path) is held out:
  {split.test_files} test files, {split.test_chunks:,} chunks of 32 ms; {split.train_files} other files for
  fine-tuning, cut into {WINDOW}-chunk windows (a fifth of them for early stopping).
- Metrics on the held-out chunks, against the dense model: speech-decision agreement (p > 0.5) and mean
  |Δp| of the speech probability. "FT": after distillation (`kcompress.finetune`, `loss="distill"`, binary KL
  at temperature {settings.temperature:g}, Adam lr {settings.lr:g}, batch {settings.batch_size}, up to
  {settings.epochs} epochs, patience {settings.patience}; "best/epochs": epoch kept / epochs run, 0 = the
  fine-tune did not improve the validation loss).
- "ratio": LSTM parameters before/after (int8: stored bytes before/after). "KiB": `torch.save` of the LSTM's
  state dict. "rel. error": relative Frobenius error of the fitted matrices (mean over the targeted ones).
  "seconds": compress + measure + fine-tune.
- Evaluation and fine-tuning run each compressed LSTM as torch's `nn.LSTM` with the weights its factors
  reconstruct (rebuilt at every call, so gradients reach the factors): the same function as the
  `CompressedLSTM`'s own factorized forward, which is run too on the first {split.check_chunks:,} held-out
  chunks of every configuration: max |Δp| between the two {_max_direct(rows)}.

{markdown_table(rows)}
"""
    if not_run:
        reasons = "; ".join(f"{name}: {SLOW_FORMATS.get(name, 'not asked for')}" for name in not_run)
        text += f"\nRegistered formats not in this run: {reasons}.\n"
    if notes:
        text += "\nkcompress warnings:\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    path.write_text(text, encoding="utf8")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", help="comma-separated; default: every registered format but dense and "
                                          f"{', '.join(SLOW_FORMATS)} (slow to fit)")
    parser.add_argument("--ranks", help="comma-separated ranks used for every format (default: --ratios)")
    parser.add_argument("--ratios", default="2,4,8",
                        help="per-matrix compression ratios, when --ranks is not given (default 2,4,8)")
    parser.add_argument("--targets", default="ih,hh", choices=("ih", "ih,hh"),
                        help="matrices to compress (default ih,hh: the LSTM's parameters are split evenly)")
    parser.add_argument("--epochs", type=int, default=16, help="fine-tuning epochs, 0 for none (default 16)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--train-files", type=int, help="at most this many training files (default all)")
    parser.add_argument("--test-files", type=int, help="at most this many held-out files (default all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the matrices are small)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: svd at rank 16 (or the first --formats/--ranks), 40+12 files, 1 epoch")
    parser.add_argument("--no-int8", action="store_true", help="leave out the int8 reference row")
    parser.add_argument("--output", type=pathlib.Path,
                        help="Markdown results (default examples/silero_vad/results.md; not written with --quick)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console(width=None if sys.stdout.isatty() else 200)
    started = time.perf_counter()

    formats = chosen_formats(parse_list(args.formats, str), console)
    ranks, ratios = parse_list(args.ranks, int), parse_list(args.ratios, float)
    if args.quick:
        formats = formats[:1] if args.formats else ["svd"]
        ranks, ratios = (ranks or [16])[:1], None
        args.epochs = min(args.epochs, 1)
        args.train_files = args.train_files or 40
        args.test_files = args.test_files or 12
    settings = Settings(args.targets, args.epochs, args.lr, args.batch_size, args.patience, args.temperature,
                        args.seed)

    port = SileroVAD.from_jit()
    split = load_features(port, args.train_files, args.test_files)
    dense = RecurrentHead(port.lstm, port.final_conv).requires_grad_(False)
    reference = dense.probabilities(split.test)
    windows = training_windows(split.train)
    console.print(f"{split.train_files} training files ({len(windows)} windows), {split.test_files} held-out files "
                  f"({split.test_chunks:,} chunks); features in {split.seconds:.1f} s; "
                  f"dense LSTM {lstm_parameters(port.lstm):,} parameters")

    rows = [] if args.no_int8 else [int8_row(dense, reference, split.test)]
    if rows:
        console.print(f"int8 (dynamic): agreement {rows[0].before.agreement:.4f}, "
                      f"mean |Δp| {rows[0].before.mean_abs_diff:.4f}")
    for fmt in formats:
        for value in ranks or ratios:
            rank, ratio = (value, None) if ranks else (None, value)
            row = compressed_row(dense, fmt, rank, ratio, split, reference, windows, settings)
            rows.append(row)
            after = "" if row.after is None else (f" -> FT agreement {row.after.agreement:.4f}, "
                                                   f"mean |Δp| {row.after.mean_abs_diff:.4f}")
            console.print(f"{fmt} rank {row.rank} ({row.ratio:.1f}x): agreement {row.before.agreement:.4f}, "
                          f"mean |Δp| {row.before.mean_abs_diff:.4f}{after} ({row.seconds:.1f} s; "
                          f"factorized forward max |Δp| {row.direct_diff:.1e})")

    total = time.perf_counter() - started
    console.print(table(rows, f"Silero VAD LSTM (targets {args.targets}), {split.test_chunks:,} held-out chunks"))
    console.print(f"total {total:.1f} s")
    if not args.quick or args.output:
        output = args.output or HERE / "results.md"
        command = "python examples/silero_vad/compress_vad.py " + " ".join(sys.argv[1:] if argv is None else argv)
        write_results(output, rows, split, command.strip(), settings, lstm_parameters(port.lstm), total)
        console.print(f"wrote {output}")


if __name__ == "__main__":
    main()
