"""Shared pieces of the commands: option parsers, the evaluation options and the error boundary that turns
exceptions into one-line messages and exit codes (0 ok, 1 error, 2 usage, 3 budget not met)."""

from __future__ import annotations

import functools
import traceback
from typing import Any, Callable, Optional, TypeVar, Union

import click

from ..errors import KCompressError
from ..evaluate import TASKS
from ..finetune import LOSSES
from ..formats import FORMATS
from ..sweep import DROP_TYPES, Budget, EvalSpec
from .render import echo_error, one_line

EXIT_ERROR = 1
EXIT_BUDGET = 3
#: formats a user may ask for (``dense`` is what compression replaces)
COMPRESSION_FORMATS = sorted(name for name in FORMATS if name != "dense")

F = TypeVar("F", bound=Callable[..., Any])


class CliError(click.ClickException):
    """A user-facing failure: ``kcompress: error: <message>`` on stderr, exit code 1."""

    exit_code = EXIT_ERROR

    def show(self, file: Any = None) -> None:
        echo_error(self.format_message())


def guarded(command: F) -> F:
    """Run ``command`` turning KCompressError, file errors and unexpected exceptions into a one-line
    :class:`CliError` (the traceback first with ``--debug``); click's own exits pass through."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as error:  # noqa: BLE001 - the boundary: every failure becomes one line
            if kwargs.get("debug"):
                traceback.print_exception(type(error), error, error.__traceback__)
            raise CliError(_message(error, bool(kwargs.get("debug")))) from error

    return wrapper  # type: ignore[return-value]


def _message(error: Exception, debug: bool) -> str:
    if isinstance(error, KCompressError):
        return one_line(str(error))
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    hint = "" if debug else " (rerun with --debug for the traceback)"
    return f"unexpected {type(error).__name__}: {one_line(str(error))}{hint}"


# ---------------------------------------------------------------------- parameter types
class RankType(click.ParamType):
    """``8`` -> 8; ``4,8,4`` -> [4, 8, 4] (per-bond ranks)."""

    name = "N"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Union[int, list]:
        if isinstance(value, (int, list)):
            return value
        ranks = _positive_ints(str(value), ",")
        if ranks is None:
            self.fail(f"{value!r} is not a positive integer (or a comma-separated list of them)", param, ctx)
        return ranks[0] if len(ranks) == 1 else ranks


class IntListType(click.ParamType):
    """``1,2,4`` -> [1, 2, 4] (positive integers)."""

    name = "N,N,..."

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> list[int]:
        if isinstance(value, list):
            return value
        values = _positive_ints(str(value), ",")
        if values is None:
            self.fail(f"{value!r} is not a comma-separated list of positive integers", param, ctx)
        return values


class ModesType(click.ParamType):
    """``"4,4,16x8,8,8"`` -> ([4, 4, 16], [8, 8, 8]): output modes x input modes."""

    name = "OUTxIN"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> tuple:
        if isinstance(value, tuple):
            return value
        parts = str(value).lower().split("x")
        modes = [_positive_ints(part, ",") for part in parts]
        if len(parts) != 2 or any(m is None for m in modes):
            self.fail(f"{value!r} is not OUT_MODESxIN_MODES, e.g. 4,4,16x8,8,8", param, ctx)
        return modes[0], modes[1]


class FormatListType(click.ParamType):
    """``kcp,svd`` -> ["kcp", "svd"], each a registered compression format."""

    name = "FORMAT,..."

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> list[str]:
        if isinstance(value, list):
            return value
        names = [name.strip().lower() for name in str(value).split(",") if name.strip()]
        unknown = [name for name in names if name not in COMPRESSION_FORMATS]
        if not names or unknown:
            self.fail(f"unknown format(s) {', '.join(unknown) or repr(value)}; choose from "
                      f"{', '.join(COMPRESSION_FORMATS)}", param, ctx)
        return names


def _positive_ints(text: str, sep: str) -> Optional[list[int]]:
    items = [item.strip() for item in text.split(sep)]
    if not items or not all(item.isdigit() and int(item) > 0 for item in items):
        return None
    return [int(item) for item in items]


# ---------------------------------------------------------------------- shared options
def common_options(command: F) -> F:
    """``--quiet`` and ``--debug``."""
    command = click.option("--debug", is_flag=True, help="Show tracebacks for errors.")(command)
    return click.option("-q", "--quiet", is_flag=True, help="No progress and no result table (warnings and "
                        "errors still go to stderr).")(command)


def trust_option(command: F) -> F:
    return click.option("--trust-checkpoint", is_flag=True,
                        help="Load a checkpoint that runs code when loaded (a pickled module, a TorchScript "
                             "archive): only for files you trust. State dicts and safetensors never need it.")(command)


def eval_options(command: F) -> F:
    """``--eval``, ``--task``, ``--evaluator``, ``--lower-is-better``."""
    decorators = [
        click.option("--eval", "eval_data", metavar="DATA",
                     help="Measure the metric on DATA: a built-in dataset (japanese-vowels: its test split; "
                          "fine-tuning uses its train split) or a .pt/.npz/.safetensors file with inputs, "
                          "targets and optional lengths."),
        click.option("--task", type=click.Choice(TASKS), default="classification", show_default=True,
                     help="What a data file holds: accuracy (classification) or MSE (regression) is measured."),
        click.option("--evaluator", metavar="MODULE:FUNCTION",
                     help="Your metric: FUNCTION(model) -> float from an importable module or a file.py. "
                          "With --eval DATA as well, DATA is only the fine-tuning data."),
        click.option("--lower-is-better", is_flag=True,
                     help="The --evaluator's metric is a loss (lower is better)."),
    ]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


def eval_spec(
    eval_data: Optional[str], task: str, evaluator: Optional[str], lower_is_better: bool
) -> Optional[EvalSpec]:
    """The evaluation asked for (None: none); usage errors for contradicting flags."""
    if lower_is_better and evaluator is None and task == "classification":
        raise click.UsageError("--lower-is-better describes an --evaluator's metric; accuracy is higher-is-better")
    if eval_data is None and evaluator is None:
        return None
    return EvalSpec(data=eval_data, task=task, evaluator=evaluator, lower_is_better=lower_is_better)


def budget_options(consequence: str) -> Callable[[F], F]:
    """``--max-drop`` (its help ending with ``consequence``) and ``--drop-type``."""

    def decorate(command: F) -> F:
        command = click.option("--drop-type", type=click.Choice(DROP_TYPES), default="absolute", show_default=True,
                               help="absolute: metric units; relative: a fraction of |baseline|.")(command)
        return click.option("--max-drop", type=float, metavar="D",
                            help="Accuracy budget: the largest acceptable drop of the metric from the dense "
                                 f"baseline (positive = worse, in either metric direction); {consequence}")(command)

    return decorate


def budget(max_drop: Optional[float], drop_type: str, spec: Optional[EvalSpec]) -> Budget:
    if max_drop is not None and spec is None:
        raise click.UsageError("--max-drop needs a metric: give --eval DATA or --evaluator")
    if max_drop is not None and max_drop < 0:
        raise click.UsageError("--max-drop must be at least 0")
    return Budget(max_drop, drop_type)


def finetune_options(command: F) -> F:
    """``--finetune-epochs``, ``--finetune-loss``, ``--finetune-lr``."""
    decorators = [
        click.option("--finetune-epochs", type=click.IntRange(min=0), default=0, show_default=True, metavar="N",
                     help="Fine-tune the compressed model for up to N epochs (early stopping) on the dataset's "
                          "train split or the data file."),
        click.option("--finetune-loss", type=click.Choice(LOSSES), default="distill", show_default=True,
                     help="distill: match the dense model's outputs; task: the labels; both: the sum."),
        click.option("--finetune-lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True,
                     metavar="LR", help="Adam learning rate for fine-tuning."),
    ]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


def check_finetune(epochs: int, spec: Optional[EvalSpec]) -> None:
    if epochs > 0 and (spec is None or spec.data is None):
        raise click.UsageError("--finetune-epochs needs data to train on: give --eval DATA")
