"""Execution paths against dense: is a compressed model ever slower than the dense one? (issue 12)

    python benchmarks/bench_exec.py [--quick] [--part grid paper distill memory] [--threads 1 2]
        [--cells lstm gru] [--hidden 128 256 512 1024] [--batch 1 16 128] [--formats kcp tt ht svd adtn]
        [--ratios 2 4 16] [--budget 0.3]

* ``grid``: LSTM/GRU(H, H), T = 32, both recurrent matrices compressed (random factors at the rank of the
  ratio; the dense baseline holds the reconstructed weights, so both compute the same function and
  value-dependent costs such as denormals match), execution planned with ``set_execution(model, "auto")``;
  forward (no grad) and one training step (forward + backward through ``kcompress.nn.trained``, the
  path fine-tuning takes), each timed interleaved with dense ``nn.LSTM``/``nn.GRU`` of the same run
  (:func:`kcompress.nn.speed.time_interleaved`: medians within a time budget, interquartile spread).
* ``paper``: the KCP paper shape (57,600 -> 4x256, W_ih as KCP rank 8, modes of bench_speed.py, T = 16) at
  batch 1, 16, 128: the input transform alone (``x @ W_ih.T`` on the T·batch rows) and the whole-LSTM forward,
  KCP on the kernel ``auto`` picks (the GEMM chain) and on the previous one (``algorithm="rank_batch"``),
  against dense fp32 and int8 dynamic quantization, all four interleaved; with the MAC-limited ratio (dense
  MACs / KCP MACs, input and hidden products together for the LSTM) beside the measured one.
* ``distill``: one distillation epoch (``kcompress.finetune``, validation passes included) over the bundled
  JapaneseVowels training set, student KCP x8 (``targets="ih,hh"``) against the same epoch with a dense
  student; alternating, median of 3 after a warm-up round.
* ``memory``: peak resident memory of one forward, each in a fresh subprocess (``ru_maxrss`` above the
  memory held before the forward): a 2-layer char-LSTM 100->128->128 over 8,000 x 40 steps (KCP/TT/SVD x4,
  auto plan and all factorized) and LSTM(512, 512) at T = 32, batch 128.

Results: benchmarks/results/exec.{json,md} (``--name`` to change). Nothing here is asserted by the tests.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any, Callable

import torch
from common import machine_markdown, markdown_table, write_results
from torch import nn

from kcompress import KCompressError, set_execution
from kcompress.formats import FORMATS
from kcompress.nn import COMPRESSED_TYPES
from kcompress.nn.speed import Speed, Timing, paired, time_interleaved

warnings.filterwarnings("ignore")
CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}
STEPS = 32


# ---------------------------------------------------------------------- models
def random_matrix(fmt: str, weight: torch.Tensor, gates: int, ratio: float) -> nn.Module:
    """``fmt`` at the rank of ``ratio`` for ``weight``'s shape, random factors scaled so W has entries ~0.1."""
    cls = FORMATS[fmt]
    tz = cls.default_tensorization(*weight.shape, out_group=gates)
    module = cls(tz, cls.rank_for_ratio(tz, ratio))
    params = dict(module.named_parameters())
    linear = params.get("scale") or next(iter(params.values()))  # W is linear in this one
    with torch.no_grad():
        for param in params.values():
            param.normal_(0.0, 0.3) if param is not params.get("scale") else param.fill_(1.0)
        norm = float(torch.linalg.norm(module.reconstruct()))
        linear.mul_(0.1 * (weight.numel() ** 0.5) / max(norm, 1e-12))
    return module.eval()


def compressed_rnn(dense: nn.Module, fmt: str, ratio: float) -> nn.Module:
    """The drop-in for ``dense`` with every matrix in ``fmt`` at ``ratio`` (a copy; ``dense`` untouched)."""
    return COMPRESSED_TYPES[type(dense)].from_dense(dense, lambda name, w, g: random_matrix(fmt, w, g, ratio))


