"""``kcompress sweep``: a grid of formats × ranks in local worker processes or on a Dask cluster, resumable,
with the Pareto front."""

from __future__ import annotations

import json
import os
import pathlib
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

import click

from kcompress.cli.options import (
    COMPRESSION_FORMATS,
    EXIT_BUDGET,
    ORDER,
    SEED,
    FiniteFloat,
    FormatListType,
    IntListType,
    budget,
    budget_options,
    check_finetune,
    common_options,
    eval_options,
    eval_spec,
    finetune_options,
    fit_option,
    guarded,
    model_option,
    trust_option,
)
from kcompress.cli.plot import plot_pareto
from kcompress.cli.render import Display, pareto_table
from kcompress.runs.executors import CONNECT_TIMEOUT, SCHEDULER_ENV, scheduler_address

if TYPE_CHECKING:  # the library (torch) loads when the command runs, not for --help
    from kcompress.runs.sweep import SweepResult

PLOT_FILE = "pareto.png"

EPILOG = """\b
Examples:
  kcompress sweep lstm.pt --formats kcp,svd --ranks 1,2,4,8,16 --eval japanese-vowels
  kcompress sweep model.pt --formats kcp,tt,ht,svd --ranks 2,4,8 --eval val.npz --finetune-epochs 5 \\
      --jobs 4 --out runs/sweep1
  kcompress sweep model.pt --formats kcp,svd --ranks 2,4,8 --eval val.npz --scheduler tcp://10.0.0.5:8786
  kcompress sweep model.pt --ranks 2,4,8,16 --evaluator mymetrics:loss --lower-is-better --max-drop 0.05

\b
Rerunning the same command resumes: trials already in DIR/trials.jsonl are skipped."""


@click.command("sweep", epilog=EPILOG)
@click.argument("model", type=click.Path(readable=False, path_type=pathlib.Path))
@click.option("--formats", "format_names", type=FormatListType(), default=",".join(COMPRESSION_FORMATS),
              show_default=True, help="Formats to try.")
@click.option("--ranks", type=IntListType(), default="2,4,8,16", show_default=True, help="Ranks to try.")
@click.option("--targets", type=click.Choice(["ih", "hh", "ih,hh"]), default="ih,hh", show_default=True,
              help="Recurrent matrices to compress.")
@click.option("--gates", type=click.Choice(["fused", "separate"]), default="fused", show_default=True,
              help="Fit an LSTM/GRU matrix's gates as one matrix or one fit per gate.")
@click.option("--order", type=ORDER, metavar="D", help="Tensor order (number of modes).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of every fit and fine-tuning.")
@fit_option
@click.option("--jobs", type=click.IntRange(min=1), metavar="N",
              help="Local worker processes, each with one torch thread (default: the number of CPUs).")
@click.option("--scheduler", metavar="tcp://HOST:PORT",
              help=f"Run the trials on the Dask cluster of this scheduler instead (default: ${SCHEDULER_ENV} when "
                   "set; needs pip install 'kcompress[distributed]'). See docs/distributed.md.")
@click.option("--scheduler-timeout", type=FiniteFloat(min=0, min_open=True), default=CONNECT_TIMEOUT,
              show_default=True, metavar="SECONDS",
              help="How long the Dask scheduler may take to answer before the sweep fails (one line naming it).")
