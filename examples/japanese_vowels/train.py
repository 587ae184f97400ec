"""Train the bundled JapaneseVowels speaker classifier (LSTM or GRU, hidden 64) and save its state dict.

    python examples/japanese_vowels/train.py               # -> examples/japanese_vowels/lstm.pt
    python examples/japanese_vowels/train.py --cell gru    # -> examples/japanese_vowels/gru.pt
"""

from __future__ import annotations

import argparse
import pathlib
import time

import torch
import torch.nn.functional as F

from kcompress.io.models import SequenceClassifier
from kcompress.tuning.data import load_builtin
from kcompress.tuning.evaluate import evaluate

HERE = pathlib.Path(__file__).resolve().parent


def train(cell: str, epochs: int, seed: int, lr: float, batch_size: int) -> SequenceClassifier:
    """A ``SequenceClassifier(12, 64, 9, cell=cell)`` trained with Adam on the train split, seeded."""
    torch.manual_seed(seed)
    data = load_builtin("japanese-vowels", "train")
    model = SequenceClassifier(data.num_features, 64, 9, cell=cell)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        for (inputs, lengths), targets in data.batches(batch_size, shuffle=True, seed=seed + epoch):
            optimizer.zero_grad()
            F.cross_entropy(model(inputs, lengths), targets).backward()
            optimizer.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", choices=("lstm", "gru"), default="lstm")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it slightly)")
    parser.add_argument("--output", type=pathlib.Path, help="default: examples/japanese_vowels/<cell>.pt")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = train(args.cell, args.epochs, args.seed, args.lr, args.batch_size)
    seconds = time.perf_counter() - start
    test = load_builtin("japanese-vowels", "test")
    output = args.output or HERE / f"{args.cell}.pt"
    torch.save(model.state_dict(), output)
    print(f"{args.cell}: test accuracy {evaluate(model, test):.4f} ({len(test)} utterances), "
          f"trained in {seconds:.1f} s, saved {output} ({output.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
