"""Shared pieces of the commands: option parsers, the evaluation options and the error boundary that turns
exceptions into one-line messages and exit codes (0 ok, 1 error, 2 usage, 3 budget not met)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import traceback
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar, Union

import click

from kcompress.cli.render import echo_error
from kcompress.cli.signals import interruption, terminations_interrupt
from kcompress.errors import KCompressError, one_line
from kcompress.names import (
    COMPRESSION_FORMATS,
    DEFAULT_LR,
    DEFAULT_SAMPLES,
    DROP_TYPES,
    LOSSES,
    RECOVERY_EPOCHS,
    TASKS,
    check_targets,
)

if TYPE_CHECKING:  # the commands' modules stay free of torch until a command runs (fast --help)
    from kcompress.tuning.evaluate import Budget, EvalSpec

EXIT_ERROR = 1
#: the fraction of an --eval data file held out for scoring when the same file is also fine-tuned on
HOLDOUT = 0.2
EXIT_BUDGET = 3

F = TypeVar("F", bound=Callable[..., Any])


class CliError(click.ClickException):
    """A user-facing failure: ``kcompress: error: <message>`` on stderr, exit code 1."""

    exit_code = EXIT_ERROR

    def show(self, file: Any = None) -> None:
        echo_error(self.format_message())


def guarded(command: F) -> F:
    """Run ``command`` turning KCompressError, file errors and unexpected exceptions into a one-line
    :class:`CliError` (the traceback first with ``--debug``), and SIGINT/SIGTERM into one line and exit code
    128 + the signal's number; click's own exits pass through."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with terminations_interrupt():
                return command(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM/SIGHUP (see kcompress.cli.signals)
            message, code = interruption(error)
            echo_error(message)
            raise click.exceptions.Exit(code) from None
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
#: ``--seed``: what numpy's and torch's generators take
SEED = click.IntRange(0, 2**32 - 1)
#: ``--order``: modes of at least 2 make higher orders pointless for real layers (and fits explode)
ORDER = click.IntRange(1, 8)


class FiniteFloat(click.FloatRange):
    """A :class:`click.FloatRange` that also refuses ``nan`` and ``±inf`` (a usage error, exit 2)."""

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class RateType(click.ParamType):
    """``auto`` or a positive finite number (a learning rate)."""

    name = "LR|auto"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        if value == "auto" or isinstance(value, float):
            return value
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and number > 0):
            self.fail(f"{value!r} is not a positive number or 'auto'", param, ctx)
        return number


class EpochsType(click.ParamType):
    """``auto`` or an integer >= 0 (epochs)."""

    name = "N|auto"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        if not str(value).isdigit():
            self.fail(f"{value!r} is not a number of epochs (an integer >= 0) or 'auto'", param, ctx)
        return int(value)


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


class FitOptionType(click.ParamType):
    """``key=value`` -> ``(key, value)``; the value is read as JSON when it parses (``50``, ``1e-6``, ``true``,
    ``[0,2,1]``), as a string otherwise (``init=random``). The format checks keys and values."""

    name = "KEY=VALUE"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> tuple:
        if isinstance(value, tuple):
            return value
        key, sep, text = str(value).partition("=")
        if not sep or not key.strip():
            self.fail(f"{value!r} is not KEY=VALUE, e.g. max_iterations=50", param, ctx)
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        return key.strip(), parsed


def fit_option(command: F) -> F:
    """``--fit-option KEY=VALUE`` (repeatable): the format's options (``compress(fit_options=...)``)."""
    return click.option("--fit-option", "fit_option", type=FitOptionType(), multiple=True,
                        help="An option of the format, e.g. max_iterations=50 (kcp), max_sweeps=8 (tt, ht, tr, bt), "
                             "steps=1000 (adtn); repeatable. Unknown keys are refused with the allowed ones "
                             "(docs/cli.md lists them).")(command)


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


def model_option(command: F) -> F:
    """``--model FILE.py:CLASS``: the user's own module, built and given the checkpoint's weights."""
    return click.option("--model", "model_class", metavar="MODULE:CLASS",
                        help="Your model class (from an importable module or a file.py), constructible without "
                             "arguments: CLASS() is given the checkpoint's weights, so --eval and --evaluator "
                             "run your own forward.")(command)


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
    from kcompress.tuning.evaluate import EvalSpec

    return EvalSpec(data=eval_data, task=task, evaluator=evaluator, lower_is_better=lower_is_better)


def budget_options(consequence: str) -> Callable[[F], F]:
    """``--max-drop`` (its help ending with ``consequence``) and ``--drop-type``."""

    def decorate(command: F) -> F:
        command = click.option("--drop-type", type=click.Choice(DROP_TYPES), default="absolute", show_default=True,
                               help="absolute: metric units; relative: a fraction of |baseline|.")(command)
        return click.option("--max-drop", type=FiniteFloat(min=0), metavar="D",
                            help="Accuracy budget: the largest acceptable drop of the metric from the dense "
                                 f"baseline (positive = worse, in either metric direction); {consequence}")(command)

    return decorate


def budget(max_drop: Optional[float], drop_type: str, spec: Optional[EvalSpec]) -> Budget:
    if max_drop is not None and spec is None:
        raise click.UsageError("--max-drop needs a metric: give --eval DATA or --evaluator")
    if max_drop is not None and max_drop < 0:
        raise click.UsageError("--max-drop must be at least 0")
    from kcompress.tuning.evaluate import Budget

    return Budget(max_drop, drop_type)


