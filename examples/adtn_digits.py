"""ADTN on a small classifier: scikit-learn's bundled 8x8 digits, a 64-64-10 MLP, its two Linear layers replaced.

Trains the dense MLP, then for each format (adtn, kcp, and tt when registered) fits every Linear weight to the
trained one, measures test accuracy, fine-tunes the compressed model with the task loss through autograd and
measures again. kcp and tt get the largest rank whose parameter count does not exceed adtn's per matrix.

    python examples/adtn_digits.py            # ~30-60 s on 2 cores
    python examples/adtn_digits.py --quick    # < 15 s (smoke test)

Needs scikit-learn (the digits data ships inside its wheel; nothing is downloaded).
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from typing import Optional

import torch
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from kcompress.errors import KCompressError
from kcompress.formats import Factorization, get_format
from kcompress.formats.tensorize import Tensorization


@dataclass
class Split:
    """Inputs ``(n, 64)`` scaled to [0, 1] and integer labels ``(n,)``."""

    x: Tensor
    y: Tensor


@dataclass
class Row:
    """One line of the result table."""

    label: str
    rank: str
    params: int
    fit_error: Optional[float]
    fit_accuracy: float
    tuned_accuracy: Optional[float]
    seconds: float


class FactorizedLinear(nn.Module):
    """``x -> matrix.multiply(x) + bias`` for a fitted format module ``matrix`` of shape ``(M, N)``."""

    def __init__(self, matrix: Factorization, bias: Tensor) -> None:
        super().__init__()
        self.matrix = matrix
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return self.matrix.multiply(x) + self.bias


def load_splits(seed: int) -> tuple[Split, Split]:
    """Digits (1797 images) split 80/20, stratified."""
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.2, random_state=seed, stratify=y.numpy()
    )
    return Split(x[train_idx], y[train_idx]), Split(x[test_idx], y[test_idx])


def mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def train(model: nn.Module, data: Split, epochs: int, lr: float, seed: int) -> None:
    """Adam on cross-entropy, mini-batches of 64, shuffled by a seeded generator."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(data.y), generator=generator).split(64):
            optimizer.zero_grad()
            loss_fn(model(data.x[batch]), data.y[batch]).backward()
            optimizer.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: Split) -> float:
    model.eval()
    return float((model(data.x).argmax(dim=1) == data.y).float().mean())


def linear_params(model: nn.Module) -> int:
    """Weight (or factor) parameters of the two matrix layers, biases excluded."""
    return sum(p.numel() for name, p in model.named_parameters() if not name.endswith("bias"))


def rank_within(cls: type[Factorization], tz: Tensorization, budget: int) -> int:
    """Largest rank whose parameter count is at most ``budget`` (1 when even rank 1 exceeds it)."""
    fitting = [r for r in range(1, cls.max_rank(tz) + 1) if cls.param_count(tz, r) <= budget]
    return max(fitting, default=1)


def compress(
    dense: nn.Sequential, format_name: str, ranks: list[int], options: dict, seed: int
) -> nn.Sequential:
    """A copy of ``dense`` whose Linear layers are :class:`FactorizedLinear` fitted to their weights."""
    cls = get_format(format_name)
    model = copy.deepcopy(dense)
    linears = [i for i, module in enumerate(model) if isinstance(module, nn.Linear)]
    for index, rank in zip(linears, ranks):
        layer = model[index]
        tz = cls.default_tensorization(layer.out_features, layer.in_features)
        matrix = cls.fit(layer.weight.detach(), tz, rank, seed=seed, **options)
        model[index] = FactorizedLinear(matrix, layer.bias)
    return model


def format_ranks(format_name: str, dense: nn.Sequential, budgets: list[int]) -> list[int]:
    """Per Linear layer, the largest rank of ``format_name`` within that layer's parameter budget."""
    cls = get_format(format_name)
    layers = [module for module in dense if isinstance(module, nn.Linear)]
    return [
        rank_within(cls, cls.default_tensorization(layer.out_features, layer.in_features), budget)
        for layer, budget in zip(layers, budgets)
    ]


