"""The accuracy budget search: the smallest model whose measured metric drop stays within ``max_drop``.

Each step allocates one global budget (:mod:`kcompress.allocate`, error curves estimated once by
:func:`kcompress.auto.prepare`), compresses, optionally fine-tunes, and measures the metric through the
pipeline's stages (:func:`kcompress.pipeline.compress_stages`). The budget is a compression ratio over the
targeted matrices: the search starts at :data:`FIRST_RATIO` and doubles the ratio until
:data:`EXPANSION_FAILURES` steps in a row fail (or the smallest model the formats allow is reached), then
bisects in log space between the largest passing ratio and the smallest failing one above it, until they
are within ``tolerance`` of each other or ``max_steps`` ran. The result
is the passing step with the largest ratio, or, when none passed, the step with the smallest drop (its
report marked failed).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .auto import Prepared, attach_allocation, prepare_for
from .errors import KCompressError
from .evaluate import Budget, EvalSpec
from .io import PathLike, check_output_path, default_output_path
from .pipeline import (
    CompressionRun,
    FinetuneSettings,
    compress_stages,
    load_input,
    prepare_evaluation,
    write_artifact,
)
from .progress import ProgressCallback, ProgressEvent

#: stop bisecting when the upper over the lower ratio bound is below ``1 + TOLERANCE``
TOLERANCE = 0.15
MAX_STEPS = 10
#: the first ratio tried, and the factor by which passing ratios grow until one fails
FIRST_RATIO = 2.0
GROWTH = 2.0
#: consecutive failing steps that end the doubling (one failure may be noise: a model one step smaller can
#: measure better after fine-tuning)
EXPANSION_FAILURES = 2


@dataclass
class SearchStep:
    """One budget tried: the ratio asked, the parameter (or MAC) budget and what the allocation used, the
    metric after compression (and fine-tuning), its drop from the dense baseline, whether it passed."""

    ratio: float
    budget: int
    used: int
    achieved_ratio: float
    metric: float
    drop: float
    passed: bool
    seconds: float


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
    *,
    finetuning: FinetuneSettings = FinetuneSettings(),
    max_steps: int = MAX_STEPS,
    tolerance: float = TOLERANCE,
    progress: Optional[ProgressCallback] = None,
    **compress_kwargs: Any,
) -> SearchResult:
    """Search the largest compression ratio whose drop is within ``budget`` (see the module doc).

    ``run`` holds the dense model, its evaluation and the measured baseline
    (:func:`kcompress.pipeline.prepare_evaluation`); ``compress_kwargs`` go to every step's
    :func:`kcompress.compress` (calibration, seed, targets, ...; not format, rank, ratio or overrides).
    The chosen step's report carries the trajectory under ``report.search``.
    """
    if run.evaluation is None or run.baseline is None:
        raise KCompressError("the budget search needs an evaluation with a measured baseline")
    if budget.max_drop is None:
        raise KCompressError("the budget search needs a maximum drop")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise KCompressError(f"max_steps must be a positive integer, got {max_steps!r}")
    chosen_by_search = sorted({"format", "rank", "ratio", "params", "allocate", "overrides", "config"} & set(compress_kwargs))
    if chosen_by_search:
        raise KCompressError(f"the budget search chooses {', '.join(chosen_by_search)} itself; do not give them")
    result = SearchResult()
    runs: list[CompressionRun] = []
    limit = largest_ratio(prepared)
    ratio, expanding = min(FIRST_RATIO, limit), True
    while len(result.steps) < max_steps:
        step_run, step = _step(run, prepared, ratio, budget, finetuning, progress, compress_kwargs)
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
    output_path: Optional[PathLike] = None,
    *,
    format: Union[str, Sequence[str]],
    evaluation: EvalSpec,
    budget: Budget,
    objective: str = "size",
    overwrite: bool = False,
    trust_checkpoint: bool = False,
    model_class: Optional[str] = None,
    finetuning: FinetuneSettings = FinetuneSettings(),
    progress: Optional[ProgressCallback] = None,
    **compress_kwargs: Any,
) -> SearchResult:
    """The search from a checkpoint file to the artifact of the chosen step (default path: beside the input,
    ``model.auto.safetensors``), through the pipeline's stages: load, evaluation and baseline,
    :func:`kcompress.auto.prepare`, :func:`search_budget`, write. ``compress_kwargs`` go to every step's
    :func:`kcompress.compress`. The chosen report's status is ``"failed"`` when no step passed."""
    source = Path(input_path)
    target = Path(output_path) if output_path is not None else default_output_path(source, "auto")
    check_output_path(target, overwrite=overwrite, source=source)
    run = load_input(source, trust_checkpoint=trust_checkpoint, model_class=model_class, progress=progress)
    prepare_evaluation(run, evaluation, progress)
    if progress is not None:
        progress(ProgressEvent("step", "allocate", message="estimating error curves ..."))
    prepared = prepare_for(run.dense, format, objective, compress_kwargs)
    result = search_budget(run, prepared, budget, finetuning=finetuning, progress=progress, **compress_kwargs)
    assert result.run is not None
    write_artifact(result.run, target, overwrite=overwrite, progress=progress)
    return result


