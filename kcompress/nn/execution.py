"""How a compressed layer runs each matrix: ``factorized`` or ``materialized``, and the kernels behind them.

* ``factorized``: ``matrix.multiply(x)``, never building ``W``. Rows are processed in chunks
  (:func:`chunked_multiply`) so no intermediate of one multiply exceeds :data:`ROW_BUDGET_BYTES`.
* ``materialized``: ``W = matrix.reconstruct()`` and one dense product. The weight is cached
  (:class:`WeightCache`) while no gradient can flow to the factors, and rebuilt when they change; while
  training (grad enabled, a factor requiring grad) it is reconstructed on every call, differentiably, so
  gradients reach the factors. When every matrix of an LSTM/GRU layer is materialized the layer runs
  torch's own fused kernel (:func:`fused_rnn`, the call ``nn.LSTM.forward`` makes).

A ``formats.Dense`` matrix is always materialized (its ``reconstruct`` is the weight itself).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import _VF, Tensor, nn

from kcompress import formats
from kcompress.errors import KCompressError
from kcompress.formats.rows import in_row_chunks

FACTORIZED = "factorized"
MATERIALIZED = "materialized"
MODES = (FACTORIZED, MATERIALIZED)
#: largest intermediate (bytes) one chunk of a factorized multiply may create
ROW_BUDGET_BYTES = 64 * 2**20


def check_mode(mode: object, where: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else a one-line :class:`KCompressError`."""
    if mode not in MODES:
        raise KCompressError(f"{where}: execution must be 'factorized' or 'materialized', got {mode!r}")
    return str(mode)


def is_dense(matrix: nn.Module) -> bool:
    """Whether ``matrix`` holds its weight unfactored (``formats.Dense``, or a ``Stack`` of them)."""
    if isinstance(matrix, formats.Stack):
        return all(is_dense(part) for part in matrix.parts)
    return isinstance(matrix, formats.Dense)


def tracing() -> bool:
    """Inside ``torch.jit.trace`` (which TorchScript-based ONNX export runs) or ``torch.export`` (which the
    dynamo-based ONNX export runs): shapes may be graph values there. ``torch.onnx.is_in_onnx_export`` is
    left out: it is never true outside those two, and it costs ~20 µs a call."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


def chunked_multiply(matrix: nn.Module, x: Tensor, budget: int = ROW_BUDGET_BYTES) -> Tensor:
    """``matrix.multiply(x)`` for ``x (..., N)``, over row chunks whose intermediates stay within ``budget``.

    A multiply's intermediates per row are bounded by its MACs per row (every element written costs at
    least one multiply-accumulate), so ``budget / (macs_per_vector · element size)`` rows are safe; a matrix
    that knows its largest intermediate per row (``intermediates_per_vector()``, KCP) gives that tighter bound
    instead (KCP rank 8 at the paper's shape: 160,000 elements against 2.4M MACs, so chunks of 104 rows, not
    6, and its own cache-sized chunks inside). Without gradients only one chunk's intermediates are alive at a time.
    """
    rows = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    bound = getattr(matrix, "intermediates_per_vector", matrix.macs_per_vector)
    per_row = max(1, int(bound())) * x.element_size()  # type: ignore[operator]  # nn.Module attrs typed Tensor | Module
    chunk = max(1, budget // per_row)
    if tracing() or rows.shape[0] <= chunk:
        return matrix.multiply(x)  # type: ignore[operator]  # nn.Module attrs typed Tensor | Module
    out = in_row_chunks(matrix.multiply, rows, chunk)  # type: ignore[arg-type]  # nn.Module attrs typed Tensor | Module
    return out.reshape(x.shape[:-1] + out.shape[-1:])


class WeightCache:
    """Reconstructed weights of materialized matrices, keyed on their factors' storage and version counters.

    :meth:`get` rebuilds a weight when any factor was replaced, moved or modified in place (``_version``);
    it never caches while a factor can receive a gradient (the weight must then carry the graph) or while
    tracing (the reconstruction must be part of the traced graph).
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[list[tuple[int, int, int]], Tensor]] = {}

    def get(self, name: str, matrix: nn.Module) -> Tensor:
        """The ``(M, N)`` weight of ``matrix`` (stored under ``name``)."""
        params = list(matrix.parameters())
        if torch.is_grad_enabled() and any(p.requires_grad for p in params) or tracing():
            return matrix.reconstruct()  # type: ignore[operator]  # nn.Module attrs typed Tensor | Module
        # a replaced parameter changes id, a move or cast data_ptr, an in-place update _version
        key = [(id(p), p.data_ptr(), p._version) for p in params]
        entry = self._entries.get(name)
        if entry is None or entry[0] != key:
            with torch.no_grad():
                entry = (key, matrix.reconstruct().contiguous())  # type: ignore[operator]  # nn.Module attrs typed Tensor | Module
            self._entries[name] = entry
        return entry[1]

    def clear(self) -> None:
        """Forget every weight."""
        self._entries.clear()


