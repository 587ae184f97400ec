"""The KCP paper's comparison (TT, TR, BT, HT, KCP) at its setting, from kcompress's own counts.

    python benchmarks/bench_params.py

Setting (../shared/notes/papers.md §A.6): UCF11 video frames, 160x120x3 = 57,600 inputs, hidden 256, the
input-to-hidden matrix of an LSTM, tensorized as in the TT-RNN code the KCP paper's baselines reuse: in-modes
(8,20,20,18), out-modes (4,4,4,4) per gate or (16,4,4,4) with the 4 gates folded into the first mode.

Two tables. "Checks": closed forms that papers.md derives (dense 58,982,400; KCP 264·R per gate, 360·R folded;
TT ranks 4 folded 3,360) and the relations of issue 27 (BT with Tucker ranks 1 is KCP with R = N_b; TR with a
closing bond of 1 is TT), each compared with ``param_count`` and with the numel of a module's parameters.
"Comparison": parameters and multiply-accumulates per input vector of each format at the ranks the paper's
baselines use, from the closed forms (``param_count``, ``macs``) and from the MACs torch counts in an actual
``multiply`` (``FlopCounterMode``), next to the number each publication gives where one is known. The KCP
paper's own table was not available (papers.md §A.4): no number of it is reproduced. Exits non-zero on a
mismatch.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from common import markdown_table, write_results
from torch.utils.flop_counter import FlopCounterMode

from kcompress.formats import FORMATS, Factorization
from kcompress.formats.tensorize import Tensorization

PER_GATE = Tensorization(256, 57600, (4, 4, 4, 4), (8, 20, 20, 18))
FOLDED = Tensorization(1024, 57600, (16, 4, 4, 4), (8, 20, 20, 18))
DENSE = FOLDED.out_features * FOLDED.in_features

#: (label, format, modes, rank, expected parameters, where the expectation comes from)
CHECKS: list[tuple[str, str, Tensorization, Any, int, str]] = [
    ("dense W_x (LSTM)", "dense", FOLDED, 1, DENSE, "papers.md A.6"),
    *[(f"KCP per gate, R={r}", "kcp", PER_GATE, r, 264 * r, "papers.md A.6: 264·R") for r in (1, 2, 4, 8)],
    *[(f"KCP gates folded, R={r}", "kcp", FOLDED, r, 360 * r, "papers.md A.6: 360·R") for r in (1, 2, 4, 8)],
    ("TT gates folded, ranks 4", "tt", FOLDED, 4, 3_360, "papers.md A.6"),
    *[(f"BT folded, N_b={r}, Tucker ranks 1", "bt", FOLDED, [r, 1], 360 * r, f"= KCP R={r}") for r in (1, 4, 8)],
    ("TR folded, ranks [1,4,4,4]", "tr", FOLDED, [1, 4, 4, 4], 3_360, "= TT ranks 4"),
    ("TR folded, ranks 4", "tr", FOLDED, 4, 16 * 360, "Σ r² m_k n_k = 16·360"),
    ("HT folded, ranks 4", "ht", FOLDED, 4, 4 * 360 + 4 * 4 + 2 * 4**3, "leaves 4·360 + root 4·4 + 2 inner 4³"),
    ("BT folded, N_b=2, Tucker ranks 4", "bt", FOLDED, [2, 4], 2 * (4 * 360 + 4**4), "N_b(Σ r m_k n_k + r⁴)"),
]

#: (format, modes, rank, setting, published number, its source) for the comparison table
COMPARISON: list[tuple[str, Tensorization, Any, str, str, str]] = [
    ("dense", FOLDED, 1, "dense W_x", "14 million per gate", "TR-LSTM intro: 'up to 14 millions' [V]"),
    ("tt", FOLDED, 4, "TT-LSTM: ranks 4 (TT-RNN code)", "3,360 params", "Yang et al. 2017 [R: papers.md A.6]"),
    ("tr", FOLDED, 4, "TR, ranks 4 (= TT's)", "not known", "TR-LSTM (Pan et al. 2019): ranks [NF]"),
    ("tr", FOLDED, [1, 4, 4, 4], "TR, closing bond 1 (= TT)", "—", ""),
    ("bt", FOLDED, [2, 4], "BT-LSTM: N_b=2, Tucker ranks 4", "17,388x fewer", "Ye et al. 2018 abstract [V]; "
                                                                                  "config [D: reproduces it]"),
    ("bt", FOLDED, [4, 1], "BT, N_b=4, Tucker ranks 1 (= KCP R=4)", "—", ""),
    ("ht", FOLDED, 4, "HT, ranks 4 (balanced tree)", "3,132-8,808 params", "FDHT-LSTM 2021 [V], another tree"),
    ("ht", FOLDED, 8, "HT, ranks 8 (balanced tree)", "3,132-8,808 params", "FDHT-LSTM 2021 [V], another tree"),
    ("kcp", FOLDED, 1, "KCP gates folded, R=1", "278,219x", "KCP abstract [V]; its configuration is unknown, none "
                                                            "with d <= 4 gives it (papers.md A.6)"),
    *[("kcp", FOLDED, r, f"KCP gates folded, R={r}", "—", "") for r in (2, 4, 8)],
    ("kcp", PER_GATE, 1, "KCP per gate, R=1", "287,744 MACs", "papers.md A.3 [D], best mode order"),
    ("kcp", PER_GATE, 8, "KCP per gate, R=8", "—", ""),
    ("tt", PER_GATE, 4, "TT per gate, ranks 4", "3.15 M MACs", "papers.md A.3 [D], one fixed core order"),
]


def measured_macs(module: Factorization, tz: Tensorization) -> float:
    """Multiply-accumulates per vector that torch runs in ``module.multiply`` (a batch of 2 vectors)."""
    x = torch.randn(2, tz.in_features)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module.eval().multiply(x)
    return counter.get_total_flops() / 2 / x.shape[0]


def check_rows() -> tuple[list[list[Any]], list[dict[str, Any]], int]:
    table, records, failures = [], [], 0
    for label, name, tz, rank, expected, source in CHECKS:
        cls = FORMATS[name]
        formula = cls.param_count(tz, rank)
        stored = sum(p.numel() for p in cls(tz, rank).parameters())
        ok = formula == stored == expected
        failures += not ok
        ratio = tz.out_features * tz.in_features / formula
        table.append([label, f"{expected:,}", source, f"{formula:,}", f"{stored:,}", f"{ratio:,.0f}x",
                      "ok" if ok else "MISMATCH"])
        records.append({"table": "checks", "setting": label, "expected": expected, "formula": formula,
                        "stored": stored, "ok": ok})
    return table, records, failures


def comparison_rows() -> tuple[list[list[Any]], list[dict[str, Any]], int]:
    table, records, failures = [], [], 0
    torch.manual_seed(0)
    for name, tz, rank, setting, published, source in COMPARISON:
        cls = FORMATS[name]
        modes = tz if cls.factored else cls.default_tensorization(tz.out_features, tz.in_features)
        module = cls(modes, rank)
        with torch.no_grad():
            for param in module.parameters():
                param.normal_()
        params, macs, counted = module.num_params(), module.macs_per_vector(), measured_macs(module, modes)
        stored = sum(p.numel() for p in module.parameters())
        ok = params == stored and macs == counted
        failures += not ok
        dense = tz.out_features * tz.in_features
        table.append([setting, modes.describe(), f"{params:,}", f"{dense / params:,.0f}x", published, source,
                      f"{macs:,}", f"{dense / macs:,.1f}x",
                      "ok" if ok else f"MISMATCH (stored {stored:,}, counted {counted:,.0f})"])
        records.append({"table": "comparison", "format": name, "setting": setting, "rank": rank, "params": params,
                        "stored": stored, "macs": macs, "counted_macs": counted, "published": published, "ok": ok})
    return table, records, failures


def main() -> int:
    checks, check_records, check_failures = check_rows()
    comparison, comparison_records, comparison_failures = comparison_rows()
    markdown = (
        "## Parameter counts in the KCP paper's setting\n\n"
        "57,600 inputs -> 4x256 (UCF11 frames, LSTM input-to-hidden matrix), in-modes (8,20,20,18); out-modes "
        "(4,4,4,4) per gate or (16,4,4,4) with the gates folded. Command: `python benchmarks/bench_params.py`.\n\n"
        "### Checks\n\n"
        + markdown_table(["setting", "expected", "from", "kcompress param_count", "stored numel", "compression",
                          "check"], checks)
        + "\n### The paper's comparison: TT, TR, BT, HT, KCP\n\n"
        "Parameters and multiply-accumulates (MACs) per input vector from kcompress's closed forms; the check "
        "compares them with the module's stored numel and with the MACs torch counts in its `multiply` "
        "(FlopCounterMode). The KCP paper's own table was not available (papers.md A.4): the 'published' "
        "column gives what the baselines' publications state, [V] read, [R] recalled, [D] derived; "
        "'—' where nothing is published for that setting.\n\n"
        + markdown_table(["setting", "modes", "params", "compression", "published", "source", "MACs", "vs dense MACs",
                          "check"], comparison)
    )
    write_results("params", check_records + comparison_records, markdown)
    print(markdown)
    return 1 if check_failures or comparison_failures else 0


if __name__ == "__main__":
    sys.exit(main())
