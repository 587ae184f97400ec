"""Choosing each compressed matrix's execution path: :func:`set_execution` and the ``"auto"`` planner.

``"auto"`` decides per matrix (Linear, convolutions, cells) or per layer of an LSTM/GRU (a factorized
``W_hh`` forces the per-step Python loop for its whole layer, so the matrices of a layer are decided
together); an embedding's table is materialized (a cached table) unless its factorized lookups measure
faster (step 2 only):

1. Closed form where the answer is clear: a factorized product needing at least the dense product's MACs
   is materialized; one needing at most :data:`CLEAR_FRACTION` of them on a matrix of at least
   :data:`CLEAR_MACS` MACs per row (where fixed kernel costs no longer matter) stays factorized.
2. Otherwise a short measurement (:func:`kcompress.nn.speed.time_interleaved`, interleaved runs, medians) of
   the whole layer's forward on random input of :data:`MEASURE_STEPS` steps at each of
   :data:`MEASURE_BATCHES` sequences under each candidate paths; a factorized candidate must beat the
   all-materialized one by :data:`MARGIN` at every batch, in the median of per-round time ratios (robust
   to load changes between rounds on a shared machine), in each of :data:`CONFIRMATIONS` measurements.
   Without measuring (``measure=False``) the unclear matrices are materialized: never slower than dense.

Timings decide the paths but are kept nowhere: the paths (names and paths) is all that is stored.
"""

from __future__ import annotations

import contextlib
import fnmatch
import itertools
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from kcompress.errors import KCompressError
from kcompress.nn.base import CompressedLayer
from kcompress.nn.conv import CompressedConv
from kcompress.nn.embedding import CompressedEmbedding
from kcompress.nn.execution import FACTORIZED, MATERIALIZED, MODES, check_mode, is_dense
from kcompress.nn.recurrent import CompressedRNN
from kcompress.nn.speed import CHECK_BATCH, paired, time_interleaved
from kcompress.progress import ProgressCallback, ProgressEvent

#: ``"auto"``, one mode for every matrix, or ``{glob over "layer.matrix" names: mode}`` (later globs win)
Execution = Union[str, Mapping[str, str]]
CLEAR_FRACTION = 1 / 16
CLEAR_MACS = 2**20
MEASURE_STEPS = 16
#: batch sizes (rows for a matrix, sequences for a layer) a factorized candidate must win at
MEASURE_BATCHES = (1, CHECK_BATCH)
#: a factorized candidate must take at most this fraction of the materialized one's time (median of the
#: per-round ratios) to be chosen
MARGIN = 0.9
#: seconds of interleaved measurement per decision
BUDGET = 0.1
#: separate measurements a factorized candidate must win (the first decides when it loses)
CONFIRMATIONS = 2
#: seconds after which a decision's measurement stops (the rounds measured so far decide): a slow
#: factorized candidate on a loaded machine must not stall a compression
DECISION_SECONDS = 2.0
#: rounds per measurement at least
MIN_ROUNDS = 3


def set_execution(model: nn.Module, paths: Execution = "auto", *, measure: bool = True,
                  progress: Optional[ProgressCallback] = None) -> dict[str, dict[str, str]]:
    """Set the execution path of every compressed matrix of ``model``; returns ``{layer path: its paths}``.

    ``paths``: ``"factorized"``, ``"materialized"``, ``"auto"`` (see the module docs; ``measure=False``
    decides by closed forms only) or ``{glob: mode}`` matched against ``"layer.matrix"`` names (the layer
    alone also matches), later globs winning; matrices no glob names keep their path. ``progress`` hears a
    ``"step"`` event before each layer that ``"auto"`` measures.
    """
    check_execution(paths)
    layers = compressed_layers(model)
    if isinstance(paths, str):
        for index, (name, layer) in enumerate(layers.items()):
            if paths == "auto" and measure and progress is not None and _measured(layer):
                progress(ProgressEvent("step", "execution", index, len(layers),
                                       message=f"timing the execution paths of {name or 'the model'} "
                                               f"({index + 1}/{len(layers)}) ..."))
            if paths == "auto":
                layer.set_execution(auto_paths(layer, measure), requested=dict.fromkeys(layer.matrices, "auto"))
            else:
                layer.set_execution(dict.fromkeys(layer.matrices, check_mode(paths, "set_execution")))
    elif isinstance(paths, Mapping):
        _set_by_globs(layers, paths, measure)
    else:
        raise KCompressError(f"execution must be a mode name or a mapping of glob -> mode, got {paths!r}")
    return {name: dict(layer.execution) for name, layer in layers.items()}