@click.option("--shared-files", is_flag=True,
              help="With --scheduler: every worker reads MODEL and the data/evaluator files at the same paths "
                   "(a shared file system), so their bytes are not sent to each worker.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="Folder for trials.jsonl and pareto.png (default: MODEL's name + '.sweep' beside it).")
@eval_options
@finetune_options
@budget_options("the most compressed trial within it is named, and the exit code is 3 when no trial "
                "is.")
@model_option
@trust_option
@common_options
@guarded
def sweep_command(model: pathlib.Path, format_names: list[str], ranks: list[int], targets: str, gates: str,
                  order: Optional[int], seed: int, fit_option: tuple[tuple[str, Any], ...], jobs: Optional[int],
                  scheduler: Optional[str], scheduler_timeout: float,
                  shared_files: bool, out_dir: Optional[pathlib.Path],
                  eval_data: Optional[str], task: str, evaluator: Optional[str], lower_is_better: bool,
                  finetune_epochs: Union[int, str], finetune_loss: str, finetune_lr: Union[float, str], max_drop: Optional[float],
                  drop_type: str, model_class: Optional[str], trust_checkpoint: bool, quiet: bool,
                  debug: bool) -> None:
    """Compress MODEL with every format and rank, measure each, and show the Pareto front.

    Each trial (fit, optional fine-tuning, evaluation) runs in a local worker process, or on a Dask
    cluster with --scheduler, and is appended to DIR/trials.jsonl as it finishes. With --max-drop, the most compressed trial within the budget is
    named, and the exit code is 3 when none is.
    """
    from kcompress.config import FinetuneOptions
    from kcompress.io import check_input_file
    from kcompress.runs.sweep import expand_grid, run_sweep

    spec = eval_spec(eval_data, task, evaluator, lower_is_better)
    if spec is None:
        raise click.UsageError("a sweep needs a metric: give --eval DATA or --evaluator MODULE:FUNCTION")
    spec = check_finetune(finetune_epochs, spec)
    assert spec is not None  # check_finetune keeps a given spec
    limits = budget(max_drop, drop_type, spec)
    check_input_file(model)
    if scheduler and jobs:
        raise click.UsageError("--jobs sets local worker processes; with --scheduler the cluster's workers run "
                               "the trials")
    address = None if jobs else scheduler_address(scheduler)
    out = out_dir or model.with_name(model.name + ".sweep")
    trials = expand_grid(format_names, ranks, targets=targets, gates=gates, order=order, seed=seed,
                         finetune=FinetuneOptions(finetune_epochs, finetune_loss, finetune_lr),
                         fit_options=dict(fit_option))
    display = Display(quiet)
    with display.warnings_shown(), display.progress() as progress:
        result = run_sweep(model, trials, spec, out, jobs=jobs or os.cpu_count() or 1,
                           scheduler=address, scheduler_timeout=scheduler_timeout, shared_files=shared_files,
                           trust_checkpoint=trust_checkpoint, model_class=model_class, budget=limits,
                           progress=progress)
    _show(display, result, out)
    if limits.max_drop is not None and result.best is None:
        display.note(f"budget not met: no trial keeps the {spec.metric_name} drop within {limits.max_drop:g} "
                     f"({limits.drop_type}) (exit 3)")
        raise click.exceptions.Exit(EXIT_BUDGET)


def _show(display: Display, result: SweepResult, out: pathlib.Path) -> None:
    """Failed trials as warnings, the front as a table, the plot, and the best trial within the budget."""
    from kcompress.runs.sweep import trial_label

    for row in result.errors:
        display.warning(f"trial {trial_label(row['trial'])} failed: {row['error']}")
    metric = result.eval_spec.metric_name
    display.show(pareto_table(result.front, metric, result.budget.drop_type))
    display.result(f"{len(result.rows)} trials ({result.resumed} resumed) in {result.trials_path}")
    if plot_pareto([r for r in result.rows if r["status"] == "ok" and r["metric"] is not None], result.front,
                   out / PLOT_FILE, metric):
        display.result(f"wrote {out / PLOT_FILE}")
    else:
        display.note(f"matplotlib is not installed, so {out / PLOT_FILE} was not written "
                     "(pip install 'kcompress[plot]')")
    if result.best is not None:
        best = result.best
        display.result(f"best within the budget: {trial_label(best['trial'])} (ratio "
                       f"{best['compression_ratio']:.2f}×, {metric} {best['metric']:.4g}, drop {best['drop']:.4g}); "
                       f"reproduce it with: kcompress {_command(best)}")


def _command(row: Mapping[str, Any]) -> str:
    """The compress command line of one trial (without the evaluation options)."""
    trial = row["trial"]
    parts = [f"MODEL --format {trial['format']} --rank {trial['rank']} --targets {trial['targets']}",
             f"--gates {trial['gates']} --seed {trial['seed']}"]
    if trial["order"] is not None:
        parts.append(f"--order {trial['order']}")
    parts += [f"--fit-option {key}={json.dumps(value, separators=(',', ':'))}"
              for key, value in trial.get("fit_options", ())]
    return " ".join(parts)
