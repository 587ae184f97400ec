"""``kcompress inspect``: the layers kcompress finds in a model and what each format would make of them at
each rank (closed forms: nothing is fitted): a summary by default (the layers, and per format and rank the
totals over the matrices ``compress`` takes by default), every matrix's modes, parameters and MACs with
``--details``. Matrices of one shape are worked out once, so a model with thousands of layers costs little."""

from __future__ import annotations

import functools
import json
import pathlib
import re
from typing import TYPE_CHECKING, Any, Optional

import click

from kcompress.cli.options import (
    COMPRESSION_FORMATS,
    ORDER,
    FormatListType,
    IntListType,
    common_options,
    guarded,
    trust_option,
)
from kcompress.cli.render import Display, layers_table, options_table, summary_table
from kcompress.errors import KCompressError

if TYPE_CHECKING:  # the library (torch) loads when the command runs, not for --help
    from torch import nn

EPILOG = """\b
Examples:
  kcompress inspect model.pt
  kcompress inspect model.pt --details
  kcompress inspect model.pt --formats kcp,svd --ranks 1,2,4,8,16,32 --gates separate --details
  kcompress inspect model.pt --json > layers.json"""
#: layers listed in the summary's table (--details lists all)
SUMMARY_LAYERS = 12
#: layer types compressed only when an include glob names them (a convolution's MACs: per output position)
INCLUDE_ONLY = ("Linear", "Conv1d", "Conv2d")


@click.command("inspect", epilog=EPILOG)
@click.argument("model", type=click.Path(readable=False, path_type=pathlib.Path))
@click.option("--formats", "format_names", type=FormatListType(), default=",".join(COMPRESSION_FORMATS),
              show_default=True, help="Formats to tabulate.")
@click.option("--ranks", type=IntListType(), default="2,4,8,16", show_default=True, help="Ranks to tabulate.")
@click.option("--order", type=ORDER, metavar="D", help="Tensor order (default: per format).")
@click.option("--gates", type=click.Choice(["fused", "separate"]), default="fused", show_default=True,
              help="Count an LSTM/GRU matrix's gates as one fit or one per gate.")
@click.option("--details", is_flag=True, help="Every layer, and per matrix its modes, parameters and MACs at each "
              "format and rank (default: a summary).")
@click.option("--json", "as_json", is_flag=True, help="Print the same data, details included, as JSON on stdout.")
@trust_option
@common_options
@guarded
def inspect_command(model: pathlib.Path, format_names: list[str], ranks: list[int], order: Optional[int],
                    gates: str, details: bool, as_json: bool, trust_checkpoint: bool, quiet: bool,
                    debug: bool) -> None:
    """Show MODEL's compressible layers and what each format and rank would make of them.

    The summary: the layers found, and per format and rank the parameters and multiply-accumulates (MACs)
    per input vector of the matrices `compress` takes by default, against dense (MACs ratio above 1:
    predicted faster; `kcompress compress` also measures it). --details: the same per matrix, with the modes
    each format picks. Ranks above a format's useful maximum are clamped (shown with --details).
    """
    from kcompress.io import check_input_file
    from kcompress.runs.pipeline import load_input

    check_input_file(model)
    display = Display(quiet)
    with display.warnings_shown(), display.step(f"loading {model}"):
        dense = load_input(model, trust_checkpoint=trust_checkpoint).dense
    layers = [_describe_layer(name, module) for name, module in _candidates(dense)]
    if not layers:
        raise KCompressError(f"nothing to compress: {model} has no LSTM, GRU, LSTMCell, GRUCell or Linear layer")
    matrices = [_matrix_options(layer, name, shape, format_names, ranks, order, gates)
                for layer in layers if layer["supported"] for name, shape in layer["matrices"].items()]
    summary = _summary(matrices)
    if as_json:
        click.echo(json.dumps({"layers": layers, "summary": summary, "matrices": matrices}, indent=2))
        return
    shown = layers if details else layers[:SUMMARY_LAYERS]
    display.show(layers_table(shown, more=len(layers) - len(shown)))
    if details:
        for matrix in matrices:
            display.show(options_table(matrix["title"], matrix["options"]))
        return
    display.show(summary_table(summary["title"], summary["options"]))
    display.result(f"per matrix (modes, clamped ranks, each format's parameters and MACs): kcompress inspect "
                   f"{model} --details")