def plan_text(model: nn.Module, batch: int) -> str:
    """The layer path(s) auto chose, e.g. ``fused`` or ``loop (ih F, hh M)``, at ``batch``."""
    parts = []
    for index in range(model.num_layers):
        path = model.layer_path(index, batch)
        if path != "fused":
            ih = model.execution[f"weight_ih_l{index}"][0].upper()
            hh = model.execution[f"weight_hh_l{index}"][0].upper()
            path += f" (ih {ih}, hh {hh})"
        parts.append(path)
    return "; ".join(parts)


def training_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        output = model(x)[0]
        output.square().mean().backward()

    return step


def interleaved(dense: Callable[[], Any], compressed: Callable[[], Any], budget: float,
                min_runs: int = 5) -> tuple[Timing, Speed]:
    """The dense timing and ``dense / compressed`` from per-round ratios (median, spread)."""
    times = time_interleaved({"dense": dense, "compressed": compressed}, budget=budget, min_runs=min_runs)
    return times["dense"], paired(times["dense"], times["compressed"])


# ---------------------------------------------------------------------- parts
def bench_grid(args: argparse.Namespace, threads: int) -> list[dict[str, Any]]:
    from kcompress.nn import trained

    rows = []
    for cell, hidden, fmt, ratio in ((c, h, f, r) for c in args.cells for h in args.hidden for f in args.formats
                                     for r in args.ratios):
        torch.manual_seed(0)
        dense = CELLS[cell](hidden, hidden)
        try:
            model = compressed_rnn(dense, fmt, ratio)
        except KCompressError as error:
            print(f"skip {cell} H={hidden} {fmt} x{ratio}: {error}", flush=True)
            continue
        with torch.no_grad():  # the dense baseline computes the same function: value-dependent kernel costs match
            for name, matrix in model.matrices.items():
                getattr(dense, name).copy_(matrix.reconstruct())
        started = time.perf_counter()
        set_execution(model, "auto")
        plan_seconds = time.perf_counter() - started
        for batch in args.batch:
            x = torch.randn(STEPS, batch, hidden)
            with torch.no_grad():
                d_fwd, c_fwd = interleaved(lambda: dense(x), lambda: model(x), args.budget)
            train = {"train_x": None, "train_spread": None, "dense_train_ms": None}
            if fmt in args.train_formats:
                with trained(model):
                    d_train, c_train = interleaved(training_step(dense, x), training_step(model, x), args.budget)
                train = {"dense_train_ms": round(d_train.median * 1e3, 3), "train_x": round(c_train.ratio, 2),
                         "train_spread": round(c_train.spread, 2)}
            rows.append({
                "part": "grid", "cell": cell, "hidden": hidden, "batch": batch, "format": fmt, "ratio": ratio,
                "threads": threads, "auto": plan_text(model, batch), "plan_s": round(plan_seconds, 2),
                "dense_fwd_ms": round(d_fwd.median * 1e3, 3), "fwd_x": round(c_fwd.ratio, 2),
                "fwd_spread": round(c_fwd.spread, 2), **train,
            })
            print(_grid_line(rows[-1]), flush=True)
            args.save(rows)
    return rows


def _grid_line(r: dict[str, Any]) -> str:
    return (f"{r['cell']} H={r['hidden']} B={r['batch']} {r['format']} x{r['ratio']} t{r['threads']}: "
            f"fwd {_speed(r['fwd_x'], r['fwd_spread'])}, train {_speed(r['train_x'], r['train_spread'])} "
            f"[{r['auto']}]")


def _speed(ratio: Any, spread: Any) -> str:
    return "not measured" if ratio is None else f"{ratio}x ±{spread:.0%}"


