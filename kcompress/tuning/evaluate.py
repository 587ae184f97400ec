"""Task metrics of a model on sequence data: accuracy (classification) or mean squared error (regression);
what a run measures (:class:`EvalSpec`, loaded into an :class:`Evaluation`: built-in data, a data file or
the user's evaluator), how much worse a metric got (:func:`metric_drop`) and the accuracy :class:`Budget`."""

from __future__ import annotations

import contextlib
import math
import pathlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from kcompress.errors import KCompressError, error_line
from kcompress.io import file_sha256
from kcompress.io.usercode import import_reference, split_reference
from kcompress.names import DROP_TYPES, TASK_METRICS, TASKS
from kcompress.tuning.data import BUILTIN_DATASETS, Batch, SequenceData, load_builtin, load_data_file


def higher_is_better(task: str) -> bool:
    """True for accuracy (classification), False for MSE (regression)."""
    return check_task(task) == "classification"


def check_task(task: str) -> str:
    """``task`` if it is known, else KCompressError."""
    if task not in TASKS:
        raise KCompressError(f"unknown task {task!r}; use one of: {', '.join(TASKS)}")
    return task


def evaluate(
    model: nn.Module,
    data: Union[SequenceData, Iterable[Batch]],
    task: str = "classification",
    batch_size: int = 256,
) -> float:
    """Accuracy in [0, 1] (classification: argmax of ``(B, C)`` outputs) or MSE (regression) over ``data``.

    ``data`` is a ``SequenceData`` or any iterable of ``(inputs, targets)`` batches whose inputs may be a
    tuple of positional arguments. Runs without gradients in eval mode; the model's modes are restored.
    """
    check_task(task)
    batches = data.batches(batch_size) if isinstance(data, SequenceData) else data
    total, count = 0.0, 0
    with torch.no_grad(), eval_mode(model):
        for batch in batches:
            inputs, targets = split_batch(batch)
            try:
                outputs = run_model(model, inputs)
            except (IndexError, RuntimeError, TypeError, ValueError):
                if isinstance(data, SequenceData):  # data that does not fit the model: say why, in one line
                    check_fits(model, data)
                raise
            targets = targets.to(outputs.device)
            total += float(batch_metric_sum(outputs, targets, task))
            count += targets.numel()
    if count == 0:
        raise KCompressError("cannot evaluate on empty data")
    return total / count


def check_fits(model: nn.Module, data: SequenceData, name: str = "the data") -> None:
    """A one-line KCompressError naming ``name`` when ``data``'s inputs cannot go into ``model``: token ids
    beyond the size of its (first) Embedding, or inputs its forward refuses on a probe of two samples (token
    ids into a model without an Embedding, float features into one, features of another width), with what
    the model takes instead of torch's error alone."""
    embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if data.is_tokens and embedding is not None and data.inputs.numel():
        top = int(data.inputs.max())
        if top >= embedding.num_embeddings:
            raise KCompressError(f"{name}: token ids go up to {top}, but the model's Embedding has "
                                 f"{embedding.num_embeddings} entries (ids 0..{embedding.num_embeddings - 1})")
    if not len(data):
        return
    inputs, _ = split_batch(next(data.subset(torch.arange(min(2, len(data)))).batches(2)))
    try:
        with torch.no_grad(), eval_mode(model):
            run_model(model, inputs)
    except (IndexError, RuntimeError, TypeError, ValueError) as error:
        given = "integer token ids (batch, time)" if data.is_tokens else f"float features (batch, time, {data.num_features})"
        raise KCompressError(f"{name} holds {given}, but {_takes(model, embedding)} ({error_line(error)[:200]})") from None


def _takes(model: nn.Module, embedding: Optional[nn.Module]) -> str:
    """What ``model`` takes, as far as its layers say."""
    if embedding is not None:
        return f"the model starts with an Embedding ({embedding.num_embeddings} entries): it takes integer token ids"
    width = next((m.input_size for m in model.modules() if isinstance(getattr(m, "input_size", None), int)), None)
    return f"the model takes float features (batch, time, {width if width is not None else 'F'})"


