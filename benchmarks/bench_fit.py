"""Fit time and relative error against rank for every format, on real trained weights and at the paper shape.

    python benchmarks/bench_fit.py [--quick] [--skip-paper]

Matrices:
* the bundled JapaneseVowels LSTM (examples/japanese_vowels/lstm.pt): weight_ih_l0 (256x12), weight_hh_l0 (256x64);
* Silero VAD's pretrained LSTM cell (silero-vad wheel, MIT): weight_ih and weight_hh (512x128 each);
* the KCP paper's shape, 1024x57600 with modes (16,4,4,4)x(8,20,20,18) (4 ALS sweeps for tt, tr, ht, bt; 20
  CP-ALS iterations for kcp and bt's KCP start; tr at ranks 4 and 8 only). No trained weights of that size
  ship with any package here, so this row uses a synthetic matrix: a sum of 16 Kronecker products with
  decaying weights plus 30 % Gaussian noise (a known low-rank structure under noise). It shows fit
  *time* at scale; its errors favour KCP by construction and say nothing about real data.

The rank of bt is its number of blocks N_b (Tucker ranks 2). Errors are ``‖W − Ŵ‖_F / ‖W‖_F`` computed
explicitly in float64. Results: benchmarks/results/fit.{json,md}.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import torch
from common import machine_markdown, markdown_table, write_results

from kcompress.formats import FORMATS
from kcompress.formats.tensorize import Tensorization

ROOT = Path(__file__).resolve().parents[1]
SPEED_FORMATS = ("kcp", "tt", "tr", "ht", "bt", "svd", "adtn")
#: ALS work at the paper shape: 4 sweeps (tt/ht's default), 20 CP-ALS iterations for KCP and BT's KCP start
PAPER_OPTIONS = {"kcp": {"max_iterations": 20}, "tr": {"max_sweeps": 4},
                 "bt": {"max_sweeps": 4, "start_iterations": 20}}


def real_matrices() -> Iterator[tuple[str, torch.Tensor, int]]:
    """(label, weight, gates) for the trained matrices available offline."""
    example = ROOT / "examples" / "japanese_vowels" / "lstm.pt"
    if example.exists():
        state = torch.load(example, weights_only=True)
        yield "JapaneseVowels LSTM weight_ih_l0", state["rnn.weight_ih_l0"], 4
        yield "JapaneseVowels LSTM weight_hh_l0", state["rnn.weight_hh_l0"], 4
    try:
        jit = torch.jit.load(str(resources.files("silero_vad.data") / "silero_vad.jit"), map_location="cpu")
    except (ImportError, FileNotFoundError, ModuleNotFoundError):
        return
    params = dict(jit.named_parameters())
    for name in ("weight_ih", "weight_hh"):
        yield f"Silero VAD LSTM {name}", params[f"_model.decoder.rnn.{name}"].detach().clone(), 4


def paper_matrix(seed: int = 0) -> torch.Tensor:
    """1024x57600: Σ_{r<16} 0.8^r ⊗_k A_r^k + Gaussian noise with ‖N‖/‖S‖ = 0.3."""
    generator = torch.Generator().manual_seed(seed)
    tz = Tensorization(1024, 57600, (16, 4, 4, 4), (8, 20, 20, 18))
    columns = [torch.randn(m * n, 16, generator=generator) for m, n in zip(tz.out_modes, tz.in_modes)]
    columns[0] = columns[0] * (0.8 ** torch.arange(16.0))
    signal = tz.unrearrange(torch.einsum("az,bz,cz,dz->abcd", *columns))
    noise = torch.randn(signal.shape, generator=generator)
    return signal + noise * (0.3 * signal.norm() / noise.norm())


def fit_rows(
    label: str, weight: torch.Tensor, gates: int, ranks: list[int], modes: Any = None,
    options: dict[str, dict[str, Any]] | None = None, formats: tuple[str, ...] = SPEED_FORMATS,
) -> list[dict[str, Any]]:
    """Fit every format at every rank; ``options`` maps a format name to its fit options."""
    options = options or {}
    rows = []
    out_features, in_features = weight.shape
    for name in formats:
        if name not in FORMATS:
            continue
        cls = FORMATS[name]
        kwargs = {"out_modes": modes[0], "in_modes": modes[1]} if modes else {"out_group": gates}
        tz = cls.default_tensorization(out_features, in_features, **kwargs)
        for rank in ranks:
            used = cls.clamp_rank(tz, rank)
            if used != rank and not isinstance(used, list):
                continue
            fitted = cls.fit(weight, tz, rank, seed=0, **options.get(name, {}))
            info = fitted.fit_info
            rows.append({
                "matrix": label, "shape": f"{out_features}x{in_features}", "format": name,
                "modes": tz.describe(), "rank": rank, "params": fitted.num_params(),
                "ratio": round(out_features * in_features / fitted.num_params(), 1),
                "relative_error": round(info.relative_error, 4), "fit_seconds": round(info.seconds, 2),
                "iterations": info.iterations,
            })
            print(f"{label} {name} r{rank}: err {info.relative_error:.4f} in {info.seconds:.2f}s", flush=True)
    return rows


def to_markdown(rows: list[dict[str, Any]]) -> str:
    table = [
        [r["matrix"], r["format"], r["modes"], r["rank"], f"{r['params']:,}", f"{r['ratio']}x", r["relative_error"], r["fit_seconds"]]
        for r in rows
    ]
    return (
        "## Fit time and error against rank\n\n" + machine_markdown() + "\n"
        + markdown_table(["matrix", "format", "modes", "rank", "params", "compression", "rel. error", "fit s"], table)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="ranks 2 and 8 on the real matrices only")
    parser.add_argument("--skip-paper", action="store_true", help="skip the 1024x57600 synthetic matrix")
    args = parser.parse_args()
    torch.set_num_threads(1)  # ADTN's many small ops slowed 100x with 2 threads on a shared machine
    ranks = [2, 8] if args.quick else [1, 2, 4, 8, 16]
    rows: list[dict[str, Any]] = []
    for label, weight, gates in real_matrices():
        rows += fit_rows(label, weight, gates, ranks, options={"adtn": {"steps": 400}},
                         formats=tuple(f for f in SPEED_FORMATS if f != "adtn" or "JapaneseVowels" in label))
    if not (args.quick or args.skip_paper):
        paper, modes = paper_matrix(), ((16, 4, 4, 4), (8, 20, 20, 18))
        # ADTN's gradient fit decodes 2^26 entries per step (minutes); TR at rank 16: 256 bond pairs per core
        rows += fit_rows("paper shape (synthetic KCP-16 + 30 % noise)", paper, 4, [4, 8, 16], modes=modes,
                         options=PAPER_OPTIONS, formats=("kcp", "tt", "ht", "bt", "svd"))
        rows += fit_rows("paper shape (synthetic KCP-16 + 30 % noise)", paper, 4, [4, 8], modes=modes,
                         options=PAPER_OPTIONS, formats=("tr",))
    path = write_results("fit_quick" if args.quick else "fit", rows, to_markdown(rows))
    print(to_markdown(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