def paper_models(shape: Any) -> dict[str, Any]:
    """Dense LSTM and input matrix, their int8 versions, and KCP rank 8 on the chain and on ``rank_batch``
    (the same factors), each as the matrix and as the LSTM with that W_ih (auto plan)."""
    from bench_speed import _Wrapped, compressed_lstm, kcompress_matrices

    torch.manual_seed(0)
    dense = nn.LSTM(shape.input_size, shape.hidden).eval()
    linear = nn.Linear(shape.input_size, 4 * shape.hidden, bias=False).eval()
    with torch.no_grad():
        linear.weight.copy_(dense.weight_ih_l0)
    kcp = next(module for label, _, module in kcompress_matrices(shape) if label.startswith("kcompress kcp"))
    previous = FORMATS["kcp"](kcp.tensorization, kcp.rank, algorithm="rank_batch").eval()
    previous.load_state_dict(kcp.state_dict())
    lstms = {name: compressed_lstm(shape, dense, matrix) for name, matrix in (("kcp", kcp), ("previous", previous))}
    for model in lstms.values():
        set_execution(model, "auto")
    quantize = torch.ao.quantization.quantize_dynamic
    return {"matrix": {"dense": linear, "int8": quantize(nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8),
                       "kcp": kcp.multiply, "previous": previous.multiply},
            "lstm": {"dense": dense, "int8": quantize(_Wrapped(dense), {nn.LSTM}, dtype=torch.qint8), **lstms},
            "macs": (4 * shape.hidden * shape.input_size, kcp.macs_per_vector(), 4 * shape.hidden * shape.hidden)}


def bench_paper(args: argparse.Namespace, threads: int) -> list[dict[str, Any]]:
    from bench_speed import shapes, timed

    shape = shapes()[0]
    models = paper_models(shape)
    dense_macs, kcp_macs, hidden_macs = models["macs"]
    limits = {"matrix": dense_macs / kcp_macs, "lstm": (dense_macs + hidden_macs) / (kcp_macs + hidden_macs)}
    rows = []
    for batch in args.paper_batch:
        x = torch.randn(16, batch, shape.input_size)
        inputs = x.reshape(-1, shape.input_size)
        for part, data in (("matrix", inputs), ("lstm", x)):
            clock = args.clock if threads == 1 else "wall"
            with torch.no_grad():
                times = timed({k: lambda f=f: f(data) for k, f in models[part].items()}, args.budget,
                              3 if batch >= 128 else 5, clock)
            rows.append({**_paper_row(part, batch, threads, times, limits[part], plan_text(models["lstm"]["kcp"], batch)),
                         "clock": clock})
            print(rows[-1], flush=True)
    return rows


def _paper_row(part: str, batch: int, threads: int, times: dict[str, Timing], limit: float, auto: str) -> dict[str, Any]:
    kcp_vs_dense = paired(times["dense"], times["kcp"])
    return {"part": "paper", "what": part, "batch": batch, "rows": 16 * batch, "threads": threads, "auto": auto,
            **{f"{k}_ms": round(t.median * 1e3, 2) for k, t in times.items()},
            "kcp_vs_dense": round(kcp_vs_dense.ratio, 1), "mac_limit": round(limit, 1),
            "of_limit": round(kcp_vs_dense.ratio / limit, 2),
            "kcp_vs_int8": round(paired(times["int8"], times["kcp"]).ratio, 1),
            "kcp_vs_previous": round(paired(times["previous"], times["kcp"]).ratio, 2),
            "spread": round(max(t.spread for t in times.values()), 2)}


def bench_distill(args: argparse.Namespace, threads: int) -> list[dict[str, Any]]:
    from kcompress import compress, finetune, load_builtin
    from kcompress.io.models import SequenceClassifier

    data = load_builtin("japanese-vowels", "train")
    torch.manual_seed(0)
    teacher = SequenceClassifier(12, 64, 9)
    student, _ = compress(teacher, "kcp", ratio=8, targets="ih,hh", check_speed=False)
    set_execution(student, "auto")
    students = {"dense": copy.deepcopy(teacher), "kcp x8": student}
    samples: dict[str, list[float]] = {label: [] for label in students}
    for repeat in range(4):  # alternating; the first round is a warm-up and is dropped
        for label, model in students.items():
            started = time.perf_counter()
            finetune(model, data, teacher=teacher, loss="distill", epochs=1, patience=None, seed=0)
            if repeat:
                samples[label].append(time.perf_counter() - started)
    seconds = {label: statistics.median(values) for label, values in samples.items()}
    row = {"part": "distill", "threads": threads, "dense_s": round(seconds["dense"], 2),
           "kcp_s": round(seconds["kcp x8"], 2), "slowdown": round(seconds["kcp x8"] / seconds["dense"], 2)}
    print(row, flush=True)
    return [row]


