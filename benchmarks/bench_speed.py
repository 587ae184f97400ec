"""Speed of the input-to-hidden transform and of a whole LSTM forward, against dense, int8 and peers.

    python benchmarks/bench_speed.py [--quick] [--threads 1 2] [--part matrix lstm] [--shapes paper mid small]
        [--batches 1 16 128] [--seqs 16 32]

Shapes (issue 7): the KCP paper's video shape (N = 57600 -> 4·256, in-modes (8,20,20,18), gates folded
into out-modes (16,4,4,4)), a mid shape (512 -> 4·512) and a small one (128 -> 4·128). Every
kcompress format runs at the rank whose parameter count is closest to (not above) KCP rank 8, so rows
compare equal storage (bt: its number of blocks at Tucker ranks 2). Factor values are random: speed does not
depend on them (fit quality is measured in bench_fit.py). Peers: tensorly-torch FactorizedLinear (factorized
forward) and tednet TT/TR-LSTM, when installed. All candidates of one shape and batch are timed interleaved,
round by round in a rotating order (:func:`timed`), and each ratio to dense fp32 is the median of the
per-round ratios; "MAC limit" is dense MACs / the method's MACs per row (for an LSTM: input and hidden
products together), the ratio a method running at the dense GEMM's MAC rate would reach. Results:
benchmarks/results/speed.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from common import machine_markdown, markdown_table, write_results
from torch import nn

from kcompress.formats import FORMATS, Dense, Factorization
from kcompress.formats.tensorize import Tensorization, choose_tensorization
from kcompress.nn.speed import Timing, paired

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*quantiz.*")


@dataclass(frozen=True)
class Shape:
    name: str
    input_size: int
    hidden: int
    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]

    @property
    def tensorization(self) -> Tensorization:
        return Tensorization(4 * self.hidden, self.input_size, self.out_modes, self.in_modes)


def shapes() -> list[Shape]:
    mid = choose_tensorization(4 * 512, 512, order=3, out_group=4)
    small = choose_tensorization(4 * 128, 128, order=3, out_group=4)
    return [
        Shape("paper 57600->4x256", 57600, 256, (8, 20, 20, 18), (16, 4, 4, 4)),
        Shape("mid 512->4x512", 512, 512, mid.in_modes, mid.out_modes),
        Shape("small 128->4x128", 128, 128, small.in_modes, small.out_modes),
    ]


def matched_rank(cls: type[Factorization], tz: Tensorization, budget: int) -> int:
    """Largest uniform rank with at most ``budget`` parameters (at least 1)."""
    best = 1
    for rank in range(1, cls.max_rank(tz) + 1):
        if cls.param_count(tz, rank) > budget:
            break
        best = rank
    return best


def random_format(cls: type[Factorization], tz: Tensorization, rank: int) -> Factorization:
    """A format module with random factors scaled to keep activations finite."""
    module = cls(tz, rank)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, 0.3)
    return module.eval()


def kcompress_matrices(shape: Shape, kcp_rank: int = 8) -> list[tuple[str, int, nn.Module]]:
    """(label, params, module) per registered speed-relevant format at KCP-rank-8 parameter counts."""
    tz = shape.tensorization
    budget = FORMATS["kcp"].param_count(tz, kcp_rank)
    rows = []
    for name in ("kcp", "tt", "tr", "ht", "bt", "svd"):
        if name not in FORMATS:
            continue
        cls = FORMATS[name]
        ftz = cls.default_tensorization(tz.out_features, tz.in_features, out_modes=tz.out_modes, in_modes=tz.in_modes)
        rank = kcp_rank if name == "kcp" else matched_rank(cls, ftz, budget)
        module = random_format(cls, ftz, rank)
        rows.append((f"kcompress {name} r{rank}", module.num_params(), module))
    return rows


def peer_matrices(shape: Shape, budget: int) -> list[tuple[str, int, nn.Module]]:
    """tensorly-torch FactorizedLinear (cp, blocktt) with the factorized forward, near ``budget`` params."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import tltorch
    except ImportError:
        return []
    rows = []  # importing tltorch switched TensorLy's global backend to pytorch; kcompress fits pin numpy
    for factorization in ("cp", "blocktt"):
        best: Optional[nn.Module] = None
        for rank in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128):
            layer = tltorch.FactorizedLinear(
                shape.in_modes, shape.out_modes, bias=False, factorization=factorization, rank=rank,
                implementation="factorized",
            )
            if sum(p.numel() for p in layer.parameters()) > budget and best is not None:
                break
            best = layer
        assert best is not None
        with torch.no_grad():
            for param in best.parameters():
                param.normal_(0.0, 0.3)
        params = sum(p.numel() for p in best.parameters())
        rows.append((f"tltorch {factorization} r{best.rank if hasattr(best, 'rank') else '?'}", params, best.eval()))
    return rows


