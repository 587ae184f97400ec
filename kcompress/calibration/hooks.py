"""What each matrix of a dense layer multiplies, from the arguments of one call of the layer.

A forward pre-hook sees only a layer's own input. For ``nn.LSTM``/``nn.GRU`` the inner layers' inputs and
the hidden states are recomputed here: the layers are re-run one at a time and one direction at a time
(``torch.func.functional_call`` of a one-layer module on the ``meta`` device with that layer's weights, so
torch's fused kernel does the time loop). Reverse directions run on each sequence reversed within its own
length, so padded steps never reach a real one. Only real steps are returned (a ``PackedSequence``'s
lengths; a padded tensor counts every step as real).

:func:`matrix_inputs` yields ``(torch parameter name, rows (n, N), sensitivities (n, M) or None)``:
``weight_ih*`` gets the layer's inputs ``x_t``, ``weight_hh*`` the previous hidden state ``h_{t-1}`` (``h_0``
included), ``weight`` (Linear) its input, a convolution's ``weight`` the patches of its input in chunks of
samples (:mod:`kcompress.calibration.conv_inputs`: several rows for one name); the sensitivities of an
LSTM's/GRU's matrices are the squared state sensitivities of their gate rows at the same steps
(:mod:`kcompress.calibration.gate_sensitivity`), None for Linear and convolutions.
``weights`` replaces matrices by other dense values (e.g. the reconstruction of an inner layer already
compressed); ``layers`` restricts the output to some inner layers.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from kcompress.calibration.conv_inputs import patch_rows
from kcompress.calibration.gate_sensitivity import gru_sensitivities, lstm_sensitivities

#: (matrix name, rows (n, N), squared gate-row sensitivities (n, M) or None)
Rows = tuple[str, Tensor, Optional[Tensor]]


def inner_layer(matrix: str) -> int:
    """The inner layer index in a torch parameter name (``weight_hh_l1_reverse`` -> 1; 0 for cells, Linear)."""
    found = re.search(r"_l(\d+)", matrix)
    return int(found.group(1)) if found else 0


def matrix_inputs(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    weights: Optional[Mapping[str, Tensor]] = None,
    layers: Optional[set[int]] = None,
) -> Iterator[Rows]:
    """``(matrix name, rows (n, N), sensitivities (n, M) or None)`` for the matrices of ``module`` (an
    ``nn.LSTM``, ``nn.GRU``, their cells, or ``nn.Linear``) called with ``args``/``kwargs``; see the module
    docstring."""
    weights = weights or {}
    if isinstance(module, nn.RNNBase):
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        yield from _recurrent_inputs(module, args[0], hx, weights, layers)
    elif isinstance(module, nn.RNNCellBase):
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        yield from _cell_inputs(module, args[0], hx)
    elif isinstance(module, nn.Linear):
        value = args[0] if args else kwargs["input"]
        yield "weight", value.reshape(-1, value.shape[-1]), None
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
        for rows in patch_rows(module, args[0] if args else kwargs["input"]):
            yield "weight", rows, None


def _cell_inputs(module: nn.RNNCellBase, input: Tensor, hx: Any) -> Iterator[Rows]:
    """``input (B, N)`` or ``(N,)``; ``hx``: ``h``, ``(h, c)`` or None (zeros)."""
    input = input.reshape(-1, input.shape[-1])
    state = tuple(hx) if isinstance(hx, (tuple, list)) else (hx,)
    state = tuple(input.new_zeros(input.shape[0], module.hidden_size) if value is None else
                  value.reshape(-1, module.hidden_size) for value in state)
    if isinstance(module, nn.LSTMCell) and len(state) == 1:
        state = (state[0], torch.zeros_like(state[0]))
    params = {name: getattr(module, name) for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
    ih, hh = _sensitivities(module, input.unsqueeze(0), state[0].unsqueeze(0), state[1:], params)
    yield "weight_ih", input, None if ih is None else ih[0]
    yield "weight_hh", state[0], None if hh is None else hh[0]


def _sensitivities(module: nn.Module, x: Tensor, previous: Tensor, cells: tuple[Tensor, ...],
                   params: Mapping[str, Any]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Squared gate-row sensitivities ``(T, B, M)`` of ``W_ih`` and ``W_hh`` for inputs ``x (T, B, F)`` and
    previous hidden states ``previous (T, B, H)``; ``cells``: ``(c_0 (B, H),)`` for an LSTM, else empty.
    ``(None, None)`` for a layer without gates kcompress knows (e.g. ``nn.RNN``)."""
    def pre(kind: str, value: Tensor) -> Tensor:
        result = value @ params[f"weight_{kind}"].to(value.dtype).T
        bias = params[f"bias_{kind}"]
        return result if bias is None else result + bias.to(value.dtype)

    if isinstance(module, (nn.LSTM, nn.LSTMCell)):
        both = lstm_sensitivities(pre("ih", x) + pre("hh", previous), cells[0])
        return both, both
    if isinstance(module, (nn.GRU, nn.GRUCell)):
        return gru_sensitivities(pre("ih", x), pre("hh", previous), previous)
    return None, None


