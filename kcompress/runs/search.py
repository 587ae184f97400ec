"""The accuracy budget search: the smallest model whose measured metric drop stays within ``max_drop``.

Each step allocates one global budget (:mod:`kcompress.allocation.choose`; the calibration set and the error curves
are made once per search by :func:`kcompress.allocation.auto.prepare` and reused by every step), fits it, and measures
the metric through the pipeline's stages. Recovery is spent only where it decides the answer: a step whose
fitted model already passes is not trained further; one that fails is distilled on the calibration inputs
(``distill_epochs``, by default up to ``RECOVERY_EPOCHS`` with early stopping, no labels;
:func:`kcompress.runs.pipeline.distil`) and measured again, and, if it still
fails, fine-tuned (``finetuning``) and measured again. A step whose allocation equals an earlier step's is
not fitted again: it reuses that step's model and metric.

The budget is a compression ratio over the targeted matrices: the search starts at :data:`FIRST_RATIO` and
doubles the ratio while steps pass. Accuracy is not monotone in the ratio (a smaller model with another
choice of formats can measure better, e.g. the JapaneseVowels GRU fails at 4x and passes at 8x), so one
failure does not end the doubling: it ends after :data:`EXPANSION_FAILURES` failures in a row. Then the
ratio is bisected in log space between the largest passing ratio and the smallest failing one above it
(a pass above a failure moves the lower bound past it), until they are within ``tolerance`` of each other
or ``max_steps`` ran. The result is the passing step with the largest achieved ratio, or, when none passed,
the step with the smallest drop (its report marked failed).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

from kcompress.allocation.auto import Prepared, prepare
from kcompress.allocation.choose import Allocation
from kcompress.calibration.moments import CalibrationSet, calibration_set
from kcompress.config import CompressConfig, RecoveryOptions
from kcompress.errors import KCompressError
from kcompress.io import PathLike, check_output_path, default_output_path
from kcompress.progress import ProgressCallback, ProgressEvent
from kcompress.runs.pipeline import (
    CompressionRun,
    distil,
    fine_tune,
    fit,
    load_input,
    measure,
    prepare_evaluation,
    record_metrics,
    recovery_finetuning,
    write_artifact,
)
from kcompress.tuning.evaluate import Budget, EvalSpec

#: stop bisecting when the upper over the lower ratio bound is below ``1 + TOLERANCE``
TOLERANCE = 0.2
MAX_STEPS = 10
#: the first ratio tried, and the factor by which passing ratios grow until one fails
FIRST_RATIO = 2.0
GROWTH = 2.0
#: consecutive failing steps that end the doubling (accuracy is not monotone in the ratio: a model one step
#: smaller can measure better)
EXPANSION_FAILURES = 2


@dataclass
class SearchStep:
    """One budget tried: the ratio asked, the parameter (or MAC) budget and what the allocation used, the
    final metric, its drop from the dense baseline, whether it passed, and the seconds the step took.
    ``fitted_metric`` is the metric right after the fit; ``recovery`` the stages run after it because the
    step was failing (``"distill"``, ``"finetune"``); ``reused`` the index of the earlier step with the same
    allocation whose model and metric this step took (nothing fitted)."""

    ratio: float
    budget: int
    used: int
    achieved_ratio: float
    metric: float
    drop: float
    passed: bool
    seconds: float
    fitted_metric: float = math.nan
    recovery: list[str] = field(default_factory=list)
    reused: Optional[int] = None


@dataclass
class SearchResult:
    """The trajectory, the index of the chosen step (the best passing one, else the closest) and its run."""

    steps: list[SearchStep] = field(default_factory=list)
    chosen: Optional[int] = None
    run: Optional[CompressionRun] = None

    @property
    def passed(self) -> bool:
        return self.chosen is not None and self.steps[self.chosen].passed

    def to_dict(self, budget: Budget) -> dict[str, Any]:
        return {"max_drop": budget.max_drop, "drop_type": budget.drop_type, "passed": self.passed,
                "chosen": self.chosen, "steps": [asdict(step) for step in self.steps]}


def search_budget(
    run: CompressionRun,
    prepared: Prepared,
    budget: Budget,
    config: CompressConfig,
    *,
    calibration: Any = None,
    max_steps: int = MAX_STEPS,
    tolerance: float = TOLERANCE,
    progress: Optional[ProgressCallback] = None,
) -> SearchResult:
    """Search the largest compression ratio whose drop is within ``budget`` (see the module doc).

    ``run`` holds the dense model, its evaluation and the measured baseline
    (:func:`kcompress.runs.pipeline.prepare_evaluation`); ``config`` is an allocated config whose ratio the
    search chooses (its budget gives neither ratio nor params); each step fits it at one ratio, with the
    ``calibration`` data (sampled once, :func:`sampled_calibration`) that ``prepared`` was made from. The chosen
    step's report carries the trajectory under ``report.search``.
    """
    if run.evaluation is None or run.baseline is None:
        raise KCompressError("the budget search needs an evaluation with a measured baseline")
    if budget.max_drop is None:
        raise KCompressError("the budget search needs a maximum drop")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise KCompressError(f"max_steps must be a positive integer, got {max_steps!r}")
    if not config.budget.searched:
        raise KCompressError("the budget search chooses the formats' ranks and the ratio itself: give an allocated "
                             "config without rank, ratio or params")
    if config.recovery.fit_epochs and calibration is None:
        raise KCompressError("distill_epochs needs calibration data (the inputs to distil on)")
    calibration = sampled_calibration(calibration, config)
    result = SearchResult()
    runs: list[CompressionRun] = []
    limit = largest_ratio(prepared)
    ratio, expanding = min(FIRST_RATIO, limit), True
    while len(result.steps) < max_steps:
        step_run, step = _step(run, prepared, ratio, budget, config, calibration, progress, result.steps, runs)
        runs.append(step_run)
        result.steps.append(step)
        low, high = _bounds(result.steps, limit)
        failures = len(result.steps) - 1 - max((i for i, s in enumerate(result.steps) if s.passed), default=-1)
        if expanding and failures < EXPANSION_FAILURES and ratio < limit:
            ratio = min(ratio * GROWTH, limit)
            continue
        expanding = False
        if high / low < 1 + tolerance:
            break
        ratio = math.sqrt(low * high)
    result.chosen = _choose(result.steps)
    result.run = runs[result.chosen]
    assert result.run.report is not None
    result.run.report.search = result.to_dict(budget)
    return result


def run_search(
    input_path: PathLike,
    output_path: Optional[PathLike],
    config: CompressConfig,
    *,
    evaluation: EvalSpec,
    budget: Budget,
    calibration: Any = None,
    overwrite: bool = False,
    trust_checkpoint: bool = False,
    model_class: Optional[str] = None,
    progress: Optional[ProgressCallback] = None,
) -> SearchResult:
    """The search from a checkpoint file to the artifact of the chosen step (default path: beside the input,
    ``model.auto.safetensors``), through the pipeline's stages: load, evaluation and baseline,
    :func:`kcompress.allocation.auto.prepare`, :func:`search_budget`, write. The chosen report's status is
    ``"failed"`` when no step passed."""
    source = Path(input_path)
    target = Path(output_path) if output_path is not None else default_output_path(source, "auto")
    check_output_path(target, overwrite=overwrite, source=source)
    if not config.budget.searched:
        raise KCompressError("the budget search chooses the ratio itself: give neither rank, ratio nor params")
    run = load_input(source, trust_checkpoint=trust_checkpoint, model_class=model_class, progress=progress)
    prepare_evaluation(run, evaluation, progress)
    if progress is not None:
        progress(ProgressEvent("step", "allocate", message="estimating error curves ..."))
    data = sampled_calibration(calibration, config)
    prepared = prepare(run.dense, config, data)
    result = search_budget(run, prepared, budget, config, calibration=data, progress=progress)
    assert result.run is not None
    write_artifact(result.run, target, overwrite=overwrite, progress=progress)
    return result


def sampled_calibration(calibration: Any, config: CompressConfig) -> Optional[CalibrationSet]:
    """The calibration data sampled once into a :class:`~kcompress.calibration.moments.CalibrationSet` (as every
    fit would sample it: same samples, held-out fraction and seed), so the error curves and every step use
    the same calls; None without data."""
    if calibration is None:
        return None
    options = config.calibration
    return calibration_set(calibration, options.samples, options.holdout, config.seed)


def _bounds(steps: Sequence[SearchStep], limit: float) -> tuple[float, float]:
    """``(largest passing ratio or 1, smallest failing ratio above it or limit)``."""
    low = max((s.ratio for s in steps if s.passed), default=1.0)
    high = min((s.ratio for s in steps if not s.passed and s.ratio > low), default=limit)
    return low, high


def largest_ratio(prepared: Prepared) -> float:
    """Dense size over the cheapest allocation (every matrix at its cheapest option)."""
    cheapest = sum(min(o.cost(prepared.objective) for o in options) for options in prepared.options)
    return prepared.dense / cheapest


def _step(run: CompressionRun, prepared: Prepared, ratio: float, budget: Budget, config: CompressConfig,
          calibration: Optional[CalibrationSet], progress: Optional[ProgressCallback], steps: Sequence[SearchStep],
          runs: Sequence[CompressionRun]) -> tuple[CompressionRun, SearchStep]:
    """Allocate at one ratio; reuse an earlier step with the same allocation, else fit, measure, and recover
    (distil, then fine-tune) only while the step fails."""
    start = time.perf_counter()
    allocation = prepared.allocate(ratio=ratio)
    if progress is not None:
        progress(ProgressEvent("step", "search", message=f"trying {ratio:.3g}x ({allocation.used:,} of "
                                                         f"{allocation.dense:,} {_unit(prepared)}) ..."))
    earlier = next((i for i, s in enumerate(steps) if s.reused is None and _same(runs[i], allocation)), None)
    if earlier is not None:
        step = replace(steps[earlier], ratio=ratio, budget=allocation.budget, recovery=[], reused=earlier,
                       seconds=time.perf_counter() - start)
        _announce(progress, step, runs[earlier])
        return runs[earlier], step
    step_run = CompressionRun(dense=run.dense, source=dict(run.source), evaluation=run.evaluation,
                              baseline=run.baseline)
    step_config = config.replace(budget=replace(config.budget, ratio=ratio),
                                 recovery=RecoveryOptions(finetune=config.recovery.finetune))
    fit(step_run, step_config, calibration=calibration, progress=progress, prepared=prepared)
    assert step_run.report is not None and step_run.compressed is not None
    fitted = _measure(step_run, budget, "compressed model", progress)
    recovery = []
    if not step_run.report.metrics["passed"] and calibration is not None and config.recovery.recovery_epochs:
        distil(step_run, config, calibration, progress)
        recovery.append("distill")
        _measure(step_run, budget, "distilled model", progress)
    finetuning = recovery_finetuning(step_run, config.recovery.finetune)
    if not step_run.report.metrics["passed"] and finetuning is not None:
        fine_tune(step_run, finetuning, seed=config.seed, progress=progress)
        recovery.append("finetune")
        _measure(step_run, budget, "fine-tuned model", progress)
    metrics = step_run.report.metrics
    assert step_run.metric is not None
    step = SearchStep(ratio, allocation.budget, allocation.used, allocation.ratio, step_run.metric,
                      float(metrics["drop"]), bool(metrics["passed"]), time.perf_counter() - start, fitted,
                      recovery)
    _announce(progress, step, step_run)
    return step_run, step


def _same(earlier: CompressionRun, allocation: Allocation) -> bool:
    """Whether ``earlier`` fitted exactly ``allocation``'s (matrix, format, rank) choices."""
    assert earlier.report is not None and earlier.report.allocation is not None
    chosen = [(row["matrix"], row["format"], row["rank"]) for row in earlier.report.allocation["rows"]]
    return chosen == [(row.matrix, row.format, row.rank) for row in allocation.rows]