#: ``--clock``: ``wall`` (perf_counter) or ``cpu``, the benchmark thread's CPU time (1 thread only: on a shared
#: machine it leaves out the time spent waiting for a core, which wall time charges to whichever candidate ran)
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def timed(candidates: dict[str, Callable[[], Any]], budget: float, min_runs: int, clock: str = "wall") -> dict[str, Timing]:
    """As :func:`kcompress.nn.speed.time_interleaved` (one warm-up call each, then rounds of every candidate in turn
    until ``min_runs`` rounds and ``budget`` seconds), on ``clock``, and with the order rotated by one each round:
    a candidate that runs right after another reading the same input finds it in cache (16 rows of the paper's
    input are 3.7 MB), so a fixed order favours the later ones."""
    now = CLOCKS[clock]
    for fn in candidates.values():
        fn()
    names = list(candidates)
    samples: dict[str, list[float]] = {name: [] for name in names}
    start, rounds = time.perf_counter(), 0
    while rounds < min_runs or time.perf_counter() - start < budget:
        for name in names[rounds % len(names):] + names[: rounds % len(names)]:
            begin = now()
            candidates[name]()
            samples[name].append(now() - begin)
        rounds += 1
    return {name: _timing(values) for name, values in samples.items()}


def _timing(values: list[float]) -> Timing:
    median = statistics.median(values)
    quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [median] * 3
    return Timing(median, (quartiles[2] - quartiles[0]) / median, len(values), tuple(values))


def mac_limit(dense_macs: int, module: Any, extra_macs: int = 0) -> Optional[float]:
    """``(dense_macs + extra) / (module's MACs per row + extra)`` for a kcompress matrix, else None."""
    if not isinstance(module, Factorization):
        return None
    return round((dense_macs + extra_macs) / (module.macs_per_vector() + extra_macs), 2)


def bench_matrix(shape: Shape, batches: list[int], threads: int, clock: str = "wall") -> list[dict[str, Any]]:
    tz = shape.tensorization
    dense = nn.Linear(tz.in_features, tz.out_features, bias=False).eval()
    int8 = torch.ao.quantization.quantize_dynamic(nn.Sequential(dense), {nn.Linear}, dtype=torch.qint8)
    dense_macs = tz.out_features * tz.in_features
    candidates = [("dense fp32", dense_macs, dense), ("int8 dynamic", dense_macs, int8)]
    ours = kcompress_matrices(shape)
    candidates += ours + peer_matrices(shape, ours[0][1])
    limits = {label: 1.0 if module is dense else mac_limit(dense_macs, module) for label, _, module in candidates}
    rows = []
    for batch in batches:
        x = torch.randn(batch, tz.in_features)
        with torch.no_grad():
            times = timed({label: lambda m=module: m(x) for label, _, module in candidates}, 0.5, 3, clock)
        for label, params, _ in candidates:
            rows.append(_row("matrix", shape, label, params, batch, threads, times, limits[label]))
    return rows


def _row(part: str, shape: Shape, label: str, params: int, batch: int, threads: int, times: dict[str, Any],
         limit: Optional[float], seq: int = 1) -> dict[str, Any]:
    """One method's row: its median ms and the median of its per-round ratios to dense (the first candidate)."""
    dense = next(iter(times.values()))
    return {
        "part": part, "shape": shape.name, "method": label, "params": params, "batch": batch, "seq": seq,
        "threads": threads, "ms": round(times[label].median * 1e3, 3),
        "speedup_vs_dense": round(paired(dense, times[label]).ratio, 2), "mac_limit": limit,
    }


class _Wrapped(nn.Module):
    """quantize_dynamic swaps only children: a bare root nn.LSTM would silently stay fp32."""

    def __init__(self, lstm: nn.Module) -> None:
        super().__init__()
        self.lstm = lstm

    def forward(self, x: torch.Tensor) -> Any:
        return self.lstm(x)


def compressed_lstm(shape: Shape, dense: nn.LSTM, module: nn.Module) -> Optional[nn.Module]:
    """CompressedLSTM with ``module`` as weight_ih and dense hidden-to-hidden (None if layers are missing)."""
    try:
        from kcompress.nn import CompressedLSTM
    except ImportError:
        return None

    def build(name: str, weight: torch.Tensor, gates: int) -> nn.Module:
        if name.startswith("weight_ih"):
            return module
        return Dense.fit(weight, Dense.default_tensorization(*weight.shape), 1)

    return CompressedLSTM.from_dense(dense, build).eval()


