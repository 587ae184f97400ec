"""The compress command's allocation options (``--formats``, ``--allocate``, ``--params``, ``--size``,
``--objective``) and how they combine with ``--rank``/``--ratio`` and ``--max-drop`` (the budget search)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

import click

from kcompress.cli.options import F, FormatListType
from kcompress.errors import KCompressError
from kcompress.names import ALLOCATIONS, OBJECTIVES, check_size

if TYPE_CHECKING:  # loaded when the command runs, not for --help
    from kcompress.config import BudgetOptions

#: the format without --format, and the formats an allocated budget chooses between without it
DEFAULT_FORMAT = "kcp"
ALLOCATED_FORMATS = ("kcp", "tt", "svd")


def allocation_options(command: F) -> F:
    """``--formats``, ``--allocate``, ``--params``, ``--size``, ``--objective``."""
    decorators = [
        click.option("--formats", type=FormatListType(), metavar="FORMAT,...",
                     help="Let the allocation choose each matrix's format from these (e.g. kcp,tt,svd); implies "
                          "--allocate auto. Replaces --format."),
        click.option("--allocate", type=click.Choice(ALLOCATIONS),
                     help="uniform: --rank/--ratio for every matrix; auto: format and rank per matrix chosen to "
                          "minimise the calibrated output error within one global budget (see docs/allocation.md). "
                          "Default: auto with --formats, --params, or --ratio and --calibrate; uniform with --rank "
                          "or without calibration data."),
        click.option("--params", type=click.IntRange(min=1), metavar="N",
                     help="Instead of --ratio: a global budget of N parameters (MACs with --objective latency) "
                          "over the compressed matrices; implies --allocate auto."),
        click.option("--size", type=SizeType(), metavar="BYTES",
                     help="Instead of --ratio: a budget for the whole artifact's tensor bytes (compressed matrices, "
                          "untouched tensors, quantization scales), e.g. 200KB, 1.5MiB (B, KB, MB, KiB, MiB). The "
                          "allocation chooses each matrix's format and rank, and the storage from --quantize "
                          "(default none,int8), with the lowest estimated error; implies --allocate auto."),
        click.option("--objective", type=click.Choice(OBJECTIVES), default="size", show_default=True,
                     help="What the auto budget counts: parameters (size) or MACs per input vector (latency; "
                          "then no matrix multiplies with more MACs than its dense product)."),
    ]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


class SizeType(click.ParamType):
    """``200KB`` -> 200000 bytes (:func:`kcompress.names.check_size`; a usage error otherwise)."""

    name = "BYTES"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> int:
        try:
            return check_size(value)
        except KCompressError as error:
            self.fail(str(error), param, ctx)


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
        """The format part of the default output name (``kcp``, or ``auto`` for an allocation asked for by
        ``--formats``, ``--params`` or ``--allocate auto``)."""
        return "auto" if self.budget.allocate == "auto" else str(self.format)


def allocation_request(format_: Optional[str], formats: Optional[list[str]], allocate: Optional[str], rank: Any,
                       ratio: Optional[float], params: Optional[int], objective: str,
                       max_drop: Optional[float], calibrated: bool = False,
                       size: Optional[int] = None) -> AllocationRequest:
    """Check the combination (usage errors) and build the format and budget of the config. Without
    ``--format`` (``format_`` None) an allocated budget chooses between :data:`ALLOCATED_FORMATS`, any other
    between :data:`DEFAULT_FORMAT`; ``calibrated``: ``--calibrate`` was given (a ratio is then allocated)."""
    from kcompress.config import BudgetOptions

    search = max_drop is not None and rank is None and ratio is None and params is None and size is None
    if allocate is None and (formats or params is not None or size is not None or search or objective != "size"
                             or (format_ is None and ratio is not None and calibrated)):
        allocate = "auto"
    if allocate is None:  # a rank; or a ratio, split by the allocation with calibration data (config.for_data)
        if (rank is None) == (ratio is None):
            raise click.UsageError("give exactly one of --rank N and --ratio X")
        return AllocationRequest(format_ or DEFAULT_FORMAT, BudgetOptions(rank=rank, ratio=ratio))
    if allocate == "uniform":
        if params is not None or size is not None or (formats and len(formats) > 1) or objective != "size":
            raise click.UsageError("--params, --size, several --formats and --objective latency need --allocate auto")
        if search:
            raise click.UsageError("the --max-drop search (no --rank/--ratio/--params) needs --allocate auto")
        if (rank is None) == (ratio is None):
            raise click.UsageError("give exactly one of --rank N and --ratio X")
        return AllocationRequest(formats[0] if formats else format_ or DEFAULT_FORMAT,
                                 BudgetOptions(rank=rank, ratio=ratio, allocate="uniform"))
    if rank is not None:
        raise click.UsageError("--allocate auto chooses the ranks: give --ratio X or --params N, not --rank")
    if sum(budget is not None for budget in (ratio, params, size)) > 1:
        raise click.UsageError("give one of --ratio X, --params N and --size BYTES")
    if size is not None and objective != "size":
        raise click.UsageError("--size counts bytes: --objective latency does not apply")
    if not search and ratio is None and params is None and size is None:
        raise click.UsageError("--allocate auto needs a budget: --ratio X, --params N, --size BYTES, or --max-drop D "
                               "with an evaluation to search one")
    return AllocationRequest(list(formats or ([format_] if format_ else ALLOCATED_FORMATS)),
                             BudgetOptions(ratio=ratio, params=params, size=size, allocate="auto", objective=objective))