def split_batch(batch: object) -> Batch:
    """``(inputs, targets)`` of one batch (a 2-tuple or 2-list), else KCompressError."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        found = f"{len(batch)} items" if isinstance(batch, (tuple, list)) else f"a {type(batch).__name__}"
        raise KCompressError(f"each batch must be a pair (inputs, targets), got {found}")
    return batch[0], batch[1]


def batch_metric_sum(outputs: Tensor, targets: Tensor, task: str) -> Tensor:
    """Correct predictions (classification) or summed squared error (regression) of one batch, a scalar."""
    if task == "classification":
        if outputs.dim() != 2 or outputs.shape[0] != targets.shape[0]:
            raise KCompressError(f"a classifier must output (batch, classes) logits, got {tuple(outputs.shape)}")
        _check_classes(targets, outputs.shape[1])
        return (outputs.argmax(dim=1) == targets).sum()
    if not bool(torch.isfinite(targets).all()):
        raise KCompressError("regression targets hold NaN or Inf values")
    return ((match_targets(outputs, targets) - targets) ** 2).sum()


def _check_classes(targets: Tensor, classes: int) -> None:
    """Class targets are integers in ``0..classes-1`` (the model's output size), else KCompressError."""
    if targets.is_floating_point() or targets.is_complex():
        kind = str(targets.dtype).replace("torch.", "")
        raise KCompressError(f"classification needs integer class targets, got {kind} (for real-valued targets "
                             "use --task regression)")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= classes):
        raise KCompressError(f"class targets must lie in 0..{classes - 1} (the model has {classes} outputs), got "
                             f"{int(targets.min())}..{int(targets.max())}")


def match_targets(outputs: Tensor, targets: Tensor) -> Tensor:
    """Regression outputs reshaped to the targets' shape (``(B, 1)`` against ``(B,)``), else KCompressError."""
    if outputs.numel() != targets.numel():
        raise KCompressError(
            f"regression outputs {tuple(outputs.shape)} do not match targets {tuple(targets.shape)}"
        )
    return outputs.reshape(targets.shape)


def run_model(model: nn.Module, inputs: Union[Tensor, tuple[Tensor, ...], list[Tensor]]) -> Tensor:
    """``model(*inputs)`` for a tuple/list (e.g. ``(x, lengths)``), else ``model(inputs)``, on the model's device."""
    device = _device(model)
    if isinstance(inputs, (tuple, list)):
        return model(*(x.to(device) for x in inputs))
    return model(inputs.to(device))


def _device(model: nn.Module) -> torch.device:
    """Where the model's first parameter or buffer lives (CPU for a model without any)."""
    tensor: Optional[Tensor] = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


@contextlib.contextmanager
def kept_modes(model: nn.Module) -> Iterator[None]:
    """Every submodule's own training flag restored after the block."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode inside the block; the training flags restored after."""
    with kept_modes(model):
        model.eval()
        yield


