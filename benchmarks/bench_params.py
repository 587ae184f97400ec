"""Parameter counts in the KCP paper's setting, checked against kcompress's own counts.

    python benchmarks/bench_params.py

The expected values are derived in ../shared/notes/papers.md §A.6 for the UCF11 video shape (frames
160x120x3 = 57,600 inputs, hidden 256; Wang et al. arXiv 2008.09342 and the TT-RNN protocol):
dense W_x of an LSTM = 58,982,400; KCP per gate with modes (4,4,4,4)x(8,20,20,18) = 264·R; gates folded
(16,4,4,4) = 360·R; TT with ranks 4 and gates folded = 3,360. Each is compared with the ``param_count`` of
the format and with the numel of an actual module's parameters. Exits non-zero on a mismatch.
"""

from __future__ import annotations

import sys

from common import markdown_table, write_results

from kcompress.formats import FORMATS
from kcompress.formats.tensorize import Tensorization

PER_GATE = Tensorization(256, 57600, (4, 4, 4, 4), (8, 20, 20, 18))
FOLDED = Tensorization(1024, 57600, (16, 4, 4, 4), (8, 20, 20, 18))


def expectations() -> list[tuple[str, str, Tensorization, object, int]]:
    rows: list[tuple[str, str, Tensorization, object, int]] = [("dense W_x (LSTM)", "dense", FOLDED, 1, 58_982_400)]
    for rank in (1, 2, 4, 8):
        rows.append((f"KCP per gate, R={rank}", "kcp", PER_GATE, rank, 264 * rank))
        rows.append((f"KCP gates folded, R={rank}", "kcp", FOLDED, rank, 360 * rank))
    rows.append(("TT gates folded, ranks 4", "tt", FOLDED, 4, 3_360))
    return rows


def main() -> int:
    table, records, failures = [], [], 0
    for label, name, tz, rank, expected in expectations():
        if name not in FORMATS:
            table.append([label, f"{expected:,}", "format missing", "", "", ""])
            continue
        cls = FORMATS[name]
        formula = cls.param_count(tz, rank)
        stored = sum(p.numel() for p in cls(tz, rank).parameters())
        ok = formula == stored == expected
        failures += not ok
        ratio = f"{tz.out_features * tz.in_features / formula:,.0f}x"
        table.append([label, f"{expected:,}", f"{formula:,}", f"{stored:,}", ratio, "ok" if ok else "MISMATCH"])
        records.append({"setting": label, "expected": expected, "formula": formula, "stored": stored, "ok": ok})
    markdown = "## Parameter counts in the KCP paper's setting\n\n" + markdown_table(
        ["setting", "expected (papers.md A.6)", "kcompress param_count", "stored numel", "compression", "check"], table
    )
    write_results("params", records, markdown)
    print(markdown)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
