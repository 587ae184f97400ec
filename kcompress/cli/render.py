"""What the CLI shows: progress on stderr (rich bars on a terminal, plain lines otherwise), one-line
warnings and errors, and result tables on stdout. Colours follow rich's rules (``NO_COLOR``, ``FORCE_COLOR``)."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator, Mapping, Optional, Sequence

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from kcompress.errors import KCompressWarning, one_line
from kcompress.progress import PlainProgress, ProgressCallback, RichProgress, silent
from kcompress.progress import number as _number
from kcompress.report.text import keep_numbers_whole

PROG = "kcompress"
#: width of tables written to a file or pipe (no terminal to measure)
PIPE_WIDTH = 160


def echo_error(message: str) -> None:
    """``kcompress: error: <message>`` on one line of stderr."""
    click.echo(f"{PROG}: error: {one_line(message)}", err=True)


class Display:
    """Where a command's output goes. ``quiet`` silences progress and results (warnings and errors stay)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.err = Console(stderr=True, highlight=False)
        self.out = Console(highlight=False)
        if not self.out.is_terminal:
            self.out.width = PIPE_WIDTH

    @property
    def live(self) -> bool:
        """Rich progress bars (stderr is a terminal) rather than plain lines."""
        return not self.quiet and self.err.is_terminal

    # ------------------------------------------------------------------ stderr
    def line(self, text: str) -> None:
        """One plain progress line on stderr (nothing when quiet)."""
        if not self.quiet:
            self._stderr(text)

    def warning(self, message: str) -> None:
        self._stderr(f"{PROG}: warning: {one_line(message)}")

    def note(self, message: str) -> None:
        self._stderr(f"{PROG}: {one_line(message)}")

    def _stderr(self, text: str) -> None:
        """A line on stderr: through the rich console on a terminal, so that it goes above a live progress bar
        or spinner instead of onto its line; plainly otherwise."""
        if self.err.is_terminal:
            self.err.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            click.echo(text, err=True)

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        """A phase that shows no finer progress: a spinner on a terminal, a ``text ...`` line otherwise."""
        if self.live:
            with self.err.status(Text(text)):
                yield
        else:
            self.line(f"{text} ...")
            yield

    @contextlib.contextmanager
    def progress(self) -> Iterator[ProgressCallback]:
        """A callback rendering library progress events for the duration of the block."""
        if self.quiet:
            yield silent
        elif self.live:
            with RichProgress(self.err) as callback:
                yield callback
        else:
            yield PlainProgress(self.line)

    @contextlib.contextmanager
    def warnings_shown(self) -> Iterator[None]:
        """KCompressWarnings inside the block printed as ``kcompress: warning: ...`` lines, every one."""
        with warnings.catch_warnings():
            warnings.simplefilter("always", KCompressWarning)
            original = warnings.showwarning

            def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
                if issubclass(category, KCompressWarning):
                    self.warning(str(message))
                else:
                    original(message, category, *args, **kwargs)

            warnings.showwarning = show
            yield

    # ------------------------------------------------------------------ stdout
    def show(self, renderable: Any) -> None:
        """A rich result (a table) on stdout (nothing when quiet)."""
        if not self.quiet:
            self.out.print(renderable)

    def result(self, text: str) -> None:
        """A plain result line on stdout (nothing when quiet)."""
        if not self.quiet:
            click.echo(text)


def _rank(rank: Any) -> str:
    return ",".join(map(str, rank)) if isinstance(rank, list) else str(rank)


def times(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}×"


# ---------------------------------------------------------------------- tables
def layers_table(layers: Sequence[Mapping[str, Any]], more: int = 0) -> Table:
    """``kcompress inspect``: the layers found (``more``: how many further layers are not listed)."""
    table = Table(title="layers found", caption=f"... and {more:,} more layers (--details lists all)" if more else None)
    for header in ("layer", "type", "matrices", "params", "compressed"):
        table.add_column(header, justify="right" if header == "params" else "left")
    for layer in layers:
        matrices = ", ".join(f"{name} {rows}x{cols}" for name, (rows, cols) in layer["matrices"].items())
        table.add_row(layer["name"] or "(model)", layer["type"], matrices, f"{layer['params']:,}", layer["default"])
    return keep_numbers_whole(table)


def summary_table(title: str, rows: Sequence[Mapping[str, Any]]) -> Table:
    """``kcompress inspect``: per format and rank, the totals over a set of matrices against dense."""
    table = Table(title=title)
    for header in ("format", "rank", "params", "ratio", "MACs", "MACs ratio"):
        table.add_column(header, justify="left" if header == "format" else "right")
    previous = None
    for row in rows:
        if previous is not None and row["format"] != previous:
            table.add_section()
        previous = row["format"]
        table.add_row(row["format"], _rank(row["rank"]), f"{row['params']:,}", times(row["ratio"]),
                      f"{row['macs']:,}", times(row["macs_ratio"]))
    return keep_numbers_whole(table)


def options_table(title: str, rows: Sequence[Mapping[str, Any]]) -> Table:
    """``kcompress inspect``: one matrix's parameters and MACs per format and rank against dense."""
    table = Table(title=title)
    for header in ("format", "modes", "rank", "params", "ratio", "MACs", "MACs ratio"):
        table.add_column(header, justify="left" if header in ("format", "modes") else "right")
    previous = None
    for row in rows:
        if previous is not None and row["format"] != previous:
            table.add_section()
        previous = row["format"]
        rank = _rank(row["rank_used"])
        if row["rank_used"] != row["rank"]:
            rank = f"{_rank(row['rank'])}→{rank}"
        table.add_row(row["format"], row["modes"], rank, f"{row['params']:,}", times(row["ratio"]),
                      f"{row['macs']:,}", times(row["macs_ratio"]))
    return keep_numbers_whole(table)


def pareto_table(front: Sequence[Mapping[str, Any]], metric_name: str, drop_type: str) -> Table:
    """``kcompress sweep``: the Pareto front (compression ratio against metric) and the host that ran each trial."""
    from kcompress.runs.sweep import trial_label  # when a sweep ran: the module loads torch

    table = Table(title=f"Pareto front: compression ratio vs {metric_name}")
    headers = ("trial", "ratio", "model ratio", "MACs ratio", metric_name, "compressed", "fine-tuned",
               f"drop ({drop_type})", "max rel. error", "host")
    for header in headers:
        table.add_column(header, justify="left" if header == "trial" else "right")
    for row in front:
        table.add_row(trial_label(row["trial"]), times(row["compression_ratio"]), times(row["model_compression_ratio"]),
                      times(row["predicted_speedup"]), _number(row["metric"]), _number(row["compressed"]),
                      _number(row.get("finetuned")), _number(row.get("drop")), _number(row.get("max_relative_error")),
                      row.get("host") or "—")
    return keep_numbers_whole(table)
