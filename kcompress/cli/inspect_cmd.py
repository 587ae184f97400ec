"""``kcompress inspect``: the layers kcompress finds in a model and, per matrix, the modes, parameters and
MACs each format would give at each rank (closed forms: nothing is fitted)."""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Optional

import click
from torch import nn

from kcompress.errors import KCompressError
from kcompress.formats import get_format
from kcompress.io import check_input_file
from kcompress.nn import COMPRESSED_TYPES
from kcompress.runs.pipeline import load_input
from kcompress.cli.options import COMPRESSION_FORMATS, ORDER, FormatListType, IntListType, common_options, guarded, trust_option
from kcompress.cli.render import Display, layers_table, options_table

EPILOG = """\b
Examples:
  kcompress inspect model.pt
  kcompress inspect model.pt --formats kcp,svd --ranks 1,2,4,8,16,32 --gates separate
  kcompress inspect model.pt --json > layers.json"""


@click.command("inspect", epilog=EPILOG)
@click.argument("model", type=click.Path(readable=False, path_type=pathlib.Path))
@click.option("--formats", "format_names", type=FormatListType(), default=",".join(COMPRESSION_FORMATS),
              show_default=True, help="Formats to tabulate.")
@click.option("--ranks", type=IntListType(), default="2,4,8,16", show_default=True, help="Ranks to tabulate.")
@click.option("--order", type=ORDER, metavar="D", help="Tensor order (default: per format).")
@click.option("--gates", type=click.Choice(["fused", "separate"]), default="fused", show_default=True,
              help="Count an LSTM/GRU matrix's gates as one fit or one per gate.")
@click.option("--json", "as_json", is_flag=True, help="Print the same data as JSON on stdout.")
@trust_option
@common_options
@guarded
def inspect_command(model: pathlib.Path, format_names: list[str], ranks: list[int], order: Optional[int],
                    gates: str, as_json: bool, trust_checkpoint: bool, quiet: bool, debug: bool) -> None:
    """Show MODEL's compressible layers and what each format and rank would make of them.

    Per matrix: the modes each format picks, its parameters and multiply-accumulates (MACs) per input
    vector at each rank, and both as ratios against the dense matrix (MACs ratio above 1: predicted
    faster; `kcompress compress` also measures it). Ranks above a format's useful maximum are shown clamped.
    """
    check_input_file(model)
    display = Display(quiet)
    with display.warnings_shown(), display.step(f"loading {model}"):
        dense = load_input(model, trust_checkpoint=trust_checkpoint).dense
    layers = [_describe_layer(name, module) for name, module in _candidates(dense)]
    if not layers:
        raise KCompressError(f"nothing to compress: {model} has no LSTM, GRU, LSTMCell, GRUCell or Linear layer")
    matrices = [_matrix_options(layer, name, shape, format_names, ranks, order, gates)
                for layer in layers if layer["supported"] for name, shape in layer["matrices"].items()]
    if as_json:
        click.echo(json.dumps({"layers": layers, "matrices": matrices}, indent=2))
        return
    display.show(layers_table(layers))
    for matrix in matrices:
        display.show(options_table(matrix["title"], matrix["options"]))


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if type(module) in COMPRESSED_TYPES]


def _describe_layer(name: str, module: nn.Module) -> dict[str, Any]:
    """Name, type, matrix shapes, parameter count and whether ``compress`` takes it by default."""
    layer_cls = COMPRESSED_TYPES[type(module)]
    row: dict[str, Any] = {"name": name, "type": type(module).__name__, "gates": layer_cls.gates,
                           "params": sum(p.numel() for p in module.parameters()), "matrices": {}}
    try:
        matrix_names, _ = layer_cls.parameter_names(layer_cls.dense_config(module))
    except KCompressError as error:
        return {**row, "supported": False, "default": f"unsupported: {error}"}
    row["matrices"] = {m: tuple(getattr(module, m).shape) for m in matrix_names}
    default = "with --include" if isinstance(module, nn.Linear) else "by default"
    return {**row, "supported": True, "default": default}


def _matrix_options(layer: dict[str, Any], matrix: str, shape: tuple[int, int], format_names: list[str],
                    ranks: list[int], order: Optional[int], gates: str) -> dict[str, Any]:
    """One matrix: a title and a row per (format, rank)."""
    name = f"{layer['name']}.{matrix}" if layer["name"] else matrix
    hint = "" if layer["type"] == "Linear" else _target_hint(matrix)
    title = f"{name} ({shape[0]}x{shape[1]}{hint})"
    options = [_option(fmt, rank, shape, layer["gates"], order, gates) for fmt in format_names for rank in ranks]
    return {"name": name, "shape": list(shape), "title": title, "options": [o for o in options if o is not None]}


def _target_hint(matrix: str) -> str:
    return ", compressed by default" if re.match(r"weight_ih", matrix) else ", compressed with --targets ih,hh"


def _option(format_name: str, rank: int, shape: tuple[int, int], layer_gates: int, order: Optional[int],
            gates: str) -> Optional[dict[str, Any]]:
    """Modes, rank used, parameters and MACs of one format and rank (None where the format cannot take
    this matrix)."""
    fmt = get_format(format_name)
    rows, cols = shape
    blocks = layer_gates if gates == "separate" else 1
    try:
        tz = fmt.default_tensorization(rows // blocks, cols, order, out_group=layer_gates if blocks == 1 else 1)
        requested = fmt.normalize_rank(tz, rank)
        used, options = fmt.check(tz, fmt.clamp_rank(tz, requested))
    except KCompressError:
        return None
    params, macs = blocks * fmt.param_count(tz, used), blocks * fmt.macs(tz, used, options)
    modes = tz.describe() if blocks == 1 else f"{blocks}×{tz.describe()}"
    return {"format": format_name, "modes": modes, "rank": requested, "rank_used": used, "params": params,
            "ratio": rows * cols / params, "macs": macs, "macs_ratio": rows * cols / macs}
