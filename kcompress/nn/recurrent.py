"""Drop-in ``nn.LSTM`` / ``nn.GRU`` over matrix modules: layers, directions, packing and the time loop.

Every input is run in torch's packed layout: ``data (N, features)`` holding the rows of each time step
one after the other, and ``sizes[t]`` rows at step ``t`` (a padded ``(T, B, F)`` tensor is ``N = T·B``
with ``B`` rows at every step; a ``PackedSequence`` gives its ``batch_sizes``, sorted longest first).

Each layer takes the fastest path its execution paths allows (:meth:`CompressedRNN.layer_path`): with every
matrix materialized, torch's fused kernel (``_VF.lstm``/``_VF.gru``) on the reconstructed weights; with
``W_hh`` materialized and ``W_ih`` factorized, the input pre-activations of all steps in one factorized
product, then the fused kernel fed them through an identity ``W_ih`` (exact in IEEE arithmetic); with a
factorized ``W_hh``, the Python time loop :func:`scan`. In the loop, per direction, the input-to-hidden
product of all steps is one product on ``(N, input)`` before the loop (as cuDNN does); the loop only does
``W_hh h`` and the gate math, and, like torch's own packed
implementation, drops finished sequences from the batch (forward) or adds starting ones (reverse), so
padded steps are never computed and each sequence's final state is taken at its own last step.

Dropout between layers uses ``torch.nn.functional.dropout`` on each layer's output except the last's,
in the same order and on the same shapes as torch's CPU implementation, so the masks match torch's under
the same seed.

Tracing and export: padded input is traced by ``torch.jit.trace`` and exported by ``torch.onnx.export``
(the time loop is unrolled for the traced length). ``PackedSequence`` input is refused while tracing or
exporting (:class:`~kcompress.errors.KCompressError`): its lengths drive the Python loop and would be
frozen into the graph; trace or export with padded input and mask the outputs instead.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from kcompress.errors import KCompressError
from kcompress.nn.base import CompressedLayer
from kcompress.nn.cells import CellMath, GRUMath, LSTMMath, Product, PublicState, State
from kcompress.nn.execution import fused_rnn, identity, tracing

Input = Union[Tensor, PackedSequence]
#: the Python overhead of one step of the time loop, in multiply-accumulates of a one-thread GEMM (~50 µs)
LOOP_STEP_MACS = 2**21


class _Direction(NamedTuple):
    """torch's parameter names of one direction of one layer, and whether it runs backwards in time."""

    weight_ih: str
    weight_hh: str
    bias_ih: str
    bias_hh: str
    reverse: bool


def _directions(num_layers: int, bidirectional: bool) -> list[list[_Direction]]:
    """``[layer][direction]`` parameter names, in torch's order."""
    kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    suffixes = ("", "_reverse") if bidirectional else ("",)
    return [
        [_Direction(*(f"{kind}_l{layer}{suffix}" for kind in kinds), bool(suffix))  # type: ignore[call-arg, arg-type]  # mypy cannot count a generator's items
         for suffix in suffixes]
        for layer in range(num_layers)
    ]


def scan(
    cell: CellMath,
    steps: Sequence[Tensor],
    initial: State,
    hh: Product,
    hidden_bias: Optional[Tensor],
    reverse: bool,
    sizes: Optional[Sequence[int]] = None,
) -> tuple[Tensor, State]:
    """The time loop of one direction of one layer.

    ``steps[t]``: ``(rows_t, G·H)`` input pre-activations of step ``t`` (biases included); ``initial``: the
    state ``(B, H)`` each. ``sizes``: the rows of each step when they vary (a PackedSequence's non-increasing
    ``batch_sizes``), None when every step has all ``B`` rows. Returns the outputs ``(Σ rows_t, H)`` in
    packed row order and the final state ``(B, H)`` each, taken at each row's last step.
    """
    order = range(len(steps) - 1, -1, -1) if reverse else range(len(steps))
    state = initial if sizes is None else tuple(value[: sizes[order[0]]] for value in initial)
    changes = {} if sizes is None else _size_changes(sizes, order)
    finished: list[State] = []
    outputs: list[Tensor] = []
    for t in order:
        rows = changes.get(t)
        if rows is not None:
            state = _resize(state, rows, initial, finished)
        state = cell.step(steps[t], hh, hidden_bias, state)
        outputs.append(state[0])
    if reverse:
        outputs.reverse()
    if finished:
        finished.reverse()  # the rows that finished last come right after the rows still active
        state = tuple(torch.cat((value,) + tuple(rows[k] for rows in finished)) for k, value in enumerate(state))
    return torch.cat(outputs), state