def _padded(module: nn.RNNBase, input: Any) -> tuple[Tensor, Tensor, bool]:
    """``(x (T, B, F), lengths (B,), unbatched)`` in the caller's batch order."""
    if isinstance(input, PackedSequence):
        padded, lengths = pad_packed_sequence(input)
        return padded, lengths.long(), False
    if input.dim() == 2:
        return input.unsqueeze(1), torch.full((1,), input.shape[0], dtype=torch.long), True
    padded = input.transpose(0, 1) if module.batch_first else input
    return padded, torch.full((padded.shape[1],), padded.shape[0], dtype=torch.long), False


def _initial_state(module: nn.RNNBase, hx: Any, batch: int, like: Tensor, unbatched: bool) -> tuple[Tensor, ...]:
    """``(h0, c0)`` (LSTM) or ``(h0,)`` (GRU), each ``(L·D, B, H)``."""
    count = 2 if isinstance(module, nn.LSTM) else 1
    if hx is None:
        shape = (module.num_layers * (2 if module.bidirectional else 1), batch, module.hidden_size)
        return (like.new_zeros(shape),) * count
    state = tuple(hx) if isinstance(hx, (tuple, list)) else (hx,)
    return tuple(value.unsqueeze(1) for value in state) if unbatched else state


def reverse_within(x: Tensor, lengths: Tensor) -> Tensor:
    """``x (T, B, ...)`` with each sequence's first ``lengths[b]`` steps reversed (padding stays at the end);
    its own inverse."""
    steps = torch.arange(x.shape[0]).unsqueeze(1)
    index = torch.where(steps < lengths, lengths - 1 - steps, steps)
    return x.gather(0, index.view(index.shape + (1,) * (x.dim() - 2)).expand_as(x))


def _recurrent_inputs(
    module: nn.RNNBase, input: Any, hx: Any, weights: Mapping[str, Tensor], layers: Optional[set[int]]
) -> Iterator[Rows]:
    x, lengths, unbatched = _padded(module, input)
    real = torch.arange(x.shape[0]).unsqueeze(1) < lengths  # (T, B)
    state = _initial_state(module, hx, x.shape[1], x, unbatched)
    suffixes = ("", "_reverse") if module.bidirectional else ("",)
    last = module.num_layers - 1 if layers is None else max(layers)
    for layer in range(last + 1):
        outputs = []
        for direction, suffix in enumerate(suffixes):
            names = {kind: f"{kind}_l{layer}{suffix}" for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
            params = {kind: weights.get(name, getattr(module, name, None)) for kind, name in names.items()}
            initial = tuple(value[layer * len(suffixes) + direction].unsqueeze(0) for value in state)
            ordered = reverse_within(x, lengths) if suffix else x
            output = _run_layer(module, ordered, initial, params)  # (T, B, H) in processing order
            if layers is None or layer in layers:
                previous = torch.cat([initial[0], output[:-1]])
                cells = (initial[1][0],) if len(initial) > 1 else ()
                ih, hh = _sensitivities(module, ordered, previous, cells, params)
                yield names["weight_ih"], ordered[real], None if ih is None else ih[real]
                yield names["weight_hh"], previous[real], None if hh is None else hh[real]
            outputs.append(reverse_within(output, lengths) if suffix else output)
        x = torch.cat(outputs, dim=-1)


def _run_layer(module: nn.RNNBase, x: Tensor, initial: tuple[Tensor, ...], params: Mapping[str, Any]) -> Tensor:
    """One layer, one direction, over padded ``x (T, B, F)``: the output ``(T, B, H)`` (exact at real steps)."""
    has_bias = params["bias_ih"] is not None
    template = _template(type(module), x.shape[-1], module.hidden_size, has_bias)  # type: ignore[arg-type]  # torch stubs: RNNBase.__hash__ does not match Hashable
    names = ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if has_bias else ())
    values = {f"{kind}_l0": params[kind].to(x.dtype) for kind in names}
    hx = initial if isinstance(module, nn.LSTM) else initial[0]
    output, _ = functional_call(template, values, (x, hx))
    return output


@lru_cache(maxsize=32)
def _template(kind: type, input_size: int, hidden_size: int, bias: bool) -> nn.Module:
    """A one-layer unidirectional LSTM/GRU on the meta device (its weights are always passed in)."""
    return kind(input_size, hidden_size, 1, bias=bias, device="meta")