# ---------------------------------------------------------------------- what a run measures
@dataclass(frozen=True)
class EvalSpec:
    """What to measure. ``data``: a built-in dataset name (its test split is measured, its train split
    fine-tuned on) or a data file with ``task``; ``evaluator``: ``"module:function"`` or
    ``"path/to/file.py:function"``, called with the model and returning a float, which then is the metric
    (``data``, if also given, is only the fine-tuning data).

    A data file is measured and fine-tuned on as it is, unless ``finetune_data`` (a separate data file to
    fine-tune on) or ``holdout`` (a fraction of the file held out, seeded, for measuring; the rest is
    fine-tuned on) keeps the two apart."""

    data: Optional[str] = None
    task: str = "classification"
    evaluator: Optional[str] = None
    lower_is_better: bool = False
    finetune_data: Optional[str] = None
    holdout: float = 0.0

    @property
    def higher_is_better(self) -> bool:
        """The evaluator's direction as declared, else the task's (accuracy up, MSE down)."""
        return not self.lower_is_better if self.evaluator else higher_is_better(self.task)

    @property
    def metric_name(self) -> str:
        return self.evaluator or TASK_METRICS[self.task]

    @property
    def is_builtin(self) -> bool:
        return self.data in BUILTIN_DATASETS

    def check(self) -> None:
        """A KCompressError for a spec that cannot work (cheap: nothing is loaded or imported)."""
        check_task(self.task)
        if self.data is None and self.evaluator is None:
            raise KCompressError("nothing to evaluate: give a dataset, a data file or an evaluator")
        if self.data is not None and not self.is_builtin and not pathlib.Path(self.data).is_file():
            raise KCompressError(
                f"{self.data!r} is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}) nor a data file"
            )
        if self.evaluator is not None:
            split_reference(self.evaluator, "evaluator")
        if self.finetune_data is not None and not pathlib.Path(self.finetune_data).is_file():
            raise KCompressError(f"fine-tuning data file not found: {self.finetune_data}")
        if not 0.0 <= self.holdout < 1.0:
            raise KCompressError(f"the held-out fraction must lie in [0, 1), got {self.holdout}")

    def fingerprint(self) -> dict[str, Any]:
        """The spec plus the data file's sha256 (for trial keys)."""
        data = asdict(self)
        if self.data is not None and not self.is_builtin:
            data["data_sha256"] = file_sha256(self.data)
        if self.finetune_data is not None:
            data["finetune_data_sha256"] = file_sha256(self.finetune_data)
        return data


@dataclass(frozen=True)
class Evaluation:
    """A loaded :class:`EvalSpec`: ``measure(model) -> float`` and the fine-tuning data (None without data);
    ``description`` says what is measured on which data, ``train_description`` which data fine-tunes."""

    spec: EvalSpec
    measure: Callable[[nn.Module], float]
    train_data: Optional[SequenceData]
    description: str
    train_description: str = ""

    @property
    def name(self) -> str:
        return self.spec.metric_name


def load_evaluation(spec: EvalSpec) -> Evaluation:
    """Load the data and/or import the evaluator of ``spec``."""
    spec.check()
    test, train, where, trained_on = _load_data(spec) if spec.data is not None else (None, None, "", "")
    if spec.evaluator is not None:
        return Evaluation(spec, _fitted(_import_evaluator(spec.evaluator), {trained_on: train}), train,
                          f"evaluator {spec.evaluator}", spec.data or "")
    assert test is not None
    task = spec.task
    measure = _fitted(lambda model: evaluate(model, test, task), {where: test, trained_on: train})
    return Evaluation(spec, measure, train, f"{spec.metric_name} on {where}", trained_on)


def _fitted(measure: Callable[[nn.Module], float],
            datasets: Mapping[str, Optional[SequenceData]]) -> Callable[[nn.Module], float]:
    """``measure``, first checking (:func:`check_fits`) that every dataset of the evaluation, the fine-tuning
    data included, fits the model: the dense baseline is measured before any fit, so data that cannot go
    into the model is refused then, naming the file."""

    def checked(model: nn.Module) -> float:
        for name, data in datasets.items():
            if data is not None:
                check_fits(model, data, name)
        return measure(model)

    return checked


