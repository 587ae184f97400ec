"""``kcompress eval``: the metric of a dense checkpoint or a compressed artifact."""

from __future__ import annotations

import json
import pathlib
from typing import Optional

import click

from kcompress.cli.options import (
    common_options,
    eval_options,
    eval_spec,
    guarded,
    model_option,
    threads_option,
    trust_option,
)
from kcompress.cli.render import Display

EPILOG = """\b
Examples:
  kcompress eval lstm.pt --eval japanese-vowels
  kcompress eval lstm.kcp-r8.safetensors --eval japanese-vowels
  kcompress eval model.safetensors --eval val.npz --task regression --json
  kcompress eval model.safetensors --evaluator mymetrics:score
  kcompress eval tagger.kcp-r8.safetensors --model mymodel.py:TokenTagger --evaluator mymodel.py:accuracy"""


@click.command("eval", epilog=EPILOG)
@click.argument("model", type=click.Path(readable=False, path_type=pathlib.Path))
@eval_options
@click.option("--json", "as_json", is_flag=True, help="Print {metric, value, higher_is_better} as JSON.")
@model_option
@trust_option
@threads_option
@common_options
@guarded
def eval_command(model: pathlib.Path, eval_data: Optional[str], task: str, evaluator: Optional[str],
                 lower_is_better: bool, as_json: bool, model_class: Optional[str], trust_checkpoint: bool,
                 threads: Optional[int], quiet: bool, debug: bool) -> None:
    """Measure MODEL (a checkpoint or a kcompress artifact) on --eval DATA or with --evaluator."""
    from kcompress._threads import threads_used  # the library (torch) loads when the command runs
    from kcompress.io import check_input_file
    from kcompress.runs.pipeline import load_input
    from kcompress.tuning.evaluate import load_evaluation

    spec = eval_spec(eval_data, task, evaluator, lower_is_better)
    if spec is None:
        raise click.UsageError("give --eval DATA or --evaluator MODULE:FUNCTION")
    spec.check()
    check_input_file(model)
    display = Display(quiet)
    with display.warnings_shown():
        with display.step(f"loading {model}"):
            loaded = load_input(model, trust_checkpoint=trust_checkpoint, model_class=model_class).dense
        with display.step(f"loading {spec.data or spec.evaluator}"):
            evaluation = load_evaluation(spec)
        with display.step(f"measuring {evaluation.description}"), threads_used(threads):
            value = evaluation.measure(loaded)
    if as_json:
        click.echo(json.dumps({"metric": evaluation.name, "value": value,
                               "higher_is_better": spec.higher_is_better, "model": str(model)}))
    else:
        display.result(f"{evaluation.description}: {value:.6g}")
