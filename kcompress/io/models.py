"""The standard recurrent sequence classifier: the bundled examples' architecture, and the model kcompress
runs when it is handed a plain state dict with this layout (``rnn.*`` + ``head.*``)."""

from __future__ import annotations

import re
from typing import Mapping, Optional

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

_CELLS = {"lstm": (nn.LSTM, 4), "gru": (nn.GRU, 3)}


class SequenceClassifier(nn.Module):
    """``x (B, T, F)`` [+ ``lengths (B,)``] -> logits ``(B, C)`` from the RNN output at each sequence's last step.

    ``rnn`` is a batch-first ``nn.LSTM``/``nn.GRU`` (or a compressed drop-in), ``head`` an ``nn.Linear``.
    With ``bidirectional``, the head sees ``[forward output at the last step, backward output at step 0]``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_classes: int,
        num_layers: int = 1,
        cell: str = "lstm",
        bidirectional: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        rnn_class, _ = _CELLS[cell]
        self.rnn = rnn_class(
            input_size,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.head = nn.Linear(hidden_size * (2 if bidirectional else 1), num_classes)

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        """Without ``lengths`` every sequence is taken as full length (no packing: traceable/exportable)."""
        batch = x.shape[0]
        hidden = self.rnn.hidden_size
        if lengths is None:
            output, _ = self.rnn(x)
            last = output[:, -1, :hidden]
        else:
            lengths = lengths.to("cpu", torch.long)
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            output, _ = self.rnn(packed)
            output, _ = pad_packed_sequence(output, batch_first=True, total_length=x.shape[1])
            last = output[torch.arange(batch), lengths - 1, :hidden]
        if self.rnn.bidirectional:
            last = torch.cat([last, output[:, 0, hidden:]], dim=-1)
        return self.head(last)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Tensor]) -> Optional["SequenceClassifier"]:
        """The classifier whose parameters have exactly these names and shapes, or None if they don't fit."""
        keys = set(state_dict)
        if "head.weight" not in keys or "rnn.weight_hh_l0" not in keys:
            return None
        hidden = state_dict["rnn.weight_hh_l0"].shape[1]
        gates = state_dict["rnn.weight_hh_l0"].shape[0] // hidden
        cell = next((name for name, (_, g) in _CELLS.items() if g == gates), None)
        if cell is None:
            return None
        layers = 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"rnn\.weight_ih_l(\d+)$", k)))
        model = cls(
            input_size=state_dict["rnn.weight_ih_l0"].shape[1],
            hidden_size=hidden,
            num_classes=state_dict["head.weight"].shape[0],
            num_layers=layers,
            cell=cell,
            bidirectional="rnn.weight_ih_l0_reverse" in keys,
        )
        expected = model.state_dict()
        if set(expected) != keys or any(expected[k].shape != state_dict[k].shape for k in keys):
            return None
        model.load_state_dict(dict(state_dict))
        return model
