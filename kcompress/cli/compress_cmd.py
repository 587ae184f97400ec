"""``kcompress compress`` (the default command): load, measure, compress, fine-tune, measure, save, report."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass
from typing import Any, Optional

import click
from torch import nn

from ..errors import KCompressError
from ..io import atomic_write, check_output_path, default_output_path, save_artifact
from ..report import Report
from ..sweep import (
    Budget,
    EvalSpec,
    Evaluation,
    FinetuneSettings,
    apply_metrics,
    compress_checked,
    finetune_compressed,
    load_evaluation,
    load_model,
    metrics_record,
)
from .options import (
    COMPRESSION_FORMATS,
    EXIT_BUDGET,
    ModesType,
    RankType,
    budget,
    budget_options,
    check_finetune,
    common_options,
    eval_options,
    eval_spec,
    finetune_options,
    guarded,
    trust_option,
)
from .render import Display

EPILOG = """\b
Examples:
  kcompress model.pt --format kcp --rank 8
  kcompress model.pt --format svd --ratio 4 --targets ih,hh -o small.safetensors
  kcompress model.pt --format kcp --rank 8 --modes 4,4,16x8,8,8 --gates separate
  kcompress lstm.pt --format kcp --rank 8 --eval japanese-vowels --finetune-epochs 30
  kcompress model.pt --format kcp --rank 4 --eval val.npz --task regression --max-drop 0.05 \\
      --drop-type relative --report report.json --markdown report.md
  kcompress model.pt --format tt --rank 8 --evaluator mymetrics:score --max-drop 0.01"""


@dataclass(frozen=True)
class Outputs:
    """Where results go: the artifact and the optional report files."""

    artifact: pathlib.Path
    report: Optional[pathlib.Path]
    markdown: Optional[pathlib.Path]


@click.command("compress", epilog=EPILOG)
@click.argument("model", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@click.option("--format", "format_", type=click.Choice(COMPRESSION_FORMATS), default="kcp", show_default=True,
              help="Weight format of the compressed matrices.")
@click.option("--rank", type=RankType(), help="Rank of every compressed matrix (clamped to each matrix's "
              "largest useful rank, with a warning); N,N,... for per-bond ranks.")
@click.option("--ratio", type=click.FloatRange(min=0, min_open=True), metavar="X",
              help="Instead of --rank: per matrix the largest rank with at most 1/X of its parameters.")
@click.option("--modes", type=ModesType(), metavar="OUTxIN", help="Mode shapes OUTxIN for every matrix, e.g. "
              "4,4,16x8,8,8 "
              "(products must cover the matrix; fused gates fold into the first output mode).")
@click.option("--order", type=click.IntRange(min=1), metavar="D", help="Tensor order (number of modes).")
@click.option("--targets", type=click.Choice(["ih", "hh", "ih,hh"]), default="ih", show_default=True,
              help="Recurrent matrices to compress: input-to-hidden, hidden-to-hidden or both.")
@click.option("--gates", type=click.Choice(["fused", "separate"]), default="fused", show_default=True,
              help="Fit an LSTM/GRU matrix's gates as one matrix or one fit per gate.")
@click.option("--include", multiple=True, metavar="GLOB", help="Compress only layers whose name matches "
              "(repeatable; Linear layers are compressed only when named here, '*' takes all).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave layers whose name matches (repeatable).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every fit and of fine-tuning.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              help="Artifact path (default: beside the input, e.g. model.kcp-r8.safetensors; never the input).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              metavar="FILE.json", help="Write the report as JSON (schema_version, per-matrix rows, metrics, status).")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=pathlib.Path),
              metavar="FILE.md", help="Write the report as Markdown (e.g. for a pull-request comment).")
@eval_options
@finetune_options
@budget_options("when it is exceeded the exit code is 3, and the artifact is still written with its report "
                "marked failed.")
@trust_option
@common_options
@guarded
def compress_command(model: pathlib.Path, format_: str, rank: Any, ratio: Optional[float], modes: Any,
                     order: Optional[int], targets: str, gates: str, include: tuple[str, ...],
                     exclude: tuple[str, ...], seed: int, output: Optional[pathlib.Path], overwrite: bool,
                     report_path: Optional[pathlib.Path], markdown_path: Optional[pathlib.Path],
                     eval_data: Optional[str], task: str, evaluator: Optional[str], lower_is_better: bool,
                     finetune_epochs: int, finetune_loss: str, finetune_lr: float, max_drop: Optional[float],
                     drop_type: str, trust_checkpoint: bool, quiet: bool, debug: bool) -> None:
    """Compress the LSTM/GRU (and chosen Linear) layers of MODEL and write the artifact.

    MODEL is a state dict (.pt), safetensors file or kcompress artifact. Without a subcommand,
    `kcompress MODEL ...` runs this command. Progress goes to stderr, the report table to stdout.
    """
    if (rank is None) == (ratio is None):
        raise click.UsageError("give exactly one of --rank N and --ratio X")
    spec = eval_spec(eval_data, task, evaluator, lower_is_better)
    check_finetune(finetune_epochs, spec)
    limits = budget(max_drop, drop_type, spec)
    if spec is not None:
        spec.check()
    if not model.is_file():
        raise KCompressError(f"input file not found: {model}")
    artifact = output or default_output_path(model, format_, rank=rank, ratio=ratio)
    outputs = _outputs(model, artifact, overwrite, report_path, markdown_path)
    compress_kwargs = dict(format=format_, rank=rank, ratio=ratio, modes=modes, order=order, targets=targets,
                           gates=gates, include=list(include) or None, exclude=list(exclude) or None, seed=seed)
    display = Display(quiet)
    with display.warnings_shown():
        report = _run(display, model, trust_checkpoint, spec, compress_kwargs,
                      FinetuneSettings(finetune_epochs, finetune_loss, finetune_lr), limits, outputs, overwrite)
    display.show(report.rich_table())
    display.result(f"wrote {outputs.artifact}")
    if report.status == "failed":
        _budget_failed(display, report)
        raise click.exceptions.Exit(EXIT_BUDGET)


def _run(display: Display, model_path: pathlib.Path, trust_checkpoint: bool, spec: Optional[EvalSpec],
         compress_kwargs: dict[str, Any], settings: FinetuneSettings, limits: Budget, outputs: Outputs,
         overwrite: bool) -> Report:
    """The steps, each shown as it runs; returns the report (written to its files)."""
    with display.step(f"loading {model_path}"):
        dense, source = load_model(model_path, trust_checkpoint)
    evaluation = _load_evaluation(display, spec)
    with display.progress() as progress:
        compressed, report = compress_checked(dense, progress=progress, **compress_kwargs)
    report.source = source
    if evaluation is not None:
        _evaluate(display, evaluation, dense, compressed, report, settings, limits, compress_kwargs["seed"])
    with display.step(f"writing {outputs.artifact}"):
        save_artifact(compressed, report, outputs.artifact, overwrite=overwrite, source_path=model_path)
    _write_reports(report, outputs)
    return report


def _load_evaluation(display: Display, spec: Optional[EvalSpec]) -> Optional[Evaluation]:
    if spec is None:
        return None
    with display.step(f"loading {spec.data or spec.evaluator}"):
        return load_evaluation(spec)


def _measure(display: Display, evaluation: Evaluation, model: nn.Module, what: str) -> float:
    with display.step(f"measuring {evaluation.description}: {what}"):
        value = evaluation.measure(model)
    display.line(f"{evaluation.name} of the {what}: {value:.4g}")
    return value


def _evaluate(display: Display, evaluation: Evaluation, dense: nn.Module, compressed: nn.Module, report: Report,
              settings: FinetuneSettings, limits: Budget, seed: int) -> None:
    """Measure the dense and compressed models, fine-tune and measure again when asked; fill the metrics."""
    baseline = _measure(display, evaluation, dense, "dense model")
    compressed_metric = _measure(display, evaluation, compressed, "compressed model")
    finetuned = None
    if settings.epochs > 0:
        with display.progress() as progress:
            finetune_compressed(compressed, dense, evaluation, settings, seed=seed, progress=progress)
        finetuned = _measure(display, evaluation, compressed, "fine-tuned model")
    apply_metrics(report, metrics_record(evaluation, baseline, compressed_metric, finetuned, limits))


def _outputs(model: pathlib.Path, artifact: pathlib.Path, overwrite: bool, report_path: Optional[pathlib.Path],
             markdown_path: Optional[pathlib.Path]) -> Outputs:
    """Checked before any work: the artifact may be written (not the input, new unless ``--overwrite``), and
    the report files are neither the input nor the artifact (they are replaced when they exist)."""
    check_output_path(artifact, overwrite=overwrite, source=model)
    for name, path in (("--report", report_path), ("--markdown", markdown_path)):
        for other, what in ((model, "the input file"), (artifact, "the artifact path")):
            if path is not None and path.resolve() == other.resolve():
                raise KCompressError(f"{name} {path} is {what}; choose another path")
    return Outputs(artifact, report_path, markdown_path)


def _write_reports(report: Report, outputs: Outputs) -> None:
    if outputs.report is not None:
        _write_text(outputs.report, report.to_json() + "\n")
    if outputs.markdown is not None:
        _write_text(outputs.markdown, report.to_markdown())


def _write_text(path: pathlib.Path, text: str) -> None:
    """Atomically, replacing an existing file (see :func:`kcompress.io.atomic_write`); parent folders are created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text.encode("utf8"), overwrite=True)


def _budget_failed(display: Display, report: Report) -> None:
    metrics = report.metrics
    display.note(f"budget not met: {metrics['name']} drop {metrics['drop']:.4g} > max {metrics['max_drop']:g} "
                 f"({metrics['drop_type']}); the artifact was written and its report marked failed (exit 3)")