def run_format(
    format_name: str, dense: nn.Sequential, ranks: list[int], options: dict,
    data: tuple[Split, Split], args: argparse.Namespace,
) -> Row:
    """Fit, evaluate, fine-tune and evaluate one format."""
    train_data, test_data = data
    start = time.perf_counter()
    model = compress(dense, format_name, ranks, options, args.seed)
    matrices = [m.matrix for m in model if isinstance(m, FactorizedLinear)]
    fit_error = max(m.fit_info.relative_error for m in matrices)
    fit_accuracy = accuracy(model, test_data)
    train(model, train_data, args.finetune_epochs, args.finetune_lr, args.seed)
    return Row(
        format_name, "/".join(map(str, ranks)), sum(m.num_params() for m in matrices), fit_error,
        fit_accuracy, accuracy(model, test_data), time.perf_counter() - start,
    )


def print_table(rows: list[Row], dense_params: int, skipped: list[str]) -> None:
    """Rich table; the dense row's own accuracy is under "acc fitted"; params exclude biases."""
    table = Table(
        title="digits 64-64-10 MLP, Linear layers compressed (test accuracy)",
        caption="params: matrix parameters of both layers (biases excluded); max fit err: worse layer",
    )
    for column in ("format", "rank/depth", "params", "ratio", "max fit err", "acc fitted", "acc tuned", "seconds"):
        table.add_column(column, justify="left" if column == "format" else "right")
    for row in rows:
        table.add_row(
            row.label, row.rank, str(row.params), f"{dense_params / row.params:.1f}x",
            "-" if row.fit_error is None else f"{row.fit_error:.3f}", f"{row.fit_accuracy:.3f}",
            "-" if row.tuned_accuracy is None else f"{row.tuned_accuracy:.3f}", f"{row.seconds:.1f}",
        )
    console = Console(width=110)
    console.print(table)
    for line in skipped:
        console.print(line)


def adtn_budgets(dense: nn.Sequential, adtn_ranks: list[int]) -> list[int]:
    """ADTN's parameter count per Linear layer: the budget the other formats must stay within."""
    cls = get_format("adtn")
    layers = [module for module in dense if isinstance(module, nn.Linear)]
    return [
        cls.param_count(cls.default_tensorization(layer.out_features, layer.in_features), rank)
        for layer, rank in zip(layers, adtn_ranks)
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and fit steps (< 15 s)")
    parser.add_argument("--depth", type=int, default=4, help="ADTN depth (the format's rank)")
    parser.add_argument("--finetune-lr", type=float, default=3e-3, help="Adam learning rate of fine-tuning")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny ops: 1 is fastest)")
    args = parser.parse_args()
    args.dense_epochs = 10 if args.quick else 40
    args.finetune_epochs = 3 if args.quick else 15
    args.adtn_steps = 150 if args.quick else 1500
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = load_splits(args.seed)
    start = time.perf_counter()
    dense = mlp(64)
    train(dense, data[0], args.dense_epochs, 1e-2, args.seed)
    dense_params = linear_params(dense)
    dense_row = Row("dense (reference)", "-", dense_params, None, accuracy(dense, data[1]), None, 0.0)
    dense_row.seconds = time.perf_counter() - start
    rows = [dense_row]

    adtn_ranks = [args.depth, args.depth]
    rows.append(run_format("adtn", dense, adtn_ranks, {"steps": args.adtn_steps}, data, args))
    budgets = adtn_budgets(dense, adtn_ranks)
    skipped = []
    for name in ("kcp", "tt"):
        try:
            ranks = format_ranks(name, dense, budgets)
        except KCompressError as error:
            skipped.append(f"{name}: skipped ({error})")
            continue
        rows.append(run_format(name, dense, ranks, {}, data, args))
    print_table(rows, dense_params, skipped)


if __name__ == "__main__":
    main()