def _summary(matrices: list[dict[str, Any]]) -> dict[str, Any]:
    """Per format and rank, the totals over the matrices compressed by default (over all when none is:
    a model of Linear layers, which need --include)."""
    chosen = [m for m in matrices if m["default"]] or matrices
    which = "compressed by default" if chosen[0]["default"] else "all of them compressed with --include"
    dense = sum(m["shape"][0] * m["shape"][1] for m in chosen)
    totals: dict[tuple[str, Any], dict[str, Any]] = {}
    for matrix in chosen:
        for option in matrix["options"]:
            total = totals.setdefault((option["format"], option["rank_asked"]), {
                "format": option["format"], "rank": option["rank_asked"], "matrices": 0, "params": 0, "macs": 0})
            total["matrices"] += 1
            total["params"] += option["params"]
            total["macs"] += option["macs"]
    options = [{**t, "ratio": dense / t["params"], "macs_ratio": dense / t["macs"]} for t in totals.values()
               if t["matrices"] == len(chosen)]
    return {"title": f"{len(chosen)} matrices ({which}; {dense:,} params dense)", "dense_params": dense,
            "options": options}


def _candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from kcompress.nn import COMPRESSED_TYPES

    return [(name, module) for name, module in model.named_modules() if type(module) in COMPRESSED_TYPES]


def _describe_layer(name: str, module: nn.Module) -> dict[str, Any]:
    """Name, type, matrix shapes, parameter count and whether ``compress`` takes it by default."""
    from kcompress.nn import COMPRESSED_TYPES

    layer_cls = COMPRESSED_TYPES[type(module)]
    row: dict[str, Any] = {"name": name, "type": type(module).__name__, "gates": layer_cls.gates,
                           "params": sum(p.numel() for p in module.parameters()), "matrices": {}}
    try:
        matrix_names, _ = layer_cls.parameter_names(layer_cls.dense_config(module))
    except KCompressError as error:
        return {**row, "supported": False, "default": f"unsupported: {error}"}
    row["matrices"] = {m: tuple(layer_cls.dense_matrix(module, m).shape) for m in matrix_names}
    default = "with --include" if row["type"] in INCLUDE_ONLY else "by default"
    return {**row, "supported": True, "default": default}


def _matrix_options(layer: dict[str, Any], matrix: str, shape: tuple[int, int], format_names: list[str],
                    ranks: list[int], order: Optional[int], gates: str) -> dict[str, Any]:
    """One matrix: a title and a row per (format, rank)."""
    name = f"{layer['name']}.{matrix}" if layer["name"] else matrix
    hint = "" if layer["type"] in INCLUDE_ONLY else _target_hint(matrix)
    if layer["type"].startswith("Conv"):
        hint = ", the kernel as a matrix; MACs per output position"
    title = f"{name} ({shape[0]}x{shape[1]}{hint})"
    options = [(rank, _option(fmt, rank, tuple(shape), layer["gates"], order, gates))
               for fmt in format_names for rank in ranks]
    return {"name": name, "shape": list(shape), "title": title, "default": layer["type"] not in INCLUDE_ONLY,
            "options": [{**option, "rank_asked": rank} for rank, option in options if option is not None]}


def _target_hint(matrix: str) -> str:
    return ", compressed by default" if re.match(r"weight_ih", matrix) else ", compressed with --targets ih,hh"


@functools.lru_cache(maxsize=4096)
def _option(format_name: str, rank: int, shape: tuple[int, int], layer_gates: int, order: Optional[int],
            gates: str) -> Optional[dict[str, Any]]:
    """Modes, rank used, parameters and MACs of one format and rank (None where the format cannot take
    this matrix); the same for every matrix of one shape, so worked out once (callers copy it)."""
    from kcompress.formats import get_format

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