def check_execution(paths: object) -> None:
    """A one-line :class:`KCompressError` unless ``paths`` is a valid :data:`Execution` (before any work starts)."""
    if isinstance(paths, str):
        if paths != "auto" and paths not in MODES:
            raise KCompressError(f"execution must be 'auto', 'factorized' or 'materialized', got {paths!r}")
        return
    if not isinstance(paths, Mapping) or not all(isinstance(glob, str) for glob in paths):
        raise KCompressError(f"execution must be 'auto', a path name or a mapping of glob -> path, got {paths!r}")
    for glob, mode in paths.items():
        if mode != "auto":
            check_mode(mode, f"execution {glob!r}")


@contextlib.contextmanager
def executed(model: nn.Module, paths: Execution) -> Iterator[None]:
    """Run the block with ``paths`` set (``measure=False`` for ``"auto"``), then restore every layer's paths."""
    with _paths_restored(model):
        set_execution(model, paths, measure=False)
        yield


@contextlib.contextmanager
def trained(model: nn.Module) -> Iterator[None]:
    """Run the block on the paths for training, then restore every layer's paths.

    A matrix that ``"auto"`` left factorized (its product clearly cheaper, or measured faster) stays
    factorized: a training step then needs no reconstruction of ``W``. Every other matrix is materialized
    (torch's fused kernels, ``W`` rebuilt from the factors on each step so gradients reach them; at small
    batches that rebuild, e.g. ``R·M·N`` MACs for KCP, can cost more than the dense step itself).
    """
    with _paths_restored(model):
        for layer in compressed_layers(model).values():
            kept = {name for name, mode in layer.execution.items()
                    if mode == FACTORIZED and layer.requested.get(name) == "auto"}
            layer.set_execution({name: FACTORIZED if name in kept else MATERIALIZED for name in layer.matrices},
                                requested=dict(layer.requested))
        yield


@contextlib.contextmanager
def _paths_restored(model: nn.Module) -> Iterator[None]:
    saved = {name: (dict(layer.execution), dict(layer.requested)) for name, layer in compressed_layers(model).items()}
    try:
        yield
    finally:
        for name, layer in compressed_layers(model).items():
            paths, requested = saved.get(name, ({}, {}))
            layer.set_execution(paths, requested)


