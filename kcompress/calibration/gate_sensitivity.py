"""How much each output row of a recurrent matrix matters: the weights of the data-aware objective's rows.

Both matrices of an LSTM/GRU layer feed gate pre-activations. An error ``δ`` in row ``i`` of ``W x`` moves
pre-activation ``z_i``, and to first order the layer's state by ``s_i δ``, with ``s_i`` the derivative of
the state along that row at that step. Rows of a saturated gate (``σ' ≈ 0``) barely move anything, rows of
an open candidate gate move the cell state one to one. The data-aware fit (:mod:`kcompress.formats.data_fit`)
weights row ``i``'s output error by ``E[s_i²]`` over the real calibration steps: ``Σ_i E[s_i²] e_i C e_iᵀ``.

LSTM (rows ``i, f, g, o``; ``c_t = f c_{t-1} + i g``, ``h_t = o tanh(c_t)``), on the cell state for the first
three and the hidden state for the output gate::

    s_i = g σ'(z_i)    s_f = c_{t-1} σ'(z_f)    s_g = i (1 − g²)    s_o = tanh(c_t) σ'(z_o)

GRU (rows ``r, z, n``; ``n = tanh(a_n + r b_n)`` with ``a = W_ih x + b_ih``, ``b = W_hh h + b_hh``,
``h' = (1 − z) n + z h``), on the new hidden state::

    s_r = (1 − z)(1 − n²) b_n σ'(z_r)    s_z = (h − n) σ'(z_z)    s_n = (1 − z)(1 − n²)

and ``s_n · r`` for ``W_hh``'s ``n`` rows. It is a one-step, diagonal view of how a row's error reaches the
outputs: on JapaneseVowels it was better in 11 of 12 settings (tt at about 5x: 0.951 test accuracy where
the unweighted objective kept 0.881, dense 0.976), on Silero VAD it cost kcp and tt 0.5-1.2 points of
agreement, so ``compress`` fits both ways by default and keeps the one closer to the dense model
(docs/calibration.md).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _sigmoid_slope(gate: Tensor) -> Tensor:
    """``σ'`` from ``σ``."""
    return gate * (1 - gate)


def lstm_sensitivities(pre: Tensor, c0: Tensor) -> Tensor:
    """Squared state sensitivities of an LSTM's gate rows.

    Parameters
    ----------
    pre : Tensor
        Pre-activations ``W_ih x_t + b_ih + W_hh h_{t-1} + b_hh`` of shape ``(T, B, 4H)`` (torch's gate order
        ``i, f, g, o``), in processing order.
    c0 : Tensor
        The cell state before the first step, ``(B, H)``.

    Returns
    -------
    Tensor
        ``s²`` of shape ``(T, B, 4H)``; the same for ``W_ih`` and ``W_hh`` (both feed ``pre``).
    """
    i, f, g, o = pre.chunk(4, dim=-1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    cells, cell = [], c0
    for step in range(pre.shape[0]):  # c_t = f_t c_{t-1} + i_t g_t (elementwise; the fused kernel keeps no c_t)
        cells.append(cell)
        cell = f[step] * cell + i[step] * g[step]
    previous = torch.stack(cells)
    current = torch.cat([previous[1:], cell.unsqueeze(0)])
    slopes = torch.cat([g * _sigmoid_slope(i), previous * _sigmoid_slope(f), i * (1 - g * g),
                        current.tanh() * _sigmoid_slope(o)], dim=-1)
    return slopes.square()


def gru_sensitivities(pre_ih: Tensor, pre_hh: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
    """Squared state sensitivities of a GRU's gate rows.

    Parameters
    ----------
    pre_ih, pre_hh : Tensor
        ``W_ih x + b_ih`` and ``W_hh h + b_hh``, each ``(..., 3H)`` (torch's gate order ``r, z, n``).
    hidden : Tensor
        The previous hidden state ``h`` of shape ``(..., H)``.

    Returns
    -------
    ih, hh : Tensor
        ``s²`` of ``W_ih``'s and of ``W_hh``'s rows, each ``(..., 3H)`` (they differ in the ``n`` rows: the
        reset gate scales ``W_hh``'s).
    """
    a_r, a_z, a_n = pre_ih.chunk(3, dim=-1)
    b_r, b_z, b_n = pre_hh.chunk(3, dim=-1)
    reset, update = (a_r + b_r).sigmoid(), (a_z + b_z).sigmoid()
    new = (a_n + reset * b_n).tanh()
    through_new = (1 - update) * (1 - new * new)
    s_r, s_z = through_new * b_n * _sigmoid_slope(reset), (hidden - new) * _sigmoid_slope(update)
    return (torch.cat([s_r, s_z, through_new], dim=-1).square(),
            torch.cat([s_r, s_z, through_new * reset], dim=-1).square())