def _size_changes(sizes: Sequence[int], order: Sequence[int]) -> dict[int, int]:
    """``{step: rows}`` for the steps (in loop order) whose row count differs from the step before."""
    changes = {}
    for previous, t in zip(order, order[1:]):
        if sizes[t] != sizes[previous]:
            changes[t] = sizes[t]
    return changes


def _resize(state: State, rows: int, initial: State, finished: list[State]) -> State:
    """Keep the first ``rows`` rows, moving the others to ``finished`` (forward in time), or append the next
    rows of ``initial`` (sequences that start at this step, backward in time)."""
    active = state[0].shape[0]
    if rows < active:
        finished.append(tuple(value[rows:] for value in state))
        return tuple(value[:rows] for value in state)
    return tuple(torch.cat((value, start[active:rows])) for value, start in zip(state, initial))


class CompressedRNN(CompressedLayer):
    """Shared machinery of :class:`CompressedLSTM` and :class:`CompressedGRU` (they differ in ``cell``)."""

    cell: ClassVar[CellMath]
    attributes: ClassVar[tuple[str, ...]] = (
        "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")
    config_keys: ClassVar[tuple[str, ...]] = attributes

    input_size: int
    hidden_size: int
    num_layers: int
    bias: bool
    batch_first: bool
    dropout: float
    bidirectional: bool

    def __init__(
        self,
        config: Mapping[str, Any],
        matrices: Mapping[str, nn.Module],
        biases: Mapping[str, Optional[Tensor]],
    ) -> None:
        super().__init__(config, matrices, biases)
        self._layers = _directions(self.num_layers, self.bidirectional)
        self._identities: dict[tuple, Tensor] = {}

    @classmethod
    def parameter_names(cls, config: Mapping[str, Any]) -> tuple[list[str], list[str]]:
        directions = [d for layer in _directions(config["num_layers"], config["bidirectional"]) for d in layer]
        return (
            [name for d in directions for name in (d.weight_ih, d.weight_hh)],
            [name for d in directions for name in (d.bias_ih, d.bias_hh)],
        )

    def flatten_parameters(self) -> None:
        """No-op, for code written for torch's RNNs (there is no flat cuDNN buffer here)."""

    def forward(self, input: Input, hx: Optional[PublicState] = None) -> tuple[Input, PublicState]:
        """As torch: ``input (T, B, F)`` (``(B, T, F)`` with ``batch_first``), ``(T, F)`` or a ``PackedSequence``.

        Returns the output ``(T, B, D·H)`` (same layout as the input) and the final state
        ``(num_layers·D, B, H)`` each, in the input's batch order.
        """
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx)
        return self._forward_padded(input, hx)

    def _forward_packed(self, input: PackedSequence, hx: Optional[PublicState]) -> tuple[PackedSequence, PublicState]:
        if tracing():
            raise KCompressError(
                f"{type(self).__name__}: PackedSequence input cannot be traced or exported (its lengths would be "
                "frozen into the graph); use padded input"
            )
        data, batch_sizes, sorted_indices, unsorted_indices = input
        sizes = batch_sizes.tolist()
        self._check_input(data)
        if hx is None:
            state = self._zero_state(data, sizes[0])
        else:
            state = self._checked_state(self.cell.from_public(hx), sizes[0])
            if sorted_indices is not None:
                state = tuple(value.index_select(1, sorted_indices) for value in state)
        output, final = self._run(data, sizes, state)
        if unsorted_indices is not None:
            final = tuple(value.index_select(1, unsorted_indices) for value in final)
        return PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices), self.cell.to_public(final)

    def _forward_padded(self, input: Tensor, hx: Optional[PublicState]) -> tuple[Tensor, PublicState]:
        if input.dim() not in (2, 3):
            raise ValueError(f"{self.cell.name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
        self._check_input(input)
        batched = input.dim() == 3
        given = None if hx is None else self.cell.from_public(hx)
        if given is not None and any(value.dim() != input.dim() for value in given):
            raise RuntimeError(
                f"For {input.dim()}-D input, hx should also be {input.dim()}-D but got "
                f"{[value.dim() for value in given]}-D tensors"
            )
        if not batched:  # (T, F) -> (T, 1, F), whatever batch_first says
            input = input.unsqueeze(1)
            given = None if given is None else tuple(value.unsqueeze(1) for value in given)
        elif self.batch_first:
            input = input.transpose(0, 1)
        steps, batch = input.shape[0], input.shape[1]
        state = self._zero_state(input, batch) if given is None else self._checked_state(given, batch)
        output, final = self._run(input.reshape(steps * batch, input.shape[2]), batch, state)
        output = output.view(steps, batch, output.shape[1])
        if not batched:
            return output.squeeze(1), self.cell.to_public(tuple(value.squeeze(1) for value in final))
        return output.transpose(0, 1) if self.batch_first else output, self.cell.to_public(final)

    def _state_shape(self, batch: int) -> tuple[int, int, int]:
        return self.num_layers * (2 if self.bidirectional else 1), batch, self.hidden_size

    def _zero_state(self, input: Tensor, batch: int) -> State:
        return (input.new_zeros(self._state_shape(batch)),) * self.cell.state_count

    def _check_input(self, input: Tensor) -> None:
        if not tracing() and input.shape[-1] != self.input_size:
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {input.shape[-1]}"
            )

    def _checked_state(self, state: State, batch: int) -> State:
        """``state`` after checking each is ``(num_layers·D, batch, H)`` (as torch's errors)."""
        expected = self._state_shape(batch)
        for index, value in enumerate(state):
            if not tracing() and tuple(value.shape) != expected:
                raise RuntimeError(f"Expected hidden[{index}] size {expected}, got {list(value.shape)}")
        return state

    def _run(self, data: Tensor, sizes: Union[int, list[int]], state: State) -> tuple[Tensor, State]:
        """All layers: ``data (N, input_size)`` in packed row order, ``state`` each ``(L·D, B, H)`` ->
        output ``(N, D·H)`` and the final state, each ``(L·D, B, H)``. ``sizes``: rows per step, an int when
        every step has all rows (padded input), a PackedSequence's batch sizes otherwise."""
        if self.all_materialized:  # every layer in torch's kernel, in one call (dropout as nn.LSTM does it)
            weights = [w for layer in self._layers for d in layer
                       for w in self._flat_weights(d, self.weight(d.weight_ih))]
            return fused_rnn(self.cell.name, data, sizes, state, weights, self.bias, self.bidirectional,
                             self.num_layers, self.dropout, self.training)
        finals: list[State] = []
        for layer, directions in enumerate(self._layers):
            first = layer * len(directions)
            initial = tuple(value[first : first + len(directions)] for value in state)
            data, final = self._run_layer(layer, data, sizes, initial)
            finals.append(final)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                data = nn.functional.dropout(data, self.dropout, training=True)
        return data, tuple(torch.cat([final[k] for final in finals]) for k in range(self.cell.state_count))

    def layer_path(self, layer: int, batch: int = 1) -> str:
        """How layer ``layer`` runs for ``batch`` sequences: ``"fused"`` (every matrix materialized: torch's
        kernel), ``"fused_input"`` (W_hh materialized, some W_ih factorized: the input pre-activations of all
        steps first, then torch's kernel with an identity W_ih) or ``"loop"`` (the per-step loop of :func:`scan`).

        The identity costs ``(D·G·H)²`` MACs per row, so ``"fused_input"`` is taken only when that is at most a
        quarter of the dense input product ``D·G·H·input`` (wide inputs such as the KCP paper's 57,600) and
        the identity's MACs per step, ``batch·(D·G·H)²``, stay below :data:`LOOP_STEP_MACS`, what one step of
        the Python loop costs in overhead (measured: on LSTM(H, H) the identity made the layer 3-5x slower
        than the loop). Otherwise a factorized W_ih runs the loop; a factorized W_hh always does."""
        directions = self._layers[layer]
        if not all(self.materialized(d.weight_hh) for d in directions):
            return "loop"
        if all(self.materialized(d.weight_ih) for d in directions):
            return "fused"
        width = len(directions) * self.cell.gates * self.hidden_size
        features = self.input_size if layer == 0 else len(directions) * self.hidden_size
        return "fused_input" if 4 * width <= features and batch * width * width <= LOOP_STEP_MACS else "loop"

    def _run_layer(
        self, layer: int, data: Tensor, sizes: Union[int, list[int]], initial: State
    ) -> tuple[Tensor, State]:
        """One layer, all directions: ``data (N, in)`` and ``initial`` ``(D, B, H)`` each -> ``(N, D·H)`` and
        the final state ``(D, B, H)`` each."""
        directions = self._layers[layer]
        batch = sizes[0] if isinstance(sizes, list) else sizes if isinstance(sizes, int) else 1  # traced: a tensor
        path = self.layer_path(layer, batch)
        bidirectional = len(directions) == 2
        if path == "fused":
            weights = [w for d in directions for w in self._flat_weights(d, self.weight(d.weight_ih))]
            return fused_rnn(self.cell.name, data, sizes, initial, weights, self.bias, bidirectional)
        if path == "fused_input":
            return self._run_fused_input(directions, data, sizes, initial)
        results = [
            self._run_direction(d, data, sizes, tuple(value[k] for value in initial))
            for k, d in enumerate(directions)
        ]
        output = results[0][0] if len(results) == 1 else torch.cat([output for output, _ in results], dim=1)
        return output, tuple(torch.stack([final[k] for _, final in results]) for k in range(self.cell.state_count))

    def _flat_weights(self, names: _Direction, weight_ih: Tensor) -> list[Tensor]:
        """torch's flat weights of one direction: ``[w_ih, w_hh, b_ih, b_hh]`` (no biases without bias)."""
        weights = [weight_ih, self.weight(names.weight_hh)]
        return weights + [getattr(self, names.bias_ih), getattr(self, names.bias_hh)] if self.bias else weights

    def _run_fused_input(
        self, directions: list[_Direction], data: Tensor, sizes: Union[int, list[int]], initial: State
    ) -> tuple[Tensor, State]:
        """The input pre-activations ``(N, G·H)`` of every direction in one product each (biases folded as
        in :func:`scan`), then torch's kernel on them with ``W_ih`` the identity block of its direction (exact)
        and only the bias :meth:`CellMath.hidden_bias` keeps with ``W_hh h`` (GRU's ``b_hh``)."""
        count = len(directions)
        pre = [self._input_preactivations(d, data) for d in directions]
        inputs = pre[0] if count == 1 else torch.cat(pre, dim=1)
        weights: list[Tensor] = []
        for k, names in enumerate(directions):
            weights += [self._identity(pre[0].shape[1], inputs, k, count), self.weight(names.weight_hh)]
            hidden_bias = self.cell.hidden_bias(getattr(self, names.bias_hh))
            if hidden_bias is not None:
                weights += [torch.zeros_like(hidden_bias), hidden_bias]
        has_biases = len(weights) > 2 * count
        return fused_rnn(self.cell.name, inputs, sizes, initial, weights, has_biases, count == 2)

    def _identity(self, size: int, like: Tensor, block: int, blocks: int) -> Tensor:
        key = (size, block, blocks, like.dtype, like.device)
        if tracing():  # a constant of the graph, not an attribute assigned while exporting
            return identity(size, like, block, blocks)
        if key not in self._identities:
            self._identities[key] = identity(size, like, block, blocks)
        return self._identities[key]

    def _input_preactivations(self, names: _Direction, data: Tensor) -> Tensor:
        """``W_ih x + input_bias`` for every row of ``data (N, in)`` -> ``(N, G·H)``."""
        gi = self.product(names.weight_ih, data)
        input_bias = self.cell.input_bias(getattr(self, names.bias_ih), getattr(self, names.bias_hh))
        return gi if input_bias is None else gi + input_bias

    def _run_direction(
        self, names: _Direction, data: Tensor, sizes: Union[int, list[int]], initial: State
    ) -> tuple[Tensor, State]:
        """One direction of one layer through :func:`scan`: ``data (N, in)`` -> output ``(N, H)`` and final
        state ``(B, H)`` each."""
        gi = self._input_preactivations(names, data)
        if isinstance(sizes, list):
            steps, varying = gi.split(sizes), sizes
        else:  # a view, not split(int): under tracing the batch size is a graph value
            steps, varying = gi.view(-1, sizes, gi.shape[1]).unbind(0), None
        hh = lambda h: self.product(names.weight_hh, h)  # noqa: E731
        hidden_bias = self.cell.hidden_bias(getattr(self, names.bias_hh))
        return scan(self.cell, steps, initial, hh, hidden_bias, names.reverse, varying)


class CompressedLSTM(CompressedRNN):
    """Drop-in ``nn.LSTM`` (without ``proj_size``): ``forward(input, (h0, c0) | None) -> (output, (h_n, c_n))``."""

    dense_type = nn.LSTM
    cell = LSTMMath()
    gates = cell.gates
    attributes = CompressedRNN.attributes + ("proj_size",)
    config_keys = attributes

    proj_size: int

    @classmethod
    def dense_config(cls, dense: nn.Module) -> dict[str, Any]:
        if dense.proj_size > 0:  # type: ignore[operator]  # nn.Module attrs typed Tensor | Module
            raise KCompressError(
                f"LSTM with proj_size={dense.proj_size} is not supported; only proj_size=0 can be compressed"
            )
        return super().dense_config(dense)


class CompressedGRU(CompressedRNN):
    """Drop-in ``nn.GRU``: ``forward(input, h0 | None) -> (output, h_n)``."""

    dense_type = nn.GRU
    cell = GRUMath()
    gates = cell.gates