def _load_data(spec: EvalSpec) -> tuple[SequenceData, SequenceData, str, str]:
    """``(evaluation data, fine-tuning data, description of each)``; see :class:`EvalSpec` for the split."""
    data = spec.data
    assert data is not None
    if data in BUILTIN_DATASETS:
        if spec.finetune_data is not None and spec.evaluator is None:
            test = load_builtin(data, "test")
            return test, load_data_file(spec.finetune_data), f"{data} (test split)", spec.finetune_data
        return load_builtin(data, "test"), load_builtin(data, "train"), f"{data} (test split)", f"{data} (train split)"
    loaded = load_data_file(data)
    if spec.finetune_data is not None and spec.evaluator is None:
        return loaded, load_data_file(spec.finetune_data), data, spec.finetune_data
    if spec.holdout > 0 and spec.evaluator is None:
        train, held = loaded.split(spec.holdout, seed=HOLDOUT_SEED)
        percent = f"{spec.holdout:.0%}"
        return (held, train, f"{data} (the {percent} held out, seeded: {len(held)} samples)",
                f"{data} (the other {len(train)} samples)")
    return loaded, loaded, data, data


def _import_evaluator(text: str) -> Callable[[nn.Module], float]:
    """The evaluator function, wrapped so that it returns a float or raises a KCompressError."""
    function = import_reference(text, "evaluator")
    if not callable(function):
        raise KCompressError(f"evaluator {text}: {type(function).__name__} object is not a function")

    def measure(model: nn.Module) -> float:
        try:
            value = function(model)
        except Exception as error:  # noqa: BLE001 - the user's code: report it in one line (traceback: --debug)
            raise KCompressError(f"evaluator {text} raised {type(error).__name__}: {error}") from error
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise KCompressError(f"evaluator {text} must return a number, got {type(value).__name__}")
        return float(value)

    return measure


# ---------------------------------------------------------------------- drop and budget
def metric_drop(baseline: float, value: float, *, higher_is_better: bool, drop_type: str = "absolute") -> float:
    """How much worse ``value`` is than ``baseline`` (positive: worse) for either direction of metric.

    ``relative`` divides by ``|baseline|`` (so negative metrics keep the sign meaning "worse"); against a
    zero baseline any change is infinitely large. NaN stays NaN (and fails every budget).
    """
    if drop_type not in DROP_TYPES:
        raise KCompressError(f"drop type must be one of {', '.join(DROP_TYPES)}, got {drop_type!r}")
    worse = baseline - value if higher_is_better else value - baseline
    if drop_type == "absolute" or math.isnan(worse):
        return worse
    if baseline == 0:
        return 0.0 if worse == 0 else math.copysign(math.inf, worse)
    return worse / abs(baseline)


@dataclass(frozen=True)
class Budget:
    """The largest acceptable drop (None: no budget) and how drops are measured."""

    max_drop: Optional[float] = None
    drop_type: str = "absolute"

    def __post_init__(self) -> None:
        if self.max_drop is not None and not (math.isfinite(self.max_drop) and self.max_drop >= 0):
            raise KCompressError(f"max_drop must be a finite number of at least 0, got {self.max_drop}")

    def passed(self, drop: float) -> Optional[bool]:
        """None without a budget; False for a NaN drop."""
        return None if self.max_drop is None else bool(drop <= self.max_drop)


#: the seed of the held-out part of a data file that is both scored and fine-tuned on (EvalSpec.holdout)
HOLDOUT_SEED = 0


def metrics_record(
    evaluation: Evaluation, baseline: float, compressed: float, finetuned: Optional[float], budget: Budget
) -> dict[str, Any]:
    """``Report.metrics``: the drop is measured from the baseline to the final (fine-tuned if any) metric."""
    final = compressed if finetuned is None else finetuned
    spec = evaluation.spec
    drop = metric_drop(baseline, final, higher_is_better=spec.higher_is_better, drop_type=budget.drop_type)
    return {
        "name": evaluation.name,
        "task": None if spec.evaluator else spec.task,
        "higher_is_better": spec.higher_is_better,
        "baseline": baseline,
        "compressed": compressed,
        "finetuned": finetuned,
        "drop": drop,
        "drop_type": budget.drop_type,
        "max_drop": budget.max_drop,
        "passed": budget.passed(drop),
        "scored_on": evaluation.description,
        "finetuned_on": evaluation.train_description if finetuned is not None else None,
    }
