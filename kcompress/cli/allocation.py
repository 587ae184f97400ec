"""The compress command's allocation options (``--formats``, ``--allocate``, ``--params``, ``--objective``)
and how they combine with ``--rank``/``--ratio`` and ``--max-drop`` (the budget search)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import click

from kcompress.cli.options import F, FormatListType
from kcompress.config import BudgetOptions
from kcompress.config.compress import ALLOCATIONS, OBJECTIVES


def allocation_options(command: F) -> F:
    """``--formats``, ``--allocate``, ``--params``, ``--objective``."""
    decorators = [
        click.option("--formats", type=FormatListType(), metavar="FORMAT,...",
                     help="Let the allocation choose each matrix's format from these (e.g. kcp,tt,svd); implies "
                          "--allocate auto. Replaces --format."),
        click.option("--allocate", type=click.Choice(ALLOCATIONS),
                     help="uniform: --rank/--ratio for every matrix; auto: format and rank per matrix chosen to "
                          "minimise the calibrated output error within one global budget (see docs/allocation.md). "
                          "Default: auto with --formats or --params, else uniform."),
        click.option("--params", type=click.IntRange(min=1), metavar="N",
                     help="Instead of --ratio: a global budget of N parameters (MACs with --objective latency) "
                          "over the compressed matrices; implies --allocate auto."),
        click.option("--objective", type=click.Choice(OBJECTIVES), default="size", show_default=True,
                     help="What the auto budget counts: parameters (size) or MACs per input vector (latency; "
                          "then no matrix multiplies with more MACs than its dense product)."),
    ]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


@dataclass(frozen=True)
class AllocationRequest:
    """What the options ask for: the ``format`` (a name, or the names to allocate between) and the ``budget``;
    ``search`` when ``--max-drop`` is given without a size (the budget search chooses the ratio)."""

    format: Union[str, list[str]]
    budget: BudgetOptions

    @property
    def search(self) -> bool:
        return self.budget.searched

    @property
    def output_tag(self) -> str:
        """The format part of the default output name (``kcp``, or ``auto`` for an automatic allocation)."""
        return "auto" if self.budget.allocate == "auto" else str(self.format)


def allocation_request(format_: str, formats: Optional[list[str]], allocate: Optional[str], rank: Any,
                       ratio: Optional[float], params: Optional[int], objective: str,
                       max_drop: Optional[float]) -> AllocationRequest:
    """Check the combination (usage errors) and build the format and budget of the config."""
    search = max_drop is not None and rank is None and ratio is None and params is None
    if allocate is None:
        allocate = "auto" if formats or params is not None or search else "uniform"
    if allocate == "uniform":
        if params is not None or (formats and len(formats) > 1) or objective != "size":
            raise click.UsageError("--params, several --formats and --objective latency need --allocate auto")
        if search:
            raise click.UsageError("the --max-drop search (no --rank/--ratio/--params) needs --allocate auto")
        if (rank is None) == (ratio is None):
            raise click.UsageError("give exactly one of --rank N and --ratio X")
        return AllocationRequest(formats[0] if formats else format_, BudgetOptions(rank=rank, ratio=ratio))
    if rank is not None:
        raise click.UsageError("--allocate auto chooses the ranks: give --ratio X or --params N, not --rank")
    if ratio is not None and params is not None:
        raise click.UsageError("give --ratio X or --params N, not both")
    if not search and ratio is None and params is None:
        raise click.UsageError("--allocate auto needs a budget: --ratio X, --params N, or --max-drop D with an "
                               "evaluation to search one")
    return AllocationRequest(list(formats or [format_]),
                             BudgetOptions(ratio=ratio, params=params, allocate="auto", objective=objective))