MEMORY_CASES = {
    "charlm 8000x40": ("lstm", 100, 128, 2, 8000, 40),
    "lstm512 B128": ("lstm", 512, 512, 1, 128, STEPS),
}


def memory_child(case: str, fmt: str) -> dict[str, Any]:
    """In a fresh process: build the case, then one forward; MB of peak RSS above the RSS before it.
    ``fmt``: ``"dense"``, a format (auto plan, closed forms only) or ``"format/factorized"``."""
    fmt, _, plan = fmt.partition("/")
    cell, features, hidden, layers, batch, steps = MEMORY_CASES[case]
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = CELLS[cell](features, hidden, num_layers=layers, batch_first=True)
    if fmt != "dense":
        model = compressed_rnn(model, fmt, 4.0)
        set_execution(model, plan or "auto", measure=False)
    x = torch.randn(batch, steps, features)
    with open("/proc/self/statm") as handle:
        before = int(handle.read().split()[1]) * resource.getpagesize() / 2**20
    with torch.no_grad():
        model(x)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"case": case, "format": f"{fmt}/{plan or 'auto'}", "forward_mb": round(max(peak - before, 0.0), 1)}


def bench_memory(args: argparse.Namespace, threads: int) -> list[dict[str, Any]]:
    rows = []
    for case in MEMORY_CASES:
        results = {}
        chosen = [f for f in ("kcp", "tt", "svd") if f in args.formats]
        for fmt in ["dense"] + chosen + [f"{f}/factorized" for f in chosen]:
            command = [sys.executable, __file__, "--memory-child", case, fmt]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results[fmt] = json.loads(output.strip().splitlines()[-1])["forward_mb"]
        for fmt, mb in results.items():
            rows.append({"part": "memory", "case": case, "format": fmt, "threads": 1, "forward_mb": mb,
                         "vs_dense": round(mb / max(results["dense"], 1e-9), 2)})
            print(rows[-1], flush=True)
    return rows