def identity(size: int, like: Tensor, block: int = 0, blocks: int = 1) -> Tensor:
    """``(size, blocks·size)`` zeros holding the identity in column block ``block``: ``x @ I.T`` picks that
    block of ``x`` exactly (products with 1 and 0 and sums of zeros are exact in IEEE arithmetic)."""
    eye = torch.zeros(size, blocks * size, dtype=like.dtype, device=like.device)
    eye[:, block * size : (block + 1) * size] = torch.eye(size, dtype=like.dtype, device=like.device)
    return eye


def fused_rnn(
    kind: str,
    data: Tensor,
    sizes: Union[int, Sequence[int]],
    state: tuple[Tensor, ...],
    weights: list[Tensor],
    has_biases: bool,
    bidirectional: bool,
    num_layers: int = 1,
    dropout: float = 0.0,
    training: bool = False,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Layers through torch's fused kernel (``_VF.lstm`` / ``_VF.gru``, as ``nn.LSTM.forward`` calls it,
    dropout between layers included).

    ``data (N, F)`` in packed row order with ``sizes`` rows per step (an int: every step has all ``B``
    rows); ``state`` the ``(L·D, B, H)`` tensor(s); ``weights`` torch's flat list ``[w_ih, w_hh, (b_ih,
    b_hh)]`` per layer and direction. Returns the output ``(N, D·H)`` and the final state(s).
    """
    run: Callable[..., Any] = _VF.lstm if kind == "LSTM" else _VF.gru  # the two kernels differ in their state type
    hx: Union[Tensor, tuple[Tensor, ...]] = state if kind == "LSTM" else state[0]
    if isinstance(sizes, int) or (torch.is_tensor(sizes) and sizes.dim() == 0):
        steps = data.view(-1, sizes, data.shape[1])
        result = run(steps, hx, weights, has_biases, num_layers, dropout, training, bidirectional, False)
        output = result[0].view(-1, result[0].shape[2])
    else:
        batch_sizes = torch.as_tensor(list(sizes), dtype=torch.int64)
        result = run(data, batch_sizes, hx, weights, has_biases, num_layers, dropout, training, bidirectional)
        output = result[0]
    return output, tuple(result[1:])


def fused_cell(kind: str, input: Tensor, state: tuple[Tensor, ...], w_ih: Tensor, w_hh: Tensor,
               b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> tuple[Tensor, ...]:
    """One step through torch's cell kernel (``_VF.lstm_cell`` / ``_VF.gru_cell``, as ``nn.LSTMCell`` calls it)."""
    if kind == "LSTM":
        return tuple(_VF.lstm_cell(input, state, w_ih, w_hh, b_ih, b_hh))
    return (_VF.gru_cell(input, state[0], w_ih, w_hh, b_ih, b_hh),)