def _bounds(steps: Sequence[SearchStep], limit: float) -> tuple[float, float]:
    """``(largest passing ratio or 1, smallest failing ratio above it or limit)``."""
    low = max((s.ratio for s in steps if s.passed), default=1.0)
    high = min((s.ratio for s in steps if not s.passed and s.ratio > low), default=limit)
    return low, high


def largest_ratio(prepared: Prepared) -> float:
    """Dense size over the cheapest allocation (every matrix at its cheapest option)."""
    cheapest = sum(min(o.cost(prepared.objective) for o in options) for options in prepared.options)
    return prepared.dense / cheapest


def _step(run: CompressionRun, prepared: Prepared, ratio: float, budget: Budget, finetuning: FinetuneSettings,
          progress: Optional[ProgressCallback], compress_kwargs: dict[str, Any]) -> tuple[CompressionRun, SearchStep]:
    """Allocate, compress, fine-tune and measure at one ratio."""
    start = time.perf_counter()
    allocation = prepared.allocate(ratio=ratio)
    if progress is not None:
        progress(ProgressEvent("step", "search", message=f"trying {ratio:.3g}x ({allocation.used:,} of "
                                                         f"{allocation.dense:,} {_unit(prepared)}) ..."))
    step_run = CompressionRun(dense=run.dense, source=dict(run.source), evaluation=run.evaluation,
                              baseline=run.baseline)
    options = dict(compress_kwargs)
    overrides = {**dict(options.pop("overrides", None) or {}), **allocation.overrides()}
    attach = lambda fitted: attach_allocation(fitted.report, fitted.compressed, prepared, allocation)
    compress_stages(step_run, finetuning=finetuning, budget=budget, progress=progress, after_fit=attach,
                    format=prepared.formats[0], rank=1, overrides=overrides, **options)
    assert step_run.report is not None and step_run.metric is not None
    metrics = step_run.report.metrics
    step = SearchStep(ratio, allocation.budget, allocation.used, allocation.ratio, step_run.metric,
                      float(metrics["drop"]), bool(metrics["passed"]), time.perf_counter() - start)
    if progress is not None:
        verdict = "pass" if step.passed else "fail"
        progress(ProgressEvent("metric", "search", error=step.metric,
                               message=f"{allocation.ratio:.3g}x: {metrics['name']} {step.metric:.4g}, "
                                       f"drop {step.drop:.4g} ({verdict})"))
    return step_run, step


def _choose(steps: list[SearchStep]) -> int:
    """The passing step with the largest achieved ratio, else the step with the smallest drop."""
    passing = [i for i, s in enumerate(steps) if s.passed]
    if passing:
        return max(passing, key=lambda i: (steps[i].achieved_ratio, -i))
    return min(range(len(steps)), key=lambda i: (steps[i].drop if not math.isnan(steps[i].drop) else math.inf, i))


def _unit(prepared: Prepared) -> str:
    return "parameters" if prepared.objective == "size" else "MACs"
