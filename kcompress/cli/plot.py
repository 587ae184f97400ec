"""``kcompress sweep``'s plot: metric against compression ratio, one series per format, and the front."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence


def plot_pareto(rows: Sequence[Mapping[str, Any]], front: Sequence[Mapping[str, Any]], path: "os.PathLike[str] | str",
                metric_name: str) -> bool:
    """Metric against compression ratio (log x), one series per format, the front and the dense baseline;
    False (nothing written) when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        return False
    from kcompress.runs.trials import is_baseline

    figure = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for fmt in dict.fromkeys(r["trial"]["format"] for r in rows if not is_baseline(r["trial"])):
        points = sorted((r["compression_ratio"], r["metric"]) for r in rows if r["trial"]["format"] == fmt)
        axes.plot(*zip(*points), marker="o", label=fmt)
    for row in rows:
        if is_baseline(row["trial"]):
            axes.axhline(row["metric"], color="grey", linestyle="--", label="dense")
    if front:  # the best metric reachable at each compression ratio or more
        axes.plot([r["compression_ratio"] for r in front], [r["metric"] for r in front], color="black",
                  linewidth=1, drawstyle="steps-pre", label="Pareto front")
    axes.set_xscale("log")
    ratios = [r["compression_ratio"] for r in rows]
    label = FuncFormatter(lambda value, _: f"{value:g}×")
    axes.xaxis.set_major_formatter(label)
    axes.xaxis.set_minor_formatter(label if max(ratios) < 10 * min(ratios) else NullFormatter())
    axes.set_xlabel("compression ratio (compressed layers)")
    axes.set_ylabel(metric_name)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(os.fspath(path))
    return True
