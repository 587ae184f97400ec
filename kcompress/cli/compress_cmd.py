"""``kcompress compress`` (the default command): parse the options, run the pipeline
(:func:`kcompress.runs.pipeline.run_pipeline`), render its report and set the exit code."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

import click

from kcompress.cli.allocation import allocation_options, allocation_request
from kcompress.cli.options import (
    COMPRESSION_FORMATS,
    EXIT_BUDGET,
    ORDER,
    SEED,
    FiniteFloat,
    ModesType,
    RankType,
    budget,
    budget_options,
    calibration_data,
    calibration_options,
    check_finetune,
    checked_targets,
    common_options,
    eval_options,
    eval_spec,
    finetune_data_option,
    finetune_options,
    fit_option,
    guarded,
    model_option,
    threads_option,
    trust_option,
)
from kcompress.cli.render import Display

if TYPE_CHECKING:  # the library (torch) loads when the command runs, not for --help
    from kcompress.cli.allocation import AllocationRequest
    from kcompress.config import CompressConfig
    from kcompress.report.record import Report
    from kcompress.tuning.evaluate import Budget, EvalSpec

EPILOG = """\b
Examples:
  kcompress model.pt --format kcp --rank 8
  kcompress model.pt --format svd --ratio 4 --targets ih,hh -o small.safetensors
  kcompress model.pt --format kcp --rank 8 --modes 4,4,16x8,8,8 --gates separate
  kcompress lstm.pt --format kcp --rank 8 --eval japanese-vowels --finetune-epochs 30
  kcompress lstm.pt --format tt --ratio 4 --targets ih,hh --calibrate japanese-vowels --calibrate-samples 64
  kcompress model.pt --format kcp --rank 4 --eval val.npz --task regression --max-drop 0.05 \\
      --drop-type relative --report report.json --markdown report.md
  kcompress model.pt --format tt --rank 8 --evaluator mymetrics:score --max-drop 0.01
  kcompress lstm.pt --formats kcp,tt,svd --ratio 8 --calibrate japanese-vowels
  kcompress lstm.pt --formats svd,kcp --size 40KB --quantize none,int8,int4 --calibrate japanese-vowels
  kcompress lstm.pt --formats kcp,tt,svd --calibrate japanese-vowels --eval japanese-vowels --max-drop 0.01 \\
      --finetune-epochs 40 --finetune-lr 0.02"""


@dataclass(frozen=True)
class Outputs:
    """Where results go: the artifact and the optional report files."""

    artifact: pathlib.Path
    report: Optional[pathlib.Path]
    markdown: Optional[pathlib.Path]


@click.command("compress", epilog=EPILOG)
@click.argument("model", type=click.Path(readable=False, path_type=pathlib.Path))
@click.option("--format", "format_", type=click.Choice(COMPRESSION_FORMATS),
              help="Weight format of the compressed matrices (an allocated budget uses only this one). Default: "
                   "kcp; an allocated budget (--ratio with --calibrate, --max-drop) chooses between kcp, tt and svd.")
@click.option("--rank", type=RankType(), help="Rank of every compressed matrix (clamped to each matrix's "
              "largest useful rank, with a warning); N,N,... for per-bond ranks (bt: N_b,r = blocks, "
              "Tucker rank).")
@click.option("--ratio", type=FiniteFloat(min=0, min_open=True), metavar="X",
              help="Instead of --rank: per matrix the largest rank with at most 1/X of its parameters.")
@click.option("--modes", type=ModesType(), metavar="OUTxIN", help="Mode shapes OUTxIN for every matrix, e.g. "
              "4,4,16x8,8,8 "
              "(products must cover the matrix; fused gates fold into the first output mode).")
@click.option("--order", type=ORDER, metavar="D", help="Tensor order (number of modes).")
@click.option("--targets", default="ih,hh", show_default=True, callback=checked_targets, metavar="LIST",
              help="What to compress, comma-separated: ih, hh (the recurrent matrices: input-to-hidden, "
              "hidden-to-hidden; those left out stay dense, and a warning says so), embedding (every Embedding "
              "table), linear (every Linear layer), or all (the whole model).")
@click.option("--quantize", metavar="none|int8|int4", help="Store the factors and every untouched tensor as integers "
              "with per-slice scales (biases int8); the report gives the whole model's bytes before and after either "
              "way. Default: none. With --size, a comma-separated list (e.g. none,int8,int4) to choose from; "
              "default none,int8.")
@click.option("--gates", type=click.Choice(["fused", "separate"]), default="fused", show_default=True,
              help="Fit an LSTM/GRU matrix's gates as one matrix or one fit per gate.")
@click.option("--execution", type=click.Choice(["auto", "factorized", "materialized"]), default="auto",
              show_default=True, help="How compressed matrices run: with the factors, as the reconstructed dense "
              "weight in torch's fused kernels, or whichever is faster here (measured). Stored in the artifact.")
@click.option("--include", multiple=True, metavar="GLOB", help="Compress only layers whose name matches "
              "(repeatable; Linear layers are compressed only when named here or by --targets, Embedding "
              "layers only by --targets; '*' takes all).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave layers whose name matches (repeatable).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of every fit and of fine-tuning.")
@fit_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="Artifact path (default: beside the input, e.g. model.kcp-r8.safetensors; never the input).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              metavar="FILE.json", help="Write the report as JSON (schema_version, per-matrix rows, metrics, status).")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              metavar="FILE.md", help="Write the report as Markdown (e.g. for a pull-request comment).")
@allocation_options
@eval_options
@calibration_options
@finetune_options
@finetune_data_option
@budget_options("when it is exceeded the exit code is 3, and the artifact is still written with its report "
                "marked failed.")
@model_option
@trust_option
@threads_option
@common_options
@guarded
def compress_command(model: pathlib.Path, format_: Optional[str], rank: Any, ratio: Optional[float], modes: Any,
                     order: Optional[int], targets: str, quantize: Optional[str], gates: str, execution: str,
                     include: tuple[str, ...],
                     exclude: tuple[str, ...], seed: int, fit_option: tuple[tuple[str, Any], ...],
                     output: Optional[pathlib.Path], overwrite: bool,
                     report_path: Optional[pathlib.Path], markdown_path: Optional[pathlib.Path],
                     formats: Optional[list[str]], allocate: Optional[str], params: Optional[int],
                     size: Optional[int], objective: str,
                     eval_data: Optional[str], task: str, evaluator: Optional[str], lower_is_better: bool,
                     calibrate_data: Optional[str], calibrate_samples: int, distill_epochs: Union[int, str],
                     distill_lr: Union[float, str],
                     finetune_epochs: Union[int, str], finetune_loss: str, finetune_lr: Union[float, str], finetune_data: Optional[str],
                     max_drop: Optional[float], drop_type: str, model_class: Optional[str], trust_checkpoint: bool,
                     threads: Optional[int], quiet: bool, debug: bool) -> None:
    """Compress the LSTM/GRU (and chosen Linear) layers of MODEL and write the artifact.

    MODEL is a state dict (.pt), safetensors file or kcompress artifact. Without a subcommand,
    `kcompress MODEL ...` runs this command. Progress goes to stderr, the report table to stdout.
    """
    from kcompress.io import check_input_file, check_output_paths, default_output_path

    request = allocation_request(format_, formats, allocate, rank, ratio, params, objective, max_drop,
                                 calibrated=calibrate_data is not None, size=size)
    spec = eval_spec(eval_data, task, evaluator, lower_is_better)
    spec = check_finetune(finetune_epochs, spec, finetune_data)
    limits = budget(max_drop, drop_type, spec)
    if spec is not None:
        spec.check()
    check_input_file(model)
    artifact = output or default_output_path(model, request.output_tag, rank=rank, ratio=ratio)
    check_output_paths({"--output": artifact, "--report": report_path, "--markdown": markdown_path},
                       overwrite=overwrite, source=model)
    outputs = Outputs(artifact, report_path, markdown_path)
    calibration = calibration_data(calibrate_data, distill_epochs)
    config = _config(request, fit_option, include, exclude, targets, gates, order, modes, calibrate_samples, task,
                     distill_epochs, distill_lr, finetune_epochs, finetune_loss, finetune_lr, execution, quantize, seed)
    display = Display(quiet)
    if spec is not None and spec.holdout > 0:
        display.note(f"--eval {spec.data} is also the fine-tuning data: scoring on a seeded {spec.holdout:.0%} "
                     f"held out, fine-tuning on the rest (--finetune-data FILE scores on all of it)")
    report = _run(model, outputs, config, calibration, spec, limits, request.search, display,
                  overwrite=overwrite, trust_checkpoint=trust_checkpoint, model_class=model_class, threads=threads)
    _write_reports(report, outputs, overwrite)
    _show(display, report, outputs.artifact)


def _config(request: AllocationRequest, fit_option: tuple[tuple[str, Any], ...], include: tuple[str, ...],
            exclude: tuple[str, ...], targets: str, gates: str, order: Optional[int], modes: Any,
            calibrate_samples: int, task: str, distill_epochs: Union[int, str], distill_lr: Union[float, str],
            finetune_epochs: Union[int, str], finetune_loss: str, finetune_lr: Union[float, str], execution: str,
            quantize: Optional[str], seed: int) -> CompressConfig:
    """The one config of this command, built from its options (every rule checked there)."""
    from kcompress.config import (
        CalibrationOptions,
        CompressConfig,
        ExecutionOptions,
        FinetuneOptions,
        RecoveryOptions,
        SelectionOptions,
        StorageOptions,
        TensorizationOptions,
    )

    return CompressConfig(
        format=request.format, fit_options=dict(fit_option) or None, budget=request.budget,
        selection=SelectionOptions(include=list(include) or None, exclude=list(exclude) or None, targets=targets,
                                   gates=gates),
        tensorization=TensorizationOptions(order=order, modes=modes),
        calibration=CalibrationOptions(samples=calibrate_samples, task=task, distill_lr=distill_lr),
        recovery=RecoveryOptions(distill_epochs, FinetuneOptions(finetune_epochs, finetune_loss, finetune_lr)),
        execution=ExecutionOptions(path=execution), storage=StorageOptions(_storages(quantize)), seed=seed)


def _run(model: pathlib.Path, outputs: Outputs, config: CompressConfig, calibration: Any, spec: Optional[EvalSpec],
         limits: Budget, search: bool, display: Display, *, overwrite: bool, trust_checkpoint: bool,
         model_class: Optional[str], threads: Optional[int]) -> Report:
    """The pipeline, or the budget search when ``search``, with progress and warnings on ``display``; the
    report (the artifact is written)."""
    from kcompress._threads import threads_used
    from kcompress.runs.pipeline import run_pipeline
    from kcompress.runs.search import run_search

    with display.warnings_shown(), threads_used(threads) as counts, display.progress() as progress:
        display.line(f"threads: {counts['fit']} for fits, {counts['model']} for evaluation and fine-tuning")
        if search:
            assert spec is not None
            searched = run_search(model, outputs.artifact, config, calibration=calibration, evaluation=spec,
                                  budget=limits, overwrite=overwrite, trust_checkpoint=trust_checkpoint,
                                  model_class=model_class, progress=progress)
            assert searched.run is not None  # run_search always sets the chosen run
            report = searched.run.report
        else:
            report = run_pipeline(model, outputs.artifact, config, calibration=calibration, evaluation=spec,
                                  budget=limits, overwrite=overwrite, trust_checkpoint=trust_checkpoint,
                                  model_class=model_class, progress=progress).report
    assert report is not None
    report.options["threads"] = counts
    return report


def _show(display: Display, report: Report, artifact: pathlib.Path) -> None:
    """The report's tables on stdout; exit code 3 when the accuracy budget was missed."""
    from kcompress.report.allocation_table import rich_tables

    display.show(report.rich_table())
    for table in rich_tables(report):
        display.show(table)
    display.result(f"wrote {artifact}")
    if report.status == "failed":
        _budget_failed(display, report)
        raise click.exceptions.Exit(EXIT_BUDGET)


def _storages(quantize: Optional[str]) -> Union[None, str, list[str]]:
    """``--quantize``: one storage, or (with ``--size``) the comma-separated storages to choose from."""
    if quantize is None or "," not in quantize:
        return quantize
    return [mode.strip() for mode in quantize.split(",")]


def _write_reports(report: Report, outputs: Outputs, overwrite: bool) -> None:
    """The report files beside the written artifact, each atomically: all outputs, or (on any failure or
    interruption) none, the artifact included."""
    from kcompress.io import files

    written = [outputs.artifact]
    try:
        for path, text in ((outputs.report, report.to_json() + "\n"), (outputs.markdown, report.to_markdown())):
            if path is not None:
                files.atomic_write(path, text.encode("utf8"), overwrite)
                written.append(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def _budget_failed(display: Display, report: Report) -> None:
    metrics = report.metrics
    display.note(f"budget not met: {metrics['name']} drop {metrics['drop']:.4g} > max {metrics['max_drop']:g} "
                 f"({metrics['drop_type']}); the artifact was written and its report marked failed (exit 3)")
