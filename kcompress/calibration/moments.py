"""Calibration: unlabeled model inputs -> the second moment of what each matrix multiplies.

:func:`calibration_set` normalises the data a user has (a tensor of inputs ``(B, T, F)``, a tuple of
positional inputs such as ``(x, lengths)``, a DataLoader or iterable of inputs or ``(inputs, targets)``
batches, or a :class:`~kcompress.tuning.data.SequenceData`) into model calls, capped at ``samples`` sequences and
split (seeded) into a fitting part and a held-out part. Targets are never read.

:func:`collect_second_moments` runs the model over both parts with forward pre-hooks on the layers and
streams ``C = Σ x xᵀ / n`` per matrix (float64, ``O(N²)`` memory; activations are never kept): see
:mod:`kcompress.calibration.hooks` for what each matrix multiplies. :class:`Calibrator` does the same one
layer at a time for ``compress``, so that a layer can see the inputs produced by the layers before it
after they were compressed (``source="compressed"``) or the dense model's (``source="dense"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from kcompress.calibration.hooks import inner_layer, matrix_inputs
from kcompress.config.calibration import DEFAULT_HOLDOUT, SOURCES
from kcompress.errors import KCompressError
from kcompress.names import DEFAULT_SAMPLES
from kcompress.nn import COMPRESSED_TYPES
from kcompress.report.rows import qualified_name
from kcompress.tuning.data import BUILTIN_DATASETS, SequenceData, load_builtin, load_inputs_file
from kcompress.tuning.evaluate import eval_mode, run_model

#: positional arguments of one model call
Inputs = tuple[Any, ...]
CalibrationData = Union[Tensor, tuple, list, SequenceData, "CalibrationSet", Iterable[Any]]
DEFAULT_BATCH = 32


@dataclass(frozen=True)
class CalibrationSet:
    """Model calls for fitting (``fit``) and for checking (``holdout``), each a list of positional-argument
    tuples holding ``samples`` and ``holdout_samples`` sequences."""

    fit: list[Inputs]
    holdout: list[Inputs]
    samples: int
    holdout_samples: int


#: row weights below this fraction of their mean are raised to it (a row that never mattered on the
#: calibration data keeps a little weight, so the weighted problem stays well posed)
ROW_WEIGHT_FLOOR = 1e-6
#: lookups every embedding row is credited with before the calibration data's (add-one smoothing: a token
#: the calibration data never shows still weighs as one seen once)
TOKEN_PRIOR = 1.0


@dataclass(frozen=True)
class SecondMoment:
    """The inputs' second moments of one matrix: ``fit`` and ``holdout`` ``(N, N)`` float64 (``E[x xᵀ]`` over
    all real steps of the fitting / held-out sequences), ``samples`` fitting sequences, ``rows`` vectors.
    ``row_weights (M,)``: for an LSTM's/GRU's matrices, the mean squared state sensitivity of each output row
    over the fitting steps (:mod:`kcompress.calibration.gate_sensitivity`), scaled to mean 1; None for Linear.
    An embedding's table ``(V, D)`` is looked up, not multiplied: its error on a token is that row's error, so
    its moments are the identity (one unit vector per lookup) and its row weights the tokens' lookup counts
    (plus :data:`TOKEN_PRIOR`), scaled to mean 1: frequent rows matter more."""

    fit: Tensor
    holdout: Tensor
    samples: int
    rows: int
    row_weights: Optional[Tensor] = None


# ---------------------------------------------------------------------- data
def calibration_set(
    data: CalibrationData,
    samples: int = DEFAULT_SAMPLES,
    holdout: float = DEFAULT_HOLDOUT,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH,
) -> CalibrationSet:
    """At most ``samples`` sequences of ``data`` split into fitting and held-out calls (see the module doc).

    Tensors and SequenceData are sampled at random (seeded), iterables in order (the first ``samples``).
    Tensors whose first dimension is the batch are split by row (a DataLoader's batches are);
    ``holdout`` is the held-out fraction (at least one sequence on each side).
    """
    if isinstance(data, CalibrationSet):
        return data
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise KCompressError(f"calibration needs at least 2 samples, got calibrate_samples={samples!r}")
    if not 0.0 < holdout < 1.0:
        raise KCompressError(f"the held-out fraction must be between 0 and 1, got {holdout}")
    batches = _capped(_batches(data, samples, seed, batch_size), samples)
    total = sum(batch_rows(call) for call in batches)
    if total < 2:
        raise KCompressError(f"calibration needs at least 2 sequences, the data gave {total}")
    held = min(max(1, round(holdout * total)), total - 1)
    chosen = torch.zeros(total, dtype=torch.bool)
    chosen[torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:held]] = True
    fit: list[Inputs]
    kept: list[Inputs]
    fit, kept, start = [], [], 0
    for call in batches:
        rows = batch_rows(call)
        mask = chosen[start : start + rows]
        start += rows
        for part, selected in ((fit, ~mask), (kept, mask)):
            if bool(selected.any()):
                part.append(_take(call, rows, selected.nonzero().flatten()))
    return CalibrationSet(fit, kept, total - held, held)


def _batches(data: CalibrationData, samples: int, seed: int, batch_size: int) -> Iterator[Inputs]:
    """Model calls (positional-argument tuples) from any accepted form of data."""
    if isinstance(data, SequenceData):
        pick = _random_rows(len(data), samples, seed)
        for inputs, _targets in data.subset(pick).batches(batch_size):
            yield _as_call(inputs)
    elif isinstance(data, Tensor) or (isinstance(data, tuple) and data and all(isinstance(t, Tensor) for t in data)):
        call = _as_call(data)
        rows = batch_rows(call)
        pick = _random_rows(rows, samples, seed)
        for start in range(0, len(pick), batch_size):
            yield _take(call, rows, pick[start : start + batch_size])
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, Mapping)):
        for item in data:
            yield _as_call(item[0] if isinstance(item, (tuple, list)) and len(item) == 2 else item)
    else:
        raise KCompressError(
            f"calibration data must be a tensor of inputs, a tuple of them, a SequenceData or an iterable of "
            f"batches, got {type(data).__name__}"
        )


def _random_rows(total: int, samples: int, seed: int) -> Tensor:
    """``min(total, samples)`` row indices drawn without replacement, seeded, in increasing order."""
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    return order[:samples].sort().values


def _as_call(inputs: Any) -> Inputs:
    """A batch's inputs as positional arguments."""
    if isinstance(inputs, (tuple, list)):
        if not inputs:
            raise KCompressError("a calibration batch holds no inputs")
        return tuple(inputs)
    if isinstance(inputs, Tensor):
        return (inputs,)
    raise KCompressError(f"calibration inputs must be tensors (or tuples of them), got {type(inputs).__name__}")


def batch_rows(call: Inputs) -> int:
    """The batch size of a call: the first dimension of its first tensor."""
    first = next((value for value in call if isinstance(value, Tensor) and value.dim() > 0), None)
    if first is None:
        raise KCompressError("a calibration batch holds no batched tensor")
    return first.shape[0]


def _take(call: Inputs, rows: int, index: Tensor) -> Inputs:
    """The rows ``index`` of every tensor in ``call`` whose first dimension is the batch (others as they are)."""
    return tuple(value.index_select(0, index) if isinstance(value, Tensor) and value.dim() > 0
                 and value.shape[0] == rows else value for value in call)


def _capped(calls: Iterator[Inputs], samples: int) -> list[Inputs]:
    """The calls up to ``samples`` sequences (the last one cut)."""
    kept, count = [], 0
    for call in calls:
        rows = batch_rows(call)
        if count + rows > samples:
            call, rows = _take(call, rows, torch.arange(samples - count)), samples - count
        if rows:
            kept.append(call)
        count += rows
        if count >= samples:
            break
    return kept


def load_calibration_data(spec: str) -> CalibrationData:
    """Calibration inputs named as ``--eval`` names data: a built-in dataset (its train split) or a
    .pt/.npz/.safetensors file with ``inputs`` and optional ``lengths`` (``targets`` are not needed)."""
    if spec in BUILTIN_DATASETS:
        return load_builtin(spec, "train")
    inputs, lengths = load_inputs_file(spec)
    return inputs if lengths is None else (inputs, lengths)


# ---------------------------------------------------------------------- statistics
class _Moments:
    """Running ``Σ x xᵀ``, ``Σ s²`` (per output row) and row counts per matrix name (float64)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.sensitivity_sums: dict[str, Tensor] = {}
        self.rows: dict[str, int] = {}

    def add(self, name: str, rows: Tensor, sensitivities: Optional[Tensor]) -> None:
        rows = rows.detach().to("cpu", torch.float64)
        _accumulate(self.sums, name, rows.T @ rows)
        if sensitivities is not None:
            _accumulate(self.sensitivity_sums, name, sensitivities.detach().to("cpu", torch.float64).sum(0))
        self.rows[name] = self.rows.get(name, 0) + rows.shape[0]

    def add_lookups(self, name: str, index: Tensor, num_embeddings: int, dim: int) -> None:
        """An embedding's lookups of the rows ``index`` (any shape): ``n`` unit vectors in the moment (its
        identity ``(dim, dim)`` times ``n``), the lookup counts per row in the row weights."""
        index = index.detach().reshape(-1).to("cpu", torch.int64)
        counts = torch.bincount(index, minlength=num_embeddings).to(torch.float64)
        if name not in self.sensitivity_sums:
            counts += TOKEN_PRIOR
        _accumulate(self.sums, name, index.numel() * torch.eye(dim, dtype=torch.float64))
        _accumulate(self.sensitivity_sums, name, counts)
        self.rows[name] = self.rows.get(name, 0) + index.numel()

    def moment(self, name: str) -> Optional[Tensor]:
        if not self.rows.get(name):
            return None
        return self.sums[name] / self.rows[name]

    def row_weights(self, name: str) -> Optional[Tensor]:
        """Mean squared sensitivity per output row, scaled to mean 1 and floored (:data:`ROW_WEIGHT_FLOOR`)."""
        total = self.sensitivity_sums.get(name)
        if total is None or not float(total.sum()) > 0:
            return None
        weights = total / total.mean()
        return weights.clamp_min(ROW_WEIGHT_FLOOR)


def _accumulate(sums: dict[str, Tensor], name: str, value: Tensor) -> None:
    if name in sums:
        sums[name] += value
    else:
        sums[name] = value


def _stream(
    model: nn.Module,
    calls: Sequence[Inputs],
    layers: Mapping[str, nn.Module],
    select: Callable[[str, nn.Module], tuple[Optional[Mapping[str, Tensor]], Optional[set[int]]]],
) -> _Moments:
    """Run ``model`` on ``calls`` (eval mode, no gradients) with a pre-hook on each of ``layers`` (qualified
    name -> module) accumulating its matrices' inputs; ``select(name, module) -> (weights, inner layers)``."""
    moments = _Moments()

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if isinstance(module, nn.Embedding):
                index = args[0] if args else kwargs["input"]
                moments.add_lookups(qualified_name(name, "weight"), index, module.num_embeddings,
                                    module.embedding_dim)
                return
            weights, inner = select(name, module)
            for matrix, rows, sensitivities in matrix_inputs(module, args, kwargs, weights, inner):
                moments.add(qualified_name(name, matrix), rows, sensitivities)

        return hook

    handles = [module.register_forward_pre_hook(hook_for(name), with_kwargs=True) for name, module in layers.items()]
    try:
        with torch.no_grad(), eval_mode(model):
            for call in calls:
                run_model(model, call)
    except KCompressError:
        raise
    except Exception as error:  # noqa: BLE001 - the user's model on the user's data: one line
        raise KCompressError(f"running the model on the calibration data failed: {type(error).__name__}: {error}") \
            from error
    finally:
        for handle in handles:
            handle.remove()
    return moments