def tednet_lstms(shape: Shape) -> list[tuple[str, nn.Module, Callable]]:
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from tednet.tnn.tensor_ring import TRLSTM
            from tednet.tnn.tensor_train import TTLSTM
            from tednet.tnn.tn_rnn import LSTMState
    except ImportError:
        return []
    hidden_modes = list(shape.out_modes)
    hidden_modes[0] //= 4
    if len(shape.in_modes) < 3:
        return []
    d = len(shape.in_modes)
    rows = []
    with contextlib.redirect_stdout(io.StringIO()):
        for label, cls, ranks in (("tednet TT-LSTM r4", TTLSTM, [4] * (d - 1)), ("tednet TR-LSTM r5", TRLSTM, [5] * (d + 1))):
            try:
                model = cls(list(shape.in_modes), hidden_modes, ranks).eval()
            except Exception:  # tednet constrains shapes (e.g. its TK2 needs 3 modes)
                continue

            def run(x: torch.Tensor, model: nn.Module = model) -> Any:
                zeros = torch.zeros(x.shape[1], shape.hidden)
                return model(x, LSTMState(zeros, zeros))

            rows.append((label, model, run))
    return rows


def bench_lstm(shape: Shape, batches: list[int], seqs: list[int], threads: int, clock: str = "wall") -> list[dict[str, Any]]:
    dense = nn.LSTM(shape.input_size, shape.hidden).eval()
    int8 = torch.ao.quantization.quantize_dynamic(_Wrapped(dense), {nn.LSTM}, dtype=torch.qint8)
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    candidates: list[tuple[str, int, Callable]] = [
        ("dense nn.LSTM", params(dense), dense),
        ("int8 dynamic", params(dense), int8),
    ]
    gates = 4 * shape.hidden
    hidden_macs = gates * shape.hidden
    limits: dict[str, Optional[float]] = {"dense nn.LSTM": 1.0}
    for label, _, module in kcompress_matrices(shape):
        lstm = compressed_lstm(shape, dense, module)
        if lstm is not None:
            candidates.append((label, params(lstm), lstm))
            limits[label] = mac_limit(gates * shape.input_size, module, hidden_macs)
    for label, model, run in tednet_lstms(shape):
        candidates.append((label, params(model), run))
    rows = []
    for seq in seqs:
        for batch in batches:
            x = torch.randn(seq, batch, shape.input_size)
            with torch.no_grad():
                times = timed({label: lambda f=fn: f(x) for label, _, fn in candidates}, 0.5, 3, clock)
            for label, count, _ in candidates:
                rows.append(_row("lstm", shape, label, count, batch, threads, times, limits.get(label), seq))
    return rows


def to_markdown(rows: list[dict[str, Any]]) -> str:
    text = "## Speed\n\n" + machine_markdown() + "\n"
    for part, title in (("matrix", "Input-to-hidden transform (one matrix, x @ W.T)"), ("lstm", "Whole LSTM forward")):
        selected = [r for r in rows if r["part"] == part]
        if not selected:
            continue
        clocks = ", ".join(sorted({str(r.get("clock", "wall")) for r in selected}))
        text += (f"\n### {title}\n\nms = median milliseconds ({clocks} clock); x = speed-up against dense fp32 in the "
                 "same run (median of per-round ratios of interleaved runs); MAC limit = dense MACs / the method's MACs."
                 "\n\n")
        table = [
            [r["shape"], r["threads"], r["seq"], r["batch"], r["method"], f"{r['params']:,}", r["ms"],
             f"{r['speedup_vs_dense']}x", "-" if r.get("mac_limit") is None else f"{r['mac_limit']}x"]
            for r in selected
        ]
        text += markdown_table(["shape", "threads", "T", "batch", "method", "params", "ms", "vs dense", "MAC limit"],
                               table)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--part", nargs="+", default=["matrix", "lstm"], choices=["matrix", "lstm"])
    parser.add_argument("--quick", action="store_true", help="small shapes and batch 16 only (smoke test)")
    parser.add_argument("--name", default=None, help="results file name (default: speed, or speed_quick)")
    parser.add_argument("--shapes", nargs="+", default=["paper", "mid", "small"], choices=["paper", "mid", "small"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--seqs", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS), help="cpu: thread CPU time (1 thread only)")
    args = parser.parse_args()
    selected = [shape for shape in shapes() if shape.name.split()[0] in args.shapes]
    selected = selected if not args.quick else [shape for shape in selected if not shape.name.startswith("paper")]
    batches = [16] if args.quick else args.batches
    seqs = [16] if args.quick else args.seqs
    rows: list[dict[str, Any]] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for shape in selected:
            clock = args.clock if threads == 1 else "wall"
            new = bench_matrix(shape, batches, threads, clock) if "matrix" in args.part else []
            new += bench_lstm(shape, batches, seqs, threads, clock) if "lstm" in args.part else []
            rows += [{**row, "clock": clock} for row in new]
            print(f"done: {shape.name}, {threads} thread(s)", flush=True)
    name = args.name or ("speed_quick" if args.quick else "speed")
    path = write_results(name, rows, to_markdown(rows))
    print(to_markdown(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
