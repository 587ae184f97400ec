"""``kcompress eval``: the metric of a dense checkpoint or a compressed artifact."""

from __future__ import annotations

import json
import pathlib
from typing import Optional

import click

from ..errors import KCompressError
from ..sweep import load_evaluation, load_model
from .options import common_options, eval_options, eval_spec, guarded, trust_option
from .render import Display

EPILOG = """\b
Examples:
  kcompress eval lstm.pt --eval japanese-vowels
  kcompress eval lstm.kcp-r8.safetensors --eval japanese-vowels
  kcompress eval model.safetensors --eval val.npz --task regression --json
  kcompress eval model.safetensors --evaluator mymetrics:score"""


@click.command("eval", epilog=EPILOG)
@click.argument("model", type=click.Path(dir_okay=False, path_type=pathlib.Path))
@eval_options
@click.option("--json", "as_json", is_flag=True, help="Print {metric, value, higher_is_better} as JSON.")
@trust_option
@common_options
@guarded
def eval_command(model: pathlib.Path, eval_data: Optional[str], task: str, evaluator: Optional[str],
                 lower_is_better: bool, as_json: bool, trust_checkpoint: bool, quiet: bool, debug: bool) -> None:
    """Measure MODEL (a checkpoint or a kcompress artifact) on --eval DATA or with --evaluator."""
    spec = eval_spec(eval_data, task, evaluator, lower_is_better)
    if spec is None:
        raise click.UsageError("give --eval DATA or --evaluator MODULE:FUNCTION")
    spec.check()
    if not model.is_file():
        raise KCompressError(f"input file not found: {model}")
    display = Display(quiet)
    with display.warnings_shown():
        with display.step(f"loading {model}"):
            loaded, _ = load_model(model, trust_checkpoint)
        with display.step(f"loading {spec.data or spec.evaluator}"):
            evaluation = load_evaluation(spec)
        with display.step(f"measuring {evaluation.description}"):
            value = evaluation.measure(loaded)
    if as_json:
        click.echo(json.dumps({"metric": evaluation.name, "value": value,
                               "higher_is_better": spec.higher_is_better, "model": str(model)}))
    else:
        display.result(f"{evaluation.description}: {value:.6g}")