def _moments(fit: _Moments, holdout: _Moments, names: Iterable[str], samples: int) -> dict[str, SecondMoment]:
    """SecondMoments for the names seen in both parts."""
    result = {}
    for name in names:
        c_fit, c_holdout = fit.moment(name), holdout.moment(name)
        if c_fit is not None and c_holdout is not None:
            result[name] = SecondMoment(c_fit, c_holdout, samples, fit.rows[name], fit.row_weights(name))
    return result


def _layers(model: nn.Module, names: Optional[Iterable[str]]) -> dict[str, nn.Module]:
    """Qualified name -> dense layer module (LSTM, GRU, cells, Linear) of ``model``; ``names`` picks some."""
    found = {name: module for name, module in model.named_modules() if type(module) in COMPRESSED_TYPES}
    if names is None:
        return found
    names = list(names)  # read twice below; a generator would come back empty the second time
    missing = sorted(set(names) - set(found))
    if missing:
        raise KCompressError(f"no LSTM/GRU/cell/Linear layer named {', '.join(map(repr, missing))}")
    return {name: found[name] for name in names}


def collect_second_moments(
    model: nn.Module,
    data: CalibrationData,
    names: Optional[Iterable[str]] = None,
    *,
    samples: int = DEFAULT_SAMPLES,
    holdout: float = DEFAULT_HOLDOUT,
    seed: int = 0,
) -> dict[str, SecondMoment]:
    """``{"rnn.weight_ih_l0": SecondMoment, ...}`` for every matrix of the model's dense LSTM/GRU/cell/Linear
    layers (``names``: only these layers' qualified names) from one pass over the calibration data.

    ``data``: any form :func:`calibration_set` takes, or a :class:`CalibrationSet`. A layer the model does
    not call on this data has no entry.
    """
    calibration = calibration_set(data, samples, holdout, seed)
    layers = _layers(model, names)
    everything: Callable[[str, nn.Module], tuple[None, None]] = lambda name, module: (None, None)
    fit = _stream(model, calibration.fit, layers, everything)
    held = _stream(model, calibration.holdout, layers, everything)
    return _moments(fit, held, sorted(fit.sums), calibration.samples)


