"""ADTN on a CNN's convolutions, the paper's own setting at a size that runs here: scikit-learn's bundled 8x8
digits, a three-convolution CNN, its two larger convolutions compressed with ``kcompress.compress(...,
format="adtn", include=["conv2", "conv3"])``, then trained with the task loss through the ADTN gates
(the paper optimises the tensor-network tensors by automatic differentiation).

    python examples/adtn_cnn_digits.py            # ~1-2 min on 2 cores
    python examples/adtn_cnn_digits.py --quick    # smoke test

Parameter convention (stated as the paper counts, arXiv 2305.06058): only the compressed layers' weights
are counted, biases and untouched layers excluded; one ADTN of depth M on Q binary indices has
16·M·(Q−1) gate entries ("paper params"); kcompress adds one learned global scale per ADTN ("kcompress
params" = paper params + 1 per layer). SVD at the largest rank within ADTN's count is the reference row.
Needs scikit-learn (the digits ship inside its wheel; nothing is downloaded).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

import kcompress
from kcompress.formats import get_format

COMPRESSED = ("conv2", "conv3")


class CNN(nn.Module):
    """``(B, 1, 8, 8)`` -> logits ``(B, 10)``: conv 1->16, conv 16->32, pool, conv 32->64, pool, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.head = nn.Linear(64 * 2 * 2, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv1(x))
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv3(x)), 2)
        return self.head(x.flatten(1))


def splits(seed: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Digits (1797 images, ``(n, 1, 8, 8)`` in [0, 1]) split 80/20, stratified."""
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.long)
    train, test = train_test_split(list(range(len(y))), test_size=0.2, random_state=seed, stratify=y.numpy())
    return (x[train], y[train]), (x[test], y[test])


def train(model: nn.Module, data: tuple[Tensor, Tensor], epochs: int, lr: float, seed: int) -> None:
    """Adam on cross-entropy, mini-batches of 64, seeded shuffling."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(data[1]), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(data[0][batch]), data[1][batch]).backward()
            optimizer.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[Tensor, Tensor]) -> float:
    model.eval()
    return float((model(data[0]).argmax(1) == data[1]).float().mean())


def compressed_row(dense: CNN, fmt: str, ranks: dict[str, int], options: dict, data, args) -> dict:
    """Compress the two convolutions, measure, train, measure."""
    start = time.perf_counter()
    overrides = {name: {"rank": rank} for name, rank in ranks.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, report = kcompress.compress(dense, format=fmt, rank=1, include=list(COMPRESSED), overrides=overrides,
                                           fit_options=options, execution="materialized")
    fitted = accuracy(model, data[1])
    train(model, data[0], args.finetune_epochs, args.finetune_lr, args.seed)
    rows = [row for row in report.matrices if row.layer in COMPRESSED]
    params = sum(row.params_after for row in rows)
    return {"format": fmt, "rank": "/".join(str(ranks[r.layer]) for r in rows), "params": params,
            "paper_params": params - len(rows) if fmt == "adtn" else params,
            "error": max(row.relative_error for row in rows), "fitted": fitted, "tuned": accuracy(model, data[1]),
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--depth", type=int, default=4, help="ADTN depth (the format's rank)")
    parser.add_argument("--finetune-lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.finetune_epochs = 3 if args.quick else 20
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    data = splits(args.seed)
    dense = CNN()
    train(dense, data[0], 5 if args.quick else 30, 1e-2, args.seed)
    weights = {name: getattr(dense, name).weight.numel() for name in COMPRESSED}
    rows = [{"format": "dense", "rank": "-", "params": sum(weights.values()), "paper_params": sum(weights.values()),
             "error": 0.0, "fitted": accuracy(dense, data[1]), "tuned": None, "seconds": 0.0}]
    depth = {name: args.depth for name in COMPRESSED}
    rows.append(compressed_row(dense, "adtn", depth, {"steps": 150 if args.quick else 1500}, data, args))
    svd, adtn = get_format("svd"), get_format("adtn")
    svd_ranks = {}
    for name in COMPRESSED:  # SVD's parameters are rank·(M + N): the largest rank within ADTN's count
        out, inner = getattr(dense, name).weight.flatten(1).shape
        budget = adtn.param_count(adtn.default_tensorization(out, inner), args.depth)
        svd_ranks[name] = max(1, min(budget // (out + inner), svd.max_rank(svd.default_tensorization(out, inner))))
    rows.append(compressed_row(dense, "svd", svd_ranks, {}, data, args))
    table = Table(title="digits CNN, conv2 (32x16x3x3) and conv3 (64x32x3x3) compressed (test accuracy)",
                  caption="paper params: 16·M·(Q−1) per ADTN (the paper's count); params: kcompress's (+1 scale "
                          "per ADTN); biases and other layers excluded in both")
    for column in ("format", "rank/depth", "params", "paper params", "ratio", "max fit err", "acc fitted",
                   "acc trained", "seconds"):
        table.add_column(column, justify="left" if column == "format" else "right")
    for row in rows:
        table.add_row(row["format"], row["rank"], f"{row['params']:,}", f"{row['paper_params']:,}",
                      f"{rows[0]['params'] / row['paper_params']:.1f}x", f"{row['error']:.3f}", f"{row['fitted']:.3f}",
                      "-" if row["tuned"] is None else f"{row['tuned']:.3f}", f"{row['seconds']:.1f}")
    Console(width=130).print(table)


if __name__ == "__main__":
    main()