def finetune_options(command: F) -> F:
    """``--finetune-epochs``, ``--finetune-loss``, ``--finetune-lr``."""
    decorators = [
        click.option("--finetune-epochs", type=EpochsType(), default="auto", show_default=True, metavar="N",
                     help="Fine-tune the compressed model for up to N epochs (early stopping) on the dataset's "
                          f"train split, or on a data file less the seeded {HOLDOUT:.0%} held out for scoring; "
                          f"auto: only when --max-drop still fails after distillation and there are labels to "
                          f"train on apart from the scored data (a built-in dataset's train split, "
                          f"--finetune-data), up to {RECOVERY_EPOCHS} epochs; 0: never."),
        click.option("--finetune-loss", type=click.Choice(LOSSES), default="distill", show_default=True,
                     help="distill: match the dense model's outputs; task: the labels; both: the sum."),
        click.option("--finetune-lr", type=RateType(), default=DEFAULT_LR, show_default=True,
                     metavar="LR", help="Adam learning rate for fine-tuning; auto: fine-tune at 0.001 and at 0.01 "
                                        "and keep the one with the better held-out metric."),
    ]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


def calibration_options(command: F) -> F:
    """``--calibrate``, ``--calibrate-samples``, ``--distill-epochs``, ``--distill-lr``."""
    decorators = [
        click.option("--calibrate", "calibrate_data", metavar="DATA",
                     help="Fit each matrix to what it computes on these unlabeled inputs (see docs/calibration.md): "
                          "a built-in dataset (its train split) or a .pt/.npz/.safetensors file with inputs and "
                          "optional lengths (targets not needed)."),
        click.option("--calibrate-samples", type=click.IntRange(min=2), default=DEFAULT_SAMPLES, show_default=True,
                     metavar="N", help="Use at most N calibration sequences (a quarter of them held out)."),
        click.option("--distill-epochs", type=EpochsType(), default="auto", show_default=True, metavar="N",
                     help="Then train the compressed model for up to N epochs to match the dense model's outputs "
                          "on the calibration inputs (no labels; early stopping on the held-out part); auto: only "
                          f"when --max-drop fails, up to {RECOVERY_EPOCHS} epochs; 0: never."),
        click.option("--distill-lr", type=RateType(), default=DEFAULT_LR, show_default=True,
                     metavar="LR", help="Adam learning rate of --distill-epochs; auto: distil at 0.001 and at "
                                        "0.01 and keep the one closer to the dense model on the held-out inputs."),
    ]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


def calibration_data(data: Optional[str], distill_epochs: Union[int, str]) -> Any:
    """The inputs ``--calibrate DATA`` names (loaded here), or None."""
    if data is None:
        if distill_epochs != "auto" and distill_epochs:
            raise click.UsageError("--distill-epochs needs inputs to distil on: give --calibrate DATA")
        return None
    from kcompress.calibration.moments import load_calibration_data

    return load_calibration_data(data)


def check_finetune(epochs: Union[int, str], spec: Optional[EvalSpec],
                   finetune_data: Optional[str] = None) -> Optional[EvalSpec]:
    """The spec to run: with fine-tuning, a data file given to --eval is no longer scored on the samples it
    trains on: ``--finetune-data FILE`` trains on FILE, else a seeded :data:`HOLDOUT` of it is held out for
    scoring (see :class:`kcompress.tuning.evaluate.EvalSpec`). ``epochs="auto"`` asks for no fine-tuning."""
    asked = epochs != "auto" and int(epochs) > 0
    if finetune_data is not None and epochs == 0:
        raise click.UsageError("--finetune-data is the data to fine-tune on: give --finetune-epochs N as well")
    if finetune_data is not None:
        if spec is None:
            raise click.UsageError("--finetune-data needs a metric: give --eval DATA or --evaluator")
        return dataclasses.replace(spec, data=spec.data if spec.evaluator is None else finetune_data,
                                   finetune_data=finetune_data if spec.evaluator is None else None)
    if asked and (spec is None or spec.data is None):
        raise click.UsageError("--finetune-epochs needs data to train on: give --eval DATA or --finetune-data FILE")
    if asked and spec is not None and spec.evaluator is None and not spec.is_builtin:
        return dataclasses.replace(spec, holdout=HOLDOUT)
    return spec


def threads_option(command: F) -> F:
    """``--threads N``."""
    return click.option("--threads", type=click.IntRange(min=1), metavar="N",
                        help="torch/BLAS threads for running the model (evaluation, fine-tuning, speed checks); "
                             "default: half the CPUs the load leaves idle (1 on a 2-core machine). Matrix fits always run on one thread, their small "
                             "kernels' fastest setting (KCOMPRESS_FIT_THREADS overrides).")(command)


def finetune_data_option(command: F) -> F:
    """``--finetune-data FILE``."""
    return click.option("--finetune-data", metavar="FILE",
                        help="Fine-tune on this data file (.pt/.npz/.safetensors) and score on all of --eval DATA. "
                             f"Without it, fine-tuning on a data file holds a seeded {HOLDOUT:.0%} of it out "
                             "for scoring.")(command)


def checked_targets(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``--targets``, checked as the config checks it (a usage error, exit code 2, when it is not valid)."""
    try:
        check_targets(value)
    except KCompressError as error:
        raise click.BadParameter(str(error)) from None
    return value
