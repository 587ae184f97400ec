"""Train the token classifier of ``model.py`` on generated data and write its state dict and data files.

    python examples/token_model/train.py    # -> token_model.pt, train.pt, test.pt beside this file

The files are not in the repository (git ignores them): the run is deterministic and takes seconds.

Adam, lr 3e-3, batch 64, 6 epochs, seed 0, one torch thread (about a minute of CPU).
"""

from __future__ import annotations

import argparse
import pathlib
import time

import torch
import torch.nn.functional as F
from model import TokenClassifier, make_data  # type: ignore[import-not-found]

HERE = pathlib.Path(__file__).resolve().parent


def accuracy(model: torch.nn.Module, data: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return float((model(data["inputs"]).argmax(-1) == data["targets"]).float().mean())


def train_model(epochs: int = 6, samples: int = 8000, log: bool = False) -> tuple[TokenClassifier, dict, dict]:
    """The trained model (eval mode) and its train and test data, deterministic (seed 0, one thread)."""
    torch.manual_seed(0)
    train, test = make_data(samples, seed=1), make_data(2000, seed=2)
    model = TokenClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(epochs):
        order = torch.randperm(samples, generator=torch.Generator().manual_seed(epoch))
        model.train()
        for batch in order.split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(train["inputs"][batch]), train["targets"][batch]).backward()
            optimizer.step()
        model.eval()
        if log:
            print(f"epoch {epoch + 1}: test accuracy {accuracy(model, test):.4f}", flush=True)
    return model, train, test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--samples", type=int, default=8000)
    parser.add_argument("--output", type=pathlib.Path, default=HERE)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    model, train, test = train_model(args.epochs, args.samples, log=True)
    args.output.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.output / "token_model.pt")
    torch.save(train, args.output / "train.pt")
    torch.save(test, args.output / "test.pt")
    print(f"wrote {args.output / 'token_model.pt'} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
