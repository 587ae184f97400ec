"""Fine-tuning a (compressed) model: task loss, distillation from a teacher, or both, with early stopping.

All trainable parameters are tuned (a compressed layer's factors are ``nn.Parameter``s), through the fast
path: every compressed matrix runs materialized while tuning (see :func:`fast`). The run is seeded
inside ``torch.random.fork_rng``, so the caller's RNG state is untouched, and the model is tuned in place.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kcompress.config.calibration import learning_rates
from kcompress.errors import KCompressError
from kcompress.names import LOSSES, TASK_METRICS
from kcompress.nn.paths import compressed_layers, trained
from kcompress.progress import ProgressCallback, ProgressEvent, ProgressLike, progress_callback, silent
from kcompress.tuning.agreement import better, output_agreement
from kcompress.tuning.data import Batch, SequenceData
from kcompress.tuning.evaluate import (
    check_fits,
    check_task,
    eval_mode,
    evaluate,
    higher_is_better,
    kept_modes,
    match_targets,
    run_model,
    split_batch,
)
from kcompress.tuning.layer_match import captured, matching_loss

Data = Union[SequenceData, Iterable[Batch]]


@dataclass(frozen=True)
class EpochRecord:
    """One epoch: ``train_loss`` is the mean objective over its batches (None for epoch 0, the starting point)."""

    epoch: int
    train_loss: Optional[float]
    val: float


@dataclass
class FinetuneResult:
    """The tuned model (the same object, best state restored) and the monitored metric per epoch.

    ``metric`` names what ``val`` measures: ``"accuracy"``/``"mse"`` (task metric on validation data),
    ``"distill_loss"`` (distillation objective on validation data) or ``"train_loss"`` (objective on the
    training batches, when there is no validation data).
    """

    model: nn.Module
    history: list[EpochRecord]
    best_epoch: int
    best_val: float
    metric: str
    higher_is_better: bool
    stopped_early: bool = False
    #: at the best epoch: what broke ties of ``best_val`` (the objective on the validation data when the task
    #: metric is monitored, lower is better; 0 otherwise)
    best_tiebreak: float = 0.0
    #: the learning rate kept, and with ``lr="auto"`` each rate tried: ``{"lr", "epochs_run", "best_val", "agreement"}``
    lr: float = math.nan
    lr_candidates: list[dict[str, Any]] = field(default_factory=list)

    def __repr__(self) -> str:
        """One line (the model is left out: ``result.model`` is the tuned model itself)."""
        ran = len(self.history) - 1
        stopped = ", stopped early" if self.stopped_early else ""
        return (f"FinetuneResult(best epoch {self.best_epoch} of {ran}{stopped}: {self.metric} "
                f"{self.history[0].val:.4g} -> {self.best_val:.4g})")


@dataclass(frozen=True)
class _Objective:
    """The training loss of one batch: task loss, distillation from ``teacher``, or their sum."""

    loss: str
    task: str
    teacher: Optional[nn.Module]
    temperature: float
    #: layers whose outputs are also matched to the teacher's (:mod:`kcompress.tuning.layer_match`), and the weight
    match_layers: tuple[str, ...] = ()
    match_weight: float = 1.0

    def __call__(self, model: nn.Module, inputs: Union[Tensor, tuple[Tensor, ...]], targets: Tensor) -> Tensor:
        """Mean loss of the batch, a scalar (``targets`` are never read for ``loss="distill"``)."""
        with captured(model, self.match_layers) as student:
            outputs = run_model(model, inputs)
        value = outputs.new_zeros(())
        if self.loss in ("task", "both"):
            value = value + _task_loss(outputs, targets.to(outputs.device), self.task)
        if self.loss in ("distill", "both"):
            assert self.teacher is not None
            with torch.no_grad(), captured(self.teacher, self.match_layers) as teacher:
                reference = run_model(self.teacher, inputs).to(outputs.device)
            value = value + _distill_loss(outputs, reference, self.task, self.temperature)
            if self.match_layers:
                value = value + self.match_weight * matching_loss(student, teacher)
        return value


@dataclass(frozen=True)
class _Monitor:
    """What early stopping watches: ``measure(model) -> float``, its name and direction, and what breaks a
    tie of two equal values (``tiebreak(model)``, lower is better; e.g. the loss when the accuracy ties)."""

    measure: Callable[[nn.Module], float]
    metric: str
    higher_is_better: bool
    tiebreak: Optional[Callable[[nn.Module], float]] = None

    def score(self, model: nn.Module) -> tuple[float, float]:
        """``(monitored value, tie-break)`` of ``model`` (tie-break 0 without one)."""
        return self.measure(model), self.tiebreak(model) if self.tiebreak is not None else 0.0

    def improves(self, value: tuple[float, float], best: tuple[float, float]) -> bool:
        """Strictly better than ``best``: a better monitored value, or an equal one with a lower tie-break."""
        if value[0] != best[0]:
            return value[0] > best[0] if self.higher_is_better else value[0] < best[0]
        return value[1] < best[1]


def finetune(
    model: nn.Module,
    data: Data,
    teacher: Optional[nn.Module] = None,
    epochs: int = 30,
    lr: Union[float, str] = "auto",
    loss: Optional[str] = None,
    task: str = "classification",
    val_fraction: float = 0.2,
    val_data: Optional[Data] = None,
    patience: Optional[int] = 10,
    seed: int = 0,
    batch_size: int = 32,
    temperature: float = 2.0,
    progress: ProgressLike = None,
    match_layers: Union[str, Sequence[str]] = "auto",
    match_weight: float = 1.0,
) -> FinetuneResult:
    """Tune ``model`` in place with Adam and return it with the best epoch's state restored.

    ``data``: a ``SequenceData`` (``val_fraction`` of it split off, seeded, unless ``val_data`` is given) or a
    re-iterable of ``(inputs, targets)`` batches such as a DataLoader (inputs may be a tuple of positional
    arguments, e.g. ``(x (B, T, F), lengths (B,))``). ``loss``: ``"task"`` (cross entropy / MSE on the
    targets), ``"distill"`` (KL at ``temperature`` to the teacher's logits for classification, MSE to its
    outputs for regression; no labels read) or ``"both"`` (their sum); None: ``"distill"`` when a ``teacher``
    is given, else ``"task"``. ``match_layers``: qualified names of layers present in both models whose
    outputs the distillation also matches (normalised squared error times ``match_weight``, see
    :mod:`kcompress.tuning.layer_match`; ``"auto"``: the model's compressed layers that the teacher has, when
    it distils); early stopping watches the output loss alone. Early stopping after ``patience`` epochs without improvement (None: never) of
    the monitored metric (see ``FinetuneResult.metric``), announced by a ``"stopped"`` progress event; epoch 0
    is the starting point, so a run that only hurts returns the model unchanged. ``lr``: Adam's learning rate,
    or ``"auto"``: one run per rate of :data:`~kcompress.config.calibration.DISTILL_LR_CANDIDATES`, each from
    the same start, keeping the one closest to the teacher on the validation data (its decisions, then its
    logits: :func:`~kcompress.tuning.agreement.better`, as ``distill_lr="auto"`` ranks), or without a teacher
    the one with the best monitored metric (the rates tried and their scores are in
    ``FinetuneResult.lr_candidates``). ``progress``: a callback of
    :class:`kcompress.progress.ProgressEvent`, or True for a progress bar on stderr (see
    :func:`kcompress.progress.progress_callback`).
    """
    loss = loss if loss is not None else ("distill" if teacher is not None else "task")
    objective = _objective(loss, task, teacher, temperature, model, _matched(model, teacher, loss, match_layers),
                           match_weight)
    rates = learning_rates(lr)
    _check_numbers(epochs, batch_size, val_fraction, patience)
    if isinstance(data, SequenceData):
        check_fits(model, data, "the fine-tuning data")
    train_data, val_data = _split(data, val_data, val_fraction, seed)
    monitor = _monitor(objective, train_data, val_data, batch_size)
    teacher_mode = eval_mode(teacher) if teacher is not None else contextlib.nullcontext()
    with kept_modes(model), teacher_mode, trained(model), progress_callback(progress) as callback:
        start, tried = _snapshot(model), []
        best: Optional[tuple[FinetuneResult, Optional[dict[str, Any]], dict[str, Tensor]]] = None
        for rate in rates:
            model.load_state_dict(start)
            with torch.random.fork_rng(devices=_cuda_devices(model)):
                torch.manual_seed(seed)
                result = _run(model, train_data, objective, monitor, epochs, rate, patience, seed, batch_size, callback)
            agreement = _agreement(model, objective, val_data, batch_size) if len(rates) > 1 else None
            tried.append({"lr": rate, "epochs_run": len(result.history) - 1, "best_val": result.best_val,
                          "agreement": agreement})
            if best is None or _improves(monitor, (result, agreement), best[:2]):
                best = (replace(result, lr=rate), agreement, _snapshot(model))
        assert best is not None
        model.load_state_dict(best[2])
        return replace(best[0], lr_candidates=tried if len(tried) > 1 else [])


def _improves(monitor: _Monitor, run: tuple[FinetuneResult, Optional[dict[str, Any]]],
              best: tuple[FinetuneResult, Optional[dict[str, Any]]]) -> bool:
    """Whether one rate's run beats the best so far: by its agreement with the teacher on the validation data
    (:func:`~kcompress.tuning.agreement.better`) when both have one, else by the monitored metric."""
    if run[1] is not None and best[1] is not None:
        return better(run[1], best[1])
    return monitor.improves((run[0].best_val, run[0].best_tiebreak), (best[0].best_val, best[0].best_tiebreak))


def _matched(model: nn.Module, teacher: Optional[nn.Module], loss: str,
             layers: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """The layers whose outputs are matched: as given, or for ``"auto"`` the model's compressed layers that the
    teacher also has, when the loss distils from it."""
    if layers != "auto":
        return tuple(layers)
    if teacher is None or loss == "task":
        return ()
    names = {name for name, _ in teacher.named_modules()}
    return tuple(name for name in compressed_layers(model) if name and name in names)


def _agreement(model: nn.Module, objective: _Objective, val_data: Optional[Data],
               batch_size: int) -> Optional[dict[str, Any]]:
    """How close ``model``'s outputs are to the teacher's on the validation inputs
    (:func:`~kcompress.tuning.agreement.output_agreement`; None without a teacher to distil from or validation
    data)."""
    if objective.teacher is None or val_data is None:
        return None
    calls = [split_batch(batch)[0] for batch in _epoch_batches(val_data, batch_size)]
    return output_agreement(model, objective.teacher, calls)


def _run(
    model: nn.Module,
    data: Data,
    objective: _Objective,
    monitor: _Monitor,
    epochs: int,
    lr: float,
    patience: Optional[int],
    seed: int,
    batch_size: int,
    progress: Optional[ProgressCallback],
) -> FinetuneResult:
    """The epoch loop with early stopping; restores the best state before returning."""
    report = progress or silent
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise KCompressError("the model has no trainable parameters to fine-tune")
    optimizer = torch.optim.Adam(parameters, lr=lr)
    best = monitor.score(model)
    best_val = best[0]
    history = [EpochRecord(0, None, best_val)]
    best_epoch, best_state = 0, _snapshot(model)
    start = f"before training: {monitor.metric} {best_val:.4g}"
    report(ProgressEvent("epoch", "finetune", 0, epochs, best_val, start))
    for epoch in range(1, epochs + 1):
        train_loss = _train_epoch(model, _epoch_batches(data, batch_size, seed + epoch), objective, optimizer)
        score = monitor.score(model)
        val = score[0]
        history.append(EpochRecord(epoch, train_loss, val))
        if monitor.improves(score, best):
            best_epoch, best, best_val, best_state = epoch, score, val, _snapshot(model)
        message = f"train loss {train_loss:.4g}, {monitor.metric} {val:.4g} (best {best_val:.4g}, epoch {best_epoch})"
        report(ProgressEvent("epoch", "finetune", epoch, epochs, val, message))
        if patience is not None and epoch - best_epoch >= patience and epoch < epochs:
            report(ProgressEvent("stopped", "finetune", epoch, epochs, best_val,
                                 f"early stopping after epoch {epoch}: no better {monitor.metric} for {patience} "
                                 f"epochs; restoring epoch {best_epoch} ({monitor.metric} {best_val:.4g})"))
            break
    model.load_state_dict(best_state)
    stopped = len(history) - 1 < epochs
    return FinetuneResult(model, history, best_epoch, best_val, monitor.metric, monitor.higher_is_better, stopped,
                          best_tiebreak=best[1])


def _train_epoch(
    model: nn.Module, batches: Iterable[Batch], objective: _Objective, optimizer: torch.optim.Optimizer
) -> float:
    """One pass of Adam steps in train mode; the sample-weighted mean loss."""
    model.train()
    total, count = 0.0, 0
    for batch in batches:
        inputs, targets = split_batch(batch)
        optimizer.zero_grad(set_to_none=True)
        value = objective(model, inputs, targets)
        value.backward()
        optimizer.step()
        total += float(value.detach()) * len(targets)
        count += len(targets)
    if count == 0:
        raise KCompressError("the training data yielded no batches")
    return total / count


def _mean_objective(model: nn.Module, batches: Iterable[Batch], objective: _Objective) -> float:
    """The sample-weighted mean objective over ``batches``, in eval mode without gradients."""
    total, count = 0.0, 0
    with torch.no_grad(), eval_mode(model):
        for batch in batches:
            inputs, targets = split_batch(batch)
            total += float(objective(model, inputs, targets)) * len(targets)
            count += len(targets)
    if count == 0:
        raise KCompressError("the monitored data yielded no batches")
    return total / count


def _task_loss(outputs: Tensor, targets: Tensor, task: str) -> Tensor:
    """Cross entropy of ``(B, C)`` logits against class indices ``(B,)``, or MSE for regression."""
    if task == "regression":
        return F.mse_loss(match_targets(outputs, targets), targets.to(outputs.dtype))
    if targets.is_floating_point() or targets.is_complex():
        raise KCompressError("classification targets must be integer class indices")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= outputs.shape[-1]):
        raise KCompressError(f"class targets must lie in 0..{outputs.shape[-1] - 1} (the model's classes)")
    return F.cross_entropy(outputs, targets.long())


def _distill_loss(outputs: Tensor, reference: Tensor, task: str, temperature: float) -> Tensor:
    """KL(teacher || student) of temperature-softened ``(B, C)`` logits, times T², or MSE for regression."""
    if outputs.shape != reference.shape:
        shapes = f"{tuple(outputs.shape)} and {tuple(reference.shape)}"
        raise KCompressError(f"student and teacher outputs differ in shape: {shapes}")
    if task == "regression":
        return F.mse_loss(outputs, reference)
    student = F.log_softmax(outputs / temperature, dim=-1)
    teacher = F.log_softmax(reference / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature**2


def _objective(
    loss: str, task: str, teacher: Optional[nn.Module], temperature: float, model: nn.Module,
    match_layers: tuple[str, ...] = (), match_weight: float = 1.0,
) -> _Objective:
    """The validated objective."""
    check_task(task)
    if loss not in LOSSES:
        raise KCompressError(f"unknown loss {loss!r}; use one of: {', '.join(LOSSES)}")
    if loss != "task" and teacher is None:
        raise KCompressError(f'loss="{loss}" needs a teacher model to distill from')
    if teacher is model:
        raise KCompressError("the teacher must be a separate model (e.g. a copy taken before compression)")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise KCompressError(f"temperature must be positive, got {temperature}")
    if match_layers and loss == "task":
        raise KCompressError("match_layers needs a teacher to match (loss 'distill' or 'both')")
    if isinstance(match_weight, bool) or not (isinstance(match_weight, (int, float)) and 0 <= match_weight < math.inf):
        raise KCompressError(f"match_weight must be a number >= 0, got {match_weight!r}")
    match = match_layers if match_weight > 0 else ()
    return _Objective(loss, task, teacher if loss != "task" else None, temperature, match, float(match_weight))


def _check_numbers(epochs: int, batch_size: int, val_fraction: float, patience: Optional[int]) -> None:
    """KCompressError for out-of-range settings."""
    if epochs < 0:
        raise KCompressError(f"epochs must be at least 0, got {epochs}")
    if batch_size < 1:
        raise KCompressError(f"batch size must be at least 1, got {batch_size}")
    if not 0.0 < val_fraction < 1.0:
        raise KCompressError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if patience is not None and patience < 1:
        raise KCompressError(f"patience must be at least 1 epoch (or None), got {patience}")


def _split(data: Data, val_data: Optional[Data], val_fraction: float, seed: int) -> tuple[Data, Optional[Data]]:
    """``(training data, validation data or None)``; a SequenceData without val_data is split, seeded."""
    if isinstance(data, Iterator):
        raise KCompressError("data must be re-iterable every epoch (SequenceData, DataLoader, list), not an iterator")
    if val_data is None and isinstance(data, SequenceData):
        return data.split(val_fraction, seed)
    return data, val_data


def _monitor(objective: _Objective, train_data: Data, val_data: Optional[Data], batch_size: int) -> _Monitor:
    """Task metric on validation data; distillation loss on it for ``loss="distill"``; else the training loss."""
    outputs_only = replace(objective, match_layers=())
    if val_data is not None and objective.loss != "distill":
        task = objective.task
        return _Monitor(lambda m: evaluate(m, val_data, task, batch_size), TASK_METRICS[task], higher_is_better(task),
                        lambda m: _mean_objective(m, _epoch_batches(val_data, batch_size), outputs_only))
    watched, metric = (val_data, "distill_loss") if val_data is not None else (train_data, "train_loss")
    return _Monitor(lambda m: _mean_objective(m, _epoch_batches(watched, batch_size), outputs_only), metric, False)




def _epoch_batches(data: Data, batch_size: int, seed: Optional[int] = None) -> Iterable[Batch]:
    """A SequenceData's batches (shuffled with ``seed`` when given), or the iterable as it is."""
    if isinstance(data, SequenceData):
        return data.batches(batch_size, shuffle=seed is not None, seed=seed or 0)
    return data


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of the model's state."""
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _cuda_devices(model: nn.Module) -> list[int]:
    """CUDA device indices of the model's parameters, whose RNGs ``fork_rng`` must save."""
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
