"""One compression, checkpoint to artifact, as explicit stages over one :class:`CompressionRun`.

::

    check outputs -> load -> [evaluation: load it, measure the dense baseline]
        -> select -> [calibrate] -> fit -> [refine] -> execution paths     (kcompress.compress)
        -> [measure] -> [fine-tune -> measure] -> metrics -> write

Every entry point runs these stages with one :class:`~kcompress.config.CompressConfig` built at its edge: the
CLI's ``compress`` command (:func:`run_pipeline`), the Python :func:`compress_file`, and each trial of a sweep
(:func:`compress_stages` on a model its worker loaded once). Selection, planning and fitting are
:func:`kcompress.runs.convert.compress_model`, handed the same config.

Every check that needs no fitting runs first: the output path, the checkpoint, the user's model class,
the evaluation (its baseline is measured on the dense model, so a broken evaluator fails before any fit)
and the compression arguments (``compress`` plans every matrix before its first fit). Nothing is written
unless everything succeeded, and the write is atomic (:func:`kcompress.io.save_artifact`).
Stages report what they do as ``ProgressEvent("step" | "metric", ...)`` through ``progress``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from torch import nn

from kcompress.allocation.auto import Prepared
from kcompress.calibration.run import CalibrationRun
from kcompress.config import CompressConfig, FinetuneOptions
from kcompress.errors import KCompressError, KCompressWarning
from kcompress.fitting.planning import NOTHING_MATCHED
from kcompress.io import (
    Checkpoint,
    PathLike,
    check_output_path,
    default_output_path,
    load,
    load_checkpoint,
    model_from_checkpoint,
    save_artifact,
)
from kcompress.io.usercode import import_reference, searching
from kcompress.progress import ProgressCallback, ProgressEvent
from kcompress.report.record import Report
from kcompress.runs.convert import compress_model
from kcompress.tuning.evaluate import Budget, EvalSpec, Evaluation, load_evaluation, metrics_record
from kcompress.tuning.finetune import FinetuneResult, finetune


@dataclass
class CompressionRun:
    """What one compression has produced so far; each stage fills in its part.

    ``source`` is the input's ``{path, kind, sha256}`` record (``Report.source``); the metrics are None
    until measured; ``artifact`` is set once written.
    """

    dense: nn.Module
    source: dict[str, str] = field(default_factory=dict)
    evaluation: Optional[Evaluation] = None
    compressed: Optional[nn.Module] = None
    report: Optional[Report] = None
    baseline: Optional[float] = None
    compressed_metric: Optional[float] = None
    finetuned_metric: Optional[float] = None
    finetuning: Optional[FinetuneResult] = None
    artifact: Optional[Path] = None

    @property
    def metric(self) -> Optional[float]:
        """The final metric: fine-tuned when fine-tuning ran, else compressed."""
        return self.compressed_metric if self.finetuned_metric is None else self.finetuned_metric


# ---------------------------------------------------------------------- the whole pipeline
def run_pipeline(
    input_path: PathLike,
    output_path: Optional[PathLike],
    config: CompressConfig,
    *,
    calibration: Any = None,
    overwrite: bool = False,
    trust_checkpoint: bool = False,
    model_class: Optional[str] = None,
    evaluation: Optional[EvalSpec] = None,
    budget: Budget = Budget(),
    progress: Optional[ProgressCallback] = None,
) -> CompressionRun:
    """Every stage from ``input_path`` to the artifact at ``output_path`` (None: beside the input).

    ``model_class`` (``"file.py:Class"``) builds the user's own module from a state dict; ``calibration`` is
    the unlabeled data of ``config.calibration``. The report's status is ``"failed"`` when the ``budget``
    is missed (the artifact is still written). Every problem is a one-line KCompressError, and then nothing
    is written.
    """
    source = Path(input_path)
    target = Path(output_path) if output_path is not None else default_output_path(source, output_tag(config),
                                                                                    config.budget.rank,
                                                                                    config.budget.ratio)
    check_output_path(target, overwrite=overwrite, source=source)
    _check_finetuning(config.recovery.finetune, evaluation)
    run = load_input(source, trust_checkpoint=trust_checkpoint, model_class=model_class, progress=progress)
    if evaluation is not None:
        prepare_evaluation(run, evaluation, progress)
    compress_stages(run, config, calibration=calibration, budget=budget, progress=progress)
    write_artifact(run, target, overwrite=overwrite, progress=progress)
    return run


def output_tag(config: CompressConfig) -> str:
    """The format part of a default artifact name: the format, or ``auto`` for an allocated budget (a ratio
    whose split is left to the default, :meth:`CompressConfig.for_data`, keeps its format's name)."""
    return "auto" if config.allocated else config.formats[0]


def compress_stages(
    run: CompressionRun,
    config: CompressConfig,
    *,
    calibration: Any = None,
    budget: Budget = Budget(),
    progress: Optional[ProgressCallback] = None,
) -> CompressionRun:
    """The stages between a loaded model and its artifact: fit, then (with an evaluation) measure; when the
    model misses the ``budget`` and there is calibration data, distil (``distill_epochs="auto"``: up to
    :data:`~kcompress.config.compress.RECOVERY_EPOCHS`, the best held-out epoch kept) and measure again;
    fine-tune and measure again (when asked, or with ``epochs="auto"`` when the model still misses the
    budget and the evaluation has labelled data of its own, :func:`recovery_finetuning`), and the metrics
    with their budget when the baseline was measured."""
    fit(run, config, calibration=calibration, progress=progress)
    if run.evaluation is None:
        return run
    assert run.compressed is not None
    run.compressed_metric = measure(run, run.compressed, "compressed model", progress)
    if calibration is not None and config.recovery.distill_epochs == "auto" and _misses(run, budget):
        distil(run, config, calibration, progress)
        run.compressed_metric = measure(run, run.compressed, "distilled model", progress)
    settings = config.recovery.finetune
    if settings.fit_epochs == 0 and _misses(run, budget):
        settings = recovery_finetuning(run, settings) or settings
    if settings.fit_epochs > 0:
        fine_tune(run, settings, seed=config.seed, progress=progress)
        run.finetuned_metric = measure(run, run.compressed, "fine-tuned model", progress)
    if run.baseline is not None:
        record_metrics(run, budget)
    return run


def compress_file(
    input_path: PathLike,
    output_path: Optional[PathLike] = None,
    *,
    overwrite: bool = False,
    trust_checkpoint: bool = False,
    calibration: Any = None,
    config: Optional[CompressConfig] = None,
    **settings: Any,
) -> tuple[Path, Report]:
    """Compress the checkpoint at ``input_path`` and write the artifact; returns ``(artifact path, report)``.

    ``output_path`` defaults to :func:`kcompress.io.default_output_path` beside the input. The settings are
    ``config``, or :func:`kcompress.compress`'s keywords (``format``, ``rank`` or ``ratio``, ``include``, ...)
    as its shorthand. A model with nothing to compress is an error. ``report.source`` records the input's
    path, kind and sha256. Every problem is a one-line :class:`KCompressError`, and then nothing is written.
    """
    if config is not None and settings:
        raise KCompressError(f"give settings either in config or as keywords, not both: {', '.join(settings)}")
    config = config if config is not None else CompressConfig.from_keywords(**settings)
    run = run_pipeline(input_path, output_path, config, calibration=calibration, overwrite=overwrite,
                       trust_checkpoint=trust_checkpoint)
    assert run.artifact is not None and run.report is not None
    return run.artifact, run.report


# ---------------------------------------------------------------------- stages
def load_input(
    path: PathLike,
    *,
    trust_checkpoint: bool = False,
    model_class: Optional[str] = None,
    progress: Optional[ProgressCallback] = None,
) -> CompressionRun:
    """Load: the model in a checkpoint or artifact (see :mod:`kcompress.io`), or the user's
    ``model_class`` built and given the checkpoint's weights, and its source record. A trusted pickled
    model's class may live in the ``model_class`` file: its folder is importable while the file loads."""
    _step(progress, "load", f"loading {path}")
    module = (model_class or "").rpartition(":")[0]
    with searching(*([str(Path(module).resolve().parent)] if module.endswith(".py") else [])):
        checkpoint = load_checkpoint(path, trust_checkpoint=trust_checkpoint)
    source = {"path": str(path), "kind": checkpoint.kind, "sha256": checkpoint.sha256}
    model = model_from_checkpoint(checkpoint) if model_class is None else build_user_model(model_class, checkpoint)
    return CompressionRun(dense=model, source=source)


def build_user_model(reference: str, checkpoint: Checkpoint) -> nn.Module:
    """``Class()`` from ``"file.py:Class"`` or ``"module:Class"``, holding the checkpoint's weights (an
    artifact is restored into it with :func:`kcompress.load`); one-line errors for every mismatch."""
    cls = import_reference(reference, "model", kind="class")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise KCompressError(f"model {reference} is not a torch nn.Module class")
    try:
        model = cls()
    except Exception as error:  # noqa: BLE001 - the user's constructor: one line
        raise KCompressError(f"model {reference}: {cls.__name__}() raised {type(error).__name__}: {error} (the "
                             "class must be constructible without arguments)") from error
    if checkpoint.kind == "artifact":
        return load(checkpoint.path, model=model)
    _check_state_keys(reference, model, checkpoint)
    model.load_state_dict(checkpoint.state_dict)
    return model


def _check_state_keys(reference: str, model: nn.Module, checkpoint: Checkpoint) -> None:
    """The checkpoint's tensors are exactly the model's, with the same shapes (one-line error otherwise)."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in checkpoint.state_dict]
    unexpected = [key for key in checkpoint.state_dict if key not in expected]
    shapes = [f"{key} {tuple(checkpoint.state_dict[key].shape)} vs {tuple(tensor.shape)}"
              for key, tensor in expected.items()
              if key in checkpoint.state_dict and checkpoint.state_dict[key].shape != tensor.shape]
    problems = [f"{what}: {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape (file vs model)", shapes))
                if keys]
    if problems:
        raise KCompressError(f"{checkpoint.path} does not fit model {reference}: {'; '.join(problems)}")


def prepare_evaluation(run: CompressionRun, spec: EvalSpec, progress: Optional[ProgressCallback] = None) -> None:
    """Evaluation: load the data / import the evaluator and measure the dense baseline (before any fit)."""
    _step(progress, "evaluation", f"loading {spec.data or spec.evaluator}")
    run.evaluation = load_evaluation(spec)
    run.baseline = measure(run, run.dense, "dense model", progress)


def fit(run: CompressionRun, config: CompressConfig, *, calibration: Any = None,
        progress: Optional[ProgressCallback] = None, prepared: Optional[Prepared] = None) -> None:
    """Select, fit and choose the execution paths: :func:`compress_checked` on the dense model."""
    run.compressed, run.report = compress_checked(run.dense, config, calibration=calibration, progress=progress,
                                                  where=run.source.get("path"), prepared=prepared)
    run.report.source = dict(run.source)


def compress_checked(model: nn.Module, config: CompressConfig, *, calibration: Any = None,
                     progress: Optional[ProgressCallback] = None, where: Optional[str] = None,
                     prepared: Optional[Prepared] = None) -> tuple[nn.Module, Report]:
    """:func:`kcompress.runs.convert.compress_model`, with a model that has nothing to compress made an error
    (naming ``where``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NOTHING_MATCHED, category=KCompressWarning)
        compressed, report = compress_model(model, config, calibration=calibration, progress=progress,
                                            prepared=prepared)
    if not report.matrices:
        raise KCompressError(nothing_to_compress(report, where))
    return compressed, report


def nothing_to_compress(report: Report, where: Optional[str] = None) -> str:
    """The message for a report without a compressed matrix: why each layer was left (layers left for the
    same reason named together, at most three of them, so that thousands of layers still make one line)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for skipped in report.skipped:
        groups.setdefault((skipped.layer_type, skipped.reason), []).append(skipped.name or "(model)")
    reasons = "; ".join(f"{', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''} ({kind}): "
                        f"{reason}" for (kind, reason), names in groups.items())
    detail = f" ({reasons})" if reasons else " (it has no LSTM, GRU, LSTMCell, GRUCell or Linear layer)"
    return f"{where + ': ' if where else ''}nothing to compress: {NOTHING_MATCHED}{detail}"


def measure(run: CompressionRun, model: nn.Module, what: str, progress: Optional[ProgressCallback] = None) -> float:
    """Evaluate: the metric of ``model`` (the run's dense, compressed or fine-tuned model, named by ``what``)."""
    assert run.evaluation is not None
    evaluation = run.evaluation
    _step(progress, "measure", f"measuring {evaluation.description}: {what}")
    value = evaluation.measure(model)
    if progress is not None:
        progress(ProgressEvent("metric", what, error=value, message=f"{evaluation.name} of the {what}: {value:.4g}"))
    return value


def fine_tune(run: CompressionRun, settings: FinetuneOptions, seed: int = 0,
              progress: Optional[ProgressCallback] = None) -> None:
    """Fine-tune: the compressed model in place on the evaluation's training data, distilling from the dense
    model unless the loss is ``task``."""
    assert run.evaluation is not None and run.compressed is not None
    _check_finetuning(settings, run.evaluation.spec)
    assert run.evaluation.train_data is not None
    teacher = run.dense if settings.loss != "task" else None
    run.finetuning = finetune(run.compressed, run.evaluation.train_data, teacher=teacher, epochs=settings.fit_epochs,
                              lr=settings.lr, loss=settings.loss, task=run.evaluation.spec.task, seed=seed,
                              progress=progress)


def recovery_finetuning(run: CompressionRun, settings: FinetuneOptions) -> Optional[FinetuneOptions]:
    """The fine-tuning to run on a model that fails its budget: ``settings`` as given (epochs N > 0), with
    ``epochs="auto"`` up to :data:`~kcompress.config.compress.RECOVERY_EPOCHS` epochs on the labels and the
    dense model's outputs (loss ``"both"``; distillation alone has run by then) when the evaluation has
    labelled data to train on apart from what it scores (a built-in dataset's train split,
    ``finetune_data``, a held-out part, or an evaluator's data); else None."""
    if settings.fit_epochs > 0:
        return settings
    spec = run.evaluation.spec if run.evaluation is not None else None
    apart = spec is not None and spec.data is not None and (spec.is_builtin or spec.finetune_data is not None
                                                            or spec.holdout > 0 or spec.evaluator is not None)
    if settings.epochs != "auto" or not apart:
        return None
    return replace(settings, epochs=settings.recovery_epochs, loss="both")


def _check_finetuning(settings: FinetuneOptions, spec: Optional[EvalSpec]) -> None:
    if settings.fit_epochs > 0 and (spec is None or (spec.data is None and spec.finetune_data is None)):
        raise KCompressError("fine-tuning needs data: give a built-in dataset or a data file")


def _misses(run: CompressionRun, budget: Budget) -> bool:
    """Whether the run's metric so far misses ``budget`` (False without a budget or a baseline)."""
    if run.baseline is None or budget.max_drop is None:
        return False
    record_metrics(run, budget)
    assert run.report is not None
    return run.report.metrics["passed"] is False


def distil(run: CompressionRun, config: CompressConfig, calibration: Any,
           progress: Optional[ProgressCallback] = None) -> None:
    """Recover: unlabeled distillation of ``run.compressed`` from the dense model on the calibration data for
    up to ``config.recovery.recovery_epochs`` (:meth:`kcompress.calibration.run.CalibrationRun.finish`), its
    record put into ``report.calibration["distill"]`` beside the fit's calibration record."""
    assert run.compressed is not None and run.report is not None
    _step(progress, "distill", "distilling from the dense model on the calibration inputs")
    recovery = replace(config.recovery, distill_epochs=config.recovery.recovery_epochs)
    finished = Report()
    CalibrationRun(calibration, config.replace(recovery=recovery)).finish(run.compressed, run.dense, finished,
                                                                          config.seed, progress)
    assert finished.calibration is not None
    run.report.calibration = {**(run.report.calibration or {}), "distill": finished.calibration["distill"]}


def record_metrics(run: CompressionRun, budget: Budget) -> None:
    """Metrics: baseline, compressed and fine-tuned values and the drop into the report; its status becomes
    ``"failed"`` when the budget was missed."""
    assert run.report is not None and run.evaluation is not None and run.baseline is not None
    assert run.compressed_metric is not None
    metrics = metrics_record(run.evaluation, run.baseline, run.compressed_metric, run.finetuned_metric, budget)
    run.report.metrics = metrics
    run.report.status = "failed" if metrics["passed"] is False else "ok"


def write_artifact(run: CompressionRun, path: PathLike, *, overwrite: bool = False,
                   progress: Optional[ProgressCallback] = None) -> Path:
    """Write: the compressed model and its report as one artifact, atomically."""
    assert run.compressed is not None and run.report is not None
    _step(progress, "write", f"writing {path}")
    source = run.source.get("path")
    run.artifact = save_artifact(run.compressed, run.report, path, overwrite=overwrite, source_path=source)
    return run.artifact


def _step(progress: Optional[ProgressCallback], name: str, message: str) -> None:
    if progress is not None:
        progress(ProgressEvent("step", name, message=f"{message} ..."))


__all__ = [
    "CompressionRun", "output_tag", "build_user_model", "compress_checked", "compress_file", "compress_stages", "fine_tune",
    "fit", "load_input", "measure", "nothing_to_compress", "prepare_evaluation", "record_metrics", "run_pipeline",
    "write_artifact",
]