def compressed_layers(model: nn.Module) -> dict[str, CompressedLayer]:
    """``{path: layer}`` of the compressed layers in ``model`` (``""`` when the model is one)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, CompressedLayer)}


def choose_paths(model: nn.Module, measure: bool = True) -> None:
    """Decide, on this machine, the path of every matrix whose requested path is ``"auto"`` (an artifact
    stores the request, so :func:`kcompress.load` calls this once the tensors are loaded)."""
    for layer in compressed_layers(model).values():
        automatic = [name for name, mode in layer.requested.items() if mode == "auto"]
        if automatic:
            chosen = auto_paths(layer, measure)
            layer.set_execution({name: chosen[name] for name in automatic}, dict.fromkeys(automatic, "auto"))


def execution_of(model: nn.Module) -> dict[str, dict[str, str]]:
    """``{layer path: {matrix: path}}`` as it is now."""
    return {name: dict(layer.execution) for name, layer in compressed_layers(model).items()}


def _set_by_globs(layers: Mapping[str, CompressedLayer], paths: Mapping[str, str], measure: bool) -> None:
    unused = set(paths)
    for path, layer in layers.items():
        chosen: dict[str, str] = {}
        for matrix in layer.matrices:
            qualified = f"{path}.{matrix}" if path else matrix
            for glob, mode in paths.items():
                if fnmatch.fnmatchcase(qualified, glob) or fnmatch.fnmatchcase(path, glob):
                    chosen[matrix] = mode if mode == "auto" else check_mode(mode, glob)
                    unused.discard(glob)
        requested = dict(chosen)
        if "auto" in chosen.values():
            automatic = auto_paths(layer, measure)
            chosen = {name: automatic[name] if mode == "auto" else mode for name, mode in chosen.items()}
        layer.set_execution(chosen, requested)
    if unused:
        raise KCompressError(f"execution glob(s) {', '.join(sorted(unused))} matched no compressed matrix")


# ---------------------------------------------------------------------- the auto planner
def auto_paths(layer: CompressedLayer, measure: bool = True) -> dict[str, str]:
    """``{matrix: path}`` for one layer (see the module docs)."""
    if isinstance(layer, CompressedEmbedding):
        return {"weight": _auto_lookup(layer, measure)}
    if isinstance(layer, CompressedConv):
        return {"weight": _auto_conv(layer, measure)}
    if isinstance(layer, CompressedRNN):
        paths: dict[str, str] = {}
        for index in range(layer.num_layers):
            paths.update(_auto_rnn_layer(layer, index, measure))
        return paths
    return {name: _auto_matrix(layer, name, measure) for name in layer.matrices}


def _measured(layer: CompressedLayer) -> bool:
    """Whether ``"auto"`` times this layer (some matrix's path is not clear from its MACs)."""
    if isinstance(layer, CompressedEmbedding):
        return not is_dense(layer.matrices["weight"])
    return any(closed_form(matrix) is None for matrix in layer.matrices.values())


def closed_form(matrix: nn.Module) -> Optional[str]:
    """The path the MAC counts make clear for one matrix, or None when only a measurement can tell."""
    if is_dense(matrix):
        return MATERIALIZED
    dense = _dense_macs(matrix)
    factorized = int(matrix.macs_per_vector())  # type: ignore[operator]  # nn.Module attrs typed Tensor | Module
    if factorized >= dense:
        return MATERIALIZED
    if factorized <= CLEAR_FRACTION * dense and dense >= CLEAR_MACS:
        return FACTORIZED
    return None


def _dense_macs(matrix: nn.Module) -> int:
    """``M·N`` of the matrix (``Stack`` and ``Factorization`` alike)."""
    module: Any = matrix  # Any: nn.Module attributes are typed Tensor | Module
    if hasattr(matrix, "tensorization"):
        return module.tensorization.out_features * module.tensorization.in_features
    return int(module.out_features * module.in_features)


def _in_features(matrix: nn.Module) -> int:
    module: Any = matrix  # Any: nn.Module attributes are typed Tensor | Module
    return int(module.tensorization.in_features if hasattr(matrix, "tensorization") else module.in_features)


def _auto_matrix(layer: CompressedLayer, name: str, measure: bool) -> str:
    """One matrix of a Linear or a cell: closed form, else the product timed both ways at each of
    :data:`MEASURE_BATCHES` rows."""
    matrix = layer.matrices[name]
    clear = closed_form(matrix)
    if clear is not None or not measure:
        return clear or MATERIALIZED
    inputs = [_random(matrix, batch, _in_features(matrix)) for batch in MEASURE_BATCHES]
    runs = [lambda x=x: layer.product(name, x) for x in inputs]
    return _fastest(layer, _candidates({name: None}), runs)[name]


def _auto_conv(layer: CompressedConv, measure: bool) -> str:
    """A convolution's kernel: closed form on its MACs per output position, else the layer's forward timed
    both ways on :meth:`~kcompress.nn.conv.CompressedConv.example_input` at each of :data:`MEASURE_BATCHES`."""
    clear = closed_form(layer.matrices["weight"])
    if clear is not None or not measure:
        return clear or MATERIALIZED
    runs = [lambda x=layer.example_input(batch): layer(x) for batch in MEASURE_BATCHES]
    return _fastest(layer, _candidates({"weight": None}), runs)["weight"]


def _auto_lookup(layer: CompressedEmbedding, measure: bool) -> str:
    """An embedding's table: a lookup gathers ``D`` numbers per row from the cached table, or computes them
    from the factors, so no MAC count makes the factorized path clear; it is chosen only when its lookups of
    :data:`MEASURE_STEPS` tokens at each of :data:`MEASURE_BATCHES` sequences measure faster."""
    if is_dense(layer.matrices["weight"]) or not measure:
        return MATERIALIZED
    generator = torch.Generator().manual_seed(0)
    device = next(layer.parameters()).device
    runs = [lambda index=torch.randint(layer.num_embeddings, (batch, MEASURE_STEPS), generator=generator).to(device):
            layer(index) for batch in MEASURE_BATCHES]
    return _fastest(layer, _candidates({"weight": None}), runs)["weight"]


def _auto_rnn_layer(layer: CompressedRNN, index: int, measure: bool) -> dict[str, str]:
    """The matrices of layer ``index`` (all directions) decided together, on the whole layer's forward at
    each of :data:`MEASURE_BATCHES` sequences: the unclear input matrices share one path, the unclear hidden
    ones another (at most four candidates)."""
    directions = layer._layers[index]
    clear = {name: closed_form(layer.matrices[name]) for d in directions for name in (d.weight_ih, d.weight_hh)}
    candidates = _candidates(clear)
    if not measure or len(candidates) == 1:
        return candidates[0]
    first = layer.matrices[directions[0].weight_ih]
    runs = []
    for batch in MEASURE_BATCHES:
        data = _random(first, MEASURE_STEPS * batch, _in_features(first))
        state = tuple(data.new_zeros(len(directions), batch, layer.hidden_size) for _ in range(layer.cell.state_count))
        runs.append(lambda data=data, batch=batch, state=state: layer._run_layer(index, data, batch, state))
    return _fastest(layer, candidates, runs)


def _candidates(clear: Mapping[str, Optional[str]]) -> list[dict[str, str]]:
    """Path choices to try: clear matrices fixed; the unclear ones grouped by kind (``weight_ih*``,
    ``weight_hh*``, any other name) with each group materialized or factorized. All materialized comes first."""
    groups: dict[str, list[str]] = {}
    for name, mode in clear.items():
        if mode is None:
            groups.setdefault(name[:9] if name.startswith("weight_") else name, []).append(name)
    candidates = []
    for choice in itertools.product((MATERIALIZED, FACTORIZED), repeat=len(groups)):
        paths = {name: mode or MATERIALIZED for name, mode in clear.items()}
        for members, mode in zip(groups.values(), choice):
            paths.update(dict.fromkeys(members, mode))
        candidates.append(paths)
    return candidates


def _fastest(
    layer: CompressedLayer, candidates: list[dict[str, str]], runs: Sequence[Callable[[], object]]
) -> dict[str, str]:
    """The candidate paths that is fastest at every one of ``runs`` (one per batch size): the first (most
    materialized) candidate wins unless another takes at most :data:`MARGIN` of its time in every run, in
    each of :data:`CONFIRMATIONS` separate measurements (one disturbed measurement must not pick a slower path).
    A measurement ends after :data:`MIN_ROUNDS` rounds once :data:`DECISION_SECONDS` have passed."""
    saved = {name: layer.execution[name] for name in candidates[0]}
    requested = {name: layer.requested.get(name, mode) for name, mode in saved.items()}
    worst = dict.fromkeys(range(len(candidates)), 0.0)  # per candidate: its largest time ratio to candidate 0
    begin = time.perf_counter()
    try:
        with torch.no_grad():
            for paths in candidates:  # build the cached weights and warm the kernels, outside the timing
                layer.set_execution(paths)
                for run in runs:
                    run()
            for _ in range(CONFIRMATIONS):
                for run in runs:
                    late = time.perf_counter() - begin > DECISION_SECONDS
                    timings = time_interleaved({k: _under(layer, paths, run) for k, paths in enumerate(candidates)},
                                               budget=0.0 if late else BUDGET / len(runs), min_runs=MIN_ROUNDS)
                    for k, timing in timings.items():
                        worst[k] = max(worst[k], paired(timing, timings[0]).ratio)
                if all(ratio > MARGIN for k, ratio in worst.items() if k != 0) or (
                        time.perf_counter() - begin > DECISION_SECONDS):
                    break
    finally:
        layer.set_execution(saved, requested)
    best = min(worst, key=worst.__getitem__)
    return candidates[best if worst[best] <= MARGIN else 0]


def _under(layer: CompressedLayer, paths: dict[str, str], run: Callable[[], object]) -> Callable[[], None]:
    """``run()`` under ``paths``, keeping the layer's weight cache (``set_execution`` would drop it)."""

    def call() -> None:
        layer.execution.update(paths)
        run()

    return call


def _random(matrix: nn.Module, rows: int, features: int) -> Tensor:
    reference = next(matrix.parameters())
    generator = torch.Generator().manual_seed(0)
    return torch.randn(rows, features, generator=generator).to(reference.device, reference.dtype)