# ---------------------------------------------------------------------- output
def to_markdown(rows: list[dict[str, Any]]) -> str:
    parts = ", ".join(dict.fromkeys(r["part"] for r in rows))
    text = f"## Execution paths (issue 12): {parts}\n\n" + machine_markdown() + "\n"
    grid = [r for r in rows if r["part"] == "grid"]
    if grid:
        text += ("\n### Grid: compressed (auto plan) vs dense nn.LSTM/nn.GRU, T = 32\n\n"
                 "x = dense time / compressed time (> 1: faster): median of the per-round ratios of interleaved "
                 "runs in the same process, ± their interquartile spread. Training step = forward + backward on "
                 "the fine-tuning path.\n\n")
        table = [[r["cell"], r["hidden"], r["batch"], r["format"], r["ratio"], r["threads"], r["dense_fwd_ms"],
                  _speed(r["fwd_x"], r["fwd_spread"]), _speed(r["train_x"], r["train_spread"]), r["auto"]]
                 for r in grid]
        text += markdown_table(["cell", "H", "batch", "format", "ratio", "threads", "dense fwd ms", "forward",
                                "train step", "auto chose"], table)
        worst_fwd = min(grid, key=lambda r: r["fwd_x"])
        trained = [r for r in grid if r["train_x"] is not None]
        met = "met" if worst_fwd["fwd_x"] >= 0.9 else "NOT met"
        text += f"\nForward >= 0.9x in every cell: {met} (worst {_grid_line(worst_fwd)}).\n"
        if trained:
            worst_train = min(trained, key=lambda r: r["train_x"])
            text += (f"Training step >= 0.7x: {'met' if worst_train['train_x'] >= 0.7 else 'NOT met'} "
                     f"(worst {_grid_line(worst_train)}).\n")
    paper = [r for r in rows if r["part"] == "paper"]
    if paper:
        text += ("\n### KCP paper shape (57,600 -> 4x256, rank 8, T = 16): input transform and whole-LSTM forward\n\n"
                 "matrix = `x @ W_ih.T` on the 16·batch input rows; lstm = the whole forward. kcp = KCP on the kernel "
                 "auto picks (the GEMM chain), previous = the same factors on `algorithm=\"rank_batch\"`; ratios are "
                 "medians of per-round ratios of the four interleaved; MAC limit = dense MACs / KCP MACs; of limit = "
                 "kcp vs dense / MAC limit (the KCP product's MAC rate as a fraction of dense fp32's). Clock: "
                 f"{', '.join(sorted({str(r.get('clock', 'wall')) for r in paper}))} (cpu = the benchmark thread's CPU "
                 "time, 1 thread only).\n\n")
        table = [[r["what"], r["batch"], r["rows"], r["threads"], r["dense_ms"], r["int8_ms"], r["kcp_ms"],
                  r["previous_ms"], f"{r['kcp_vs_dense']}x", f"{r['mac_limit']}x", f"{r['of_limit']:.0%}",
                  f"{r['kcp_vs_int8']}x", f"{r['kcp_vs_previous']}x", f"{r['spread']:.0%}", r["auto"]] for r in paper]
        text += markdown_table(["part", "batch", "rows", "threads", "dense ms", "int8 ms", "kcp ms", "previous ms",
                                "kcp vs dense", "MAC limit", "of limit", "kcp vs int8", "kcp vs previous",
                                "max spread", "auto chose"], table)
    distill = [r for r in rows if r["part"] == "distill"]
    if distill:
        text += "\n### Distillation epoch, JapaneseVowels train set (LSTM(12, 64), 9 classes)\n\n"
        text += markdown_table(["threads", "dense student s", "kcp x8 student s", "kcp / dense"],
                               [[r["threads"], r["dense_s"], r["kcp_s"], f"{r['slowdown']}x"] for r in distill])
    memory = [r for r in rows if r["part"] == "memory"]
    if memory:
        text += "\n### Peak memory of one forward (MB above the process before it; fresh process each)\n\n"
        text += markdown_table(["case", "format x4 / plan", "forward MB", "vs dense"],
                               [[r["case"], r["format"], r["forward_mb"], f"{r['vs_dense']}x"] for r in memory])
    return text


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--memory-child":
        print(json.dumps(memory_child(sys.argv[2], sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", default=["grid", "paper", "distill", "memory"],
                        choices=["grid", "paper", "distill", "memory"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--cells", nargs="+", default=["lstm", "gru"], choices=list(CELLS))
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--paper-batch", type=int, nargs="+", default=[1, 16, 128])
    parser.add_argument("--formats", nargs="+", default=["kcp", "tt", "ht", "svd", "adtn"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[2, 4, 16])
    parser.add_argument("--train-formats", nargs="+", default=["kcp", "tt", "ht", "svd", "adtn"],
                        help="formats whose training step is measured (an ADTN step decodes W: seconds at H=512)")
    parser.add_argument("--budget", type=float, default=0.3, help="seconds of interleaved timing per comparison")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="paper part: cpu = the benchmark thread's CPU time (1 thread only; a shared machine)")
    parser.add_argument("--quick", action="store_true",
                        help="H 128/256, batch 1/16, ratio 4, 1 thread, paper at batch 16 (minutes, not hours)")
    parser.add_argument("--name", default=None, help="results file name (default: exec, or exec_quick)")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.batch, args.ratios, args.threads, args.paper_batch = [128, 256], [1, 16], [4], [1], [16]
        args.budget = min(args.budget, 0.2)
    parts = {"grid": bench_grid, "paper": bench_paper, "distill": bench_distill, "memory": bench_memory}
    name = args.name or ("exec_quick" if args.quick else "exec")
    rows: list[dict[str, Any]] = []
    args.save = lambda more: write_results(name, rows + more, to_markdown(rows + more))  # partial results kept
    for threads in args.threads:
        torch.set_num_threads(threads)
        for part in args.part:
            if part == "memory" and threads != args.threads[0]:
                continue  # one thread in the child processes
            rows += parts[part](args, threads)
    path = write_results(name, rows, to_markdown(rows))
    print(to_markdown(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