# ---------------------------------------------------------------------- layer-ordered calibration
class Calibrator:
    """Second moments for ``compress``, one layer at a time.

    ``source="dense"``: every moment comes from the dense model (one pass, taken when the calibrator is
    made). ``source="compressed"``: the moments of inner layer ``l`` of the layer module at ``name`` are taken
    when asked, from the model as it is then (the modules fitted before it already replaced) with the inner
    layers ``< l`` of the same module replaced by their fitted matrices' reconstructions.
    """

    def __init__(self, model: nn.Module, calibration: CalibrationSet, layer_names: Sequence[str], source: str) -> None:
        if source not in SOURCES:
            raise KCompressError(f"calibration source must be one of {', '.join(SOURCES)}, got {source!r}")
        self.calibration, self.source = calibration, source
        self.cache: dict[str, SecondMoment] = {}
        if source == "dense" and layer_names:
            self.cache = collect_second_moments(model, calibration, layer_names)

    def moment(
        self, model: nn.Module, layer: str, matrix: str, fitted: Mapping[str, nn.Module]
    ) -> Optional[SecondMoment]:
        """The moment of ``layer.matrix`` (None when the model never calls that layer on the data);
        ``fitted``: the matrices of this layer fitted so far (torch parameter name -> matrix module)."""
        name = qualified_name(layer, matrix)
        if name not in self.cache and self.source == "compressed":
            self.cache.update(self._inner_layer(model, layer, inner_layer(matrix), fitted))
        return self.cache.get(name)

    def _inner_layer(
        self, model: nn.Module, layer: str, inner: int, fitted: Mapping[str, nn.Module]
    ) -> dict[str, SecondMoment]:
        with torch.no_grad():
            weights = {name: module.reconstruct().detach() for name, module in fitted.items()  # type: ignore[operator]  # nn.Module attrs typed Tensor | Module
                       if inner_layer(name) < inner}
        layers = _layers(model, [layer])
        select = lambda name, module: (weights, {inner})
        fit = _stream(model, self.calibration.fit, layers, select)
        held = _stream(model, self.calibration.holdout, layers, select)
        return _moments(fit, held, sorted(fit.sums), self.calibration.samples)