def _measure(run: CompressionRun, budget: Budget, what: str, progress: Optional[ProgressCallback]) -> float:
    """Measure ``run.compressed`` (as its fine-tuned metric once fine-tuning ran) and record the metrics."""
    assert run.compressed is not None
    value = measure(run, run.compressed, what, progress)
    if run.finetuning is None:
        run.compressed_metric = value
    else:
        run.finetuned_metric = value
    record_metrics(run, budget)
    return value


def _announce(progress: Optional[ProgressCallback], step: SearchStep, run: CompressionRun) -> None:
    if progress is None:
        return
    assert run.report is not None
    verdict = "pass" if step.passed else "fail"
    how = f", reusing step {step.reused + 1}" if step.reused is not None else (
        f" after {' and '.join(step.recovery)}" if step.recovery else "")
    progress(ProgressEvent("metric", "search", error=step.metric,
                           message=f"{step.achieved_ratio:.3g}x: {run.report.metrics['name']} {step.metric:.4g}, "
                                   f"drop {step.drop:.4g} ({verdict}{how})"))


def _choose(steps: list[SearchStep]) -> int:
    """The passing step with the largest achieved ratio, else the step with the smallest drop."""
    passing = [i for i, s in enumerate(steps) if s.passed]
    if passing:
        return max(passing, key=lambda i: (steps[i].achieved_ratio, -i))
    return min(range(len(steps)), key=lambda i: (steps[i].drop if not math.isnan(steps[i].drop) else math.inf, i))


def _unit(prepared: Prepared) -> str:
    return "parameters" if prepared.objective == "size" else "MACs"
