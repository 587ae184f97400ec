"""The gate math of LSTM and GRU, and the drop-in ``nn.LSTMCell`` / ``nn.GRUCell``.

A :class:`CellMath` says everything that differs between the two cells: the gate count, the state
(``(h, c)`` or ``(h,)``), where the biases go, and the gate function. One step is always

    gi = W_ih x + input_bias        (for sequences: computed for every step at once, before the loop)
    gh = W_hh h + hidden_bias
    state' = gate(gi, gh, state)

LSTM folds both biases into ``input_bias`` (one add per sequence instead of one per step); GRU keeps
``b_hh`` with ``W_hh h`` because its candidate gate multiplies ``W_hn h + b_hn`` by the reset gate.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping, Optional, Union, cast

import torch
from torch import Tensor, nn

from kcompress.nn.base import CompressedLayer
from kcompress.nn.execution import fused_cell

#: internal recurrent state: ``(h,)`` for GRU, ``(h, c)`` for LSTM, each ``(batch, hidden)``
State = tuple[Tensor, ...]
#: the state as torch's modules take and return it: ``h`` for GRU, ``(h, c)`` for LSTM
PublicState = Union[Tensor, tuple[Tensor, Tensor]]
#: ``h (B, H) -> W_hh h (B, G·H)``
Product = Callable[[Tensor], Tensor]


class CellMath:
    """The parts of a recurrent cell that differ between LSTM and GRU."""

    name: ClassVar[str]
    gates: ClassVar[int]
    #: number of state tensors (2 for LSTM: h and c)
    state_count: ClassVar[int]

    def input_bias(self, bias_ih: Optional[Tensor], bias_hh: Optional[Tensor]) -> Optional[Tensor]:
        """Bias ``(G·H,)`` added to ``W_ih x``."""
        raise NotImplementedError

    def hidden_bias(self, bias_hh: Optional[Tensor]) -> Optional[Tensor]:
        """Bias ``(G·H,)`` added to ``W_hh h`` at every step."""
        raise NotImplementedError

    def gate(self, gi: Tensor, gh: Tensor, state: State) -> State:
        """``gi``, ``gh`` ``(B, G·H)`` and the state ``(B, H)`` each -> the next state."""
        raise NotImplementedError

    def step(self, gi: Tensor, hh: Product, hidden_bias: Optional[Tensor], state: State) -> State:
        """One time step from the input pre-activations ``gi (B, G·H)`` (biases included); ``hh(h)`` is
        ``W_hh h`` on the matrix's planned path."""
        gh = hh(state[0])
        if hidden_bias is not None:
            gh = gh + hidden_bias
        return self.gate(gi, gh, state)

    def to_public(self, state: State) -> PublicState:
        return cast(PublicState, state) if self.state_count > 1 else state[0]  # (h, c) when two

    def from_public(self, hx: PublicState) -> State:
        return tuple(hx) if self.state_count > 1 else (cast(Tensor, hx),)  # a single tensor when one


class LSTMMath(CellMath):
    """``i, f, g, o`` gates (torch's order); state ``(h, c)``."""

    name = "LSTM"
    gates = 4
    state_count = 2

    def input_bias(self, bias_ih: Optional[Tensor], bias_hh: Optional[Tensor]) -> Optional[Tensor]:
        return None if bias_ih is None or bias_hh is None else bias_ih + bias_hh

    def hidden_bias(self, bias_hh: Optional[Tensor]) -> Optional[Tensor]:
        return None

    def gate(self, gi: Tensor, gh: Tensor, state: State) -> State:
        i, f, g, o = (gi + gh).chunk(4, 1)
        c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class GRUMath(CellMath):
    """``r, z, n`` gates (torch's order); state ``(h,)``."""

    name = "GRU"
    gates = 3
    state_count = 1

    def input_bias(self, bias_ih: Optional[Tensor], bias_hh: Optional[Tensor]) -> Optional[Tensor]:
        return bias_ih

    def hidden_bias(self, bias_hh: Optional[Tensor]) -> Optional[Tensor]:
        return bias_hh

    def gate(self, gi: Tensor, gh: Tensor, state: State) -> State:
        i_r, i_z, i_n = gi.chunk(3, 1)
        h_r, h_z, h_n = gh.chunk(3, 1)
        n = torch.tanh(torch.addcmul(i_n, torch.sigmoid(i_r + h_r), h_n))
        return (torch.lerp(n, state[0], torch.sigmoid(i_z + h_z)),)


class CompressedCell(CompressedLayer):
    """One step of a cell: ``input (B, input_size)`` or ``(input_size,)`` [+ state] -> the next state."""

    cell: ClassVar[CellMath]
    config_keys = ("input_size", "hidden_size", "bias")
    attributes = config_keys

    input_size: int
    hidden_size: int
    bias: bool
    bias_ih: Optional[nn.Parameter]
    bias_hh: Optional[nn.Parameter]

    @classmethod
    def parameter_names(cls, config: Mapping[str, Any]) -> tuple[list[str], list[str]]:
        return ["weight_ih", "weight_hh"], ["bias_ih", "bias_hh"]

    def forward(self, input: Tensor, hx: Optional[PublicState] = None) -> PublicState:
        name = self.dense_type.__name__
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = input.new_zeros(input.shape[0], self.hidden_size)
            state: State = (zeros,) * self.cell.state_count
        else:
            state = self.cell.from_public(hx)
            for index, value in enumerate(state):
                if value.dim() not in (1, 2):
                    raise ValueError(f"{name}: Expected hx[{index}] to be 1D or 2D, got {value.dim()}D instead")
            state = state if batched else tuple(value.unsqueeze(0) for value in state)
        state = self._step(input, state)
        return self.cell.to_public(state if batched else tuple(value.squeeze(0) for value in state))

    def _step(self, input: Tensor, state: State) -> State:
        """``input (B, input_size)``, state ``(B, H)`` each -> next state; torch's cell kernel when both
        matrices are materialized."""
        if self.materialized("weight_ih") and self.materialized("weight_hh"):
            weights = (self.weight("weight_ih"), self.weight("weight_hh"), self.bias_ih, self.bias_hh)
            return fused_cell(self.cell.name, input, state, *weights)
        gi = self.product("weight_ih", input)
        input_bias = self.cell.input_bias(self.bias_ih, self.bias_hh)
        if input_bias is not None:
            gi = gi + input_bias
        hh = lambda h: self.product("weight_hh", h)  # noqa: E731
        return self.cell.step(gi, hh, self.cell.hidden_bias(self.bias_hh), state)


class CompressedLSTMCell(CompressedCell):
    """Drop-in ``nn.LSTMCell``: ``forward(input, (h, c) | None) -> (h', c')``."""

    dense_type = nn.LSTMCell
    cell = LSTMMath()
    gates = cell.gates


class CompressedGRUCell(CompressedCell):
    """Drop-in ``nn.GRUCell``: ``forward(input, h | None) -> h'``."""

    dense_type = nn.GRUCell
    cell = GRUMath()
    gates = cell.gates
