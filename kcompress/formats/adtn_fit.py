"""ADTN decoding and fitting, made fast: gates merged into windows, a float32 working copy, Adam with a cosine
schedule (or L-BFGS), and stopping at a target error or on a plateau.

Decoding applies ``depth · (Q − 1)`` gates to a state of ``2^Q`` entries; each gate is a pass over the whole
state. Consecutive gates (in the order they act) whose index pairs lie within :data:`WINDOW_BITS` adjacent
indices are merged into one ``(2^w, 2^w)`` operator (built from the gates, so autograd reaches them), which
turns a brick layer's ``Q − 1`` passes into about ``Q / 2``, each one GEMM. See ``docs/adtn.md`` (Fitting).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

#: merged gates span at most this many adjacent indices (a 16x16 operator: 16 MACs per entry and pass)
WINDOW_BITS = 4
#: a window with few trailing entries is widened to one GEMM up to this operator size (else a batched GEMM)
KRON_LIMIT = 32
#: fit progress is reported, and the error curve sampled, every this many iterations (and at the first/last)
PROGRESS_EVERY = 10
OPTIMIZERS = ("adam", "lbfgs")
#: the learning rate each optimiser gets when the ``lr`` option is None
DEFAULT_LR = {"lbfgs": 1.0, "adam": 0.01}
#: L-BFGS history (pairs of steps kept)
LBFGS_HISTORY = 20


@dataclass(frozen=True)
class Window:
    """``count`` consecutive gates (in acting order) on indices ``low .. low + bits − 1``."""

    low: int
    bits: int
    count: int


def windows(pairs: Sequence[int], width: int = WINDOW_BITS) -> list[Window]:
    """Group the gates of one layer (first index ``q`` of each pair, in acting order) into windows of at most
    ``width`` adjacent indices; the order of the gates is kept, so applying the windows in turn is exact."""
    groups: list[Window] = []
    low = high = -1
    count = 0
    for q in pairs:
        if count and max(high, q + 1) - min(low, q) < width:
            low, high, count = min(low, q), max(high, q + 1), count + 1
            continue
        if count:
            groups.append(Window(low, high - low + 1, count))
        low, high, count = q, q + 1, 1
    if count:
        groups.append(Window(low, high - low + 1, count))
    return groups


def merge(gates: Tensor, pairs: Sequence[int], window: Window) -> Tensor:
    """The ``(depth, 2^w, 2^w)`` operators of ``gates (depth, count, 2, 2, 2, 2)`` (every layer's gates in the
    window at once) acting on ``pairs`` inside ``window``."""
    size = 2**window.bits
    depth = gates.shape[0]
    operator = torch.eye(size, dtype=gates.dtype, device=gates.device).expand(depth, size, size)
    for k, q in enumerate(pairs):
        grouped = operator.reshape(depth, 2 ** (q - window.low), 4, -1)  # the row index's bits come first
        operator = torch.einsum("dij,dajb->daib", gates[:, k].reshape(depth, 4, 4), grouped)
    return operator.reshape(depth, size, size)


def apply_window(state: Tensor, operator: Tensor, low: int) -> Tensor:
    """``operator (k, k)`` on the ``log2 k`` indices from ``low`` of ``state (2^Q,)``: one (batched) GEMM.

    With fewer than ``k`` trailing entries (``inner``), the operator is widened to ``kron(operator, I_inner)``
    so that the product is one plain GEMM (a batched one with small ``inner`` is slow, and so is its copy).
    """
    k = operator.shape[0]
    outer = 2**low
    inner = state.numel() // (outer * k)
    if widened(k, inner):
        operator = torch.kron(operator, torch.eye(inner, dtype=operator.dtype, device=operator.device))
        k, inner = k * inner, 1
    if inner == 1:
        return (state.view(outer, k) @ operator.T).reshape(-1)
    if outer == 1:
        return (operator @ state.view(k, inner)).reshape(-1)
    return torch.bmm(operator.expand(outer, k, k), state.view(outer, k, inner)).reshape(-1)


def widened(k: int, inner: int) -> bool:
    """Whether a ``(k, k)`` operator with ``inner`` trailing entries is applied as ``kron(operator, I_inner)``."""
    return 1 < inner < k and k * inner <= KRON_LIMIT


def applied_size(window: Window, qubits: int) -> int:
    """The size of the operator :func:`apply_window` multiplies the state with for ``window``."""
    k, inner = 2**window.bits, 2 ** (qubits - window.low - window.bits)
    return k * inner if widened(k, inner) else k


def decode(
    gates: Tensor, scale: Tensor, pairs: Sequence[int], layout: Sequence[Window], activation: Callable[[Tensor], Tensor]
) -> Tensor:
    """``scale · 𝓛^(depth) σ(… σ(𝓛^(1) e_0))`` as a ``(2^Q,)`` vector, for ``gates (depth, Q−1, 2, 2, 2, 2)``;
    ``layout`` is :func:`windows` of ``pairs``. Differentiable in the gates and the scale."""
    qubits = gates.shape[1] + 1
    operators, start = [], 0
    for window in layout:
        operators.append(merge(gates[:, start : start + window.count], pairs[start : start + window.count], window))
        start += window.count
    state = torch.zeros(2**qubits, dtype=gates.dtype, device=gates.device)
    state[0] = 1.0  # v^{⊗Q} with v = [1, 0]
    for m in range(gates.shape[0]):
        if m > 0:
            state = activation(state)
        for window, operator in zip(layout, operators):
            state = apply_window(state, operator[m], window.low)
    return scale * state


def descend(
    parameters: list[Tensor],
    error_of: Callable[[], Tensor],
    *,
    optimizer: str,
    steps: int,
    lr: Optional[float],
    target_error: float,
    patience: int,
    plateau: float,
    progress: Optional[Callable[[int, int, float], None]],
) -> tuple[int, list[float]]:
    """Minimise ``error_of()²`` (the relative error, a scalar) over ``parameters`` in place with ``optimizer``
    (lbfgs|adam) for at most ``steps`` iterations at learning rate ``lr`` (None: :data:`DEFAULT_LR`); stop at
    ``target_error``, or when the best error fell by less than the fraction ``plateau`` over the last
    ``patience`` iterations.

    Returns ``(iterations, curve)``: the error at iteration 1, every :data:`PROGRESS_EVERY` iterations and
    after the last (the parameters then hold the best point seen). ``progress(iteration, steps, error)`` at
    the same points.
    """
    rate = DEFAULT_LR[optimizer] if lr is None else float(lr)
    schedule = None
    if optimizer == "lbfgs":
        stepper: torch.optim.Optimizer = torch.optim.LBFGS(
            parameters, lr=rate, max_iter=1, history_size=LBFGS_HISTORY, line_search_fn="strong_wolfe"
        )
    else:
        stepper = torch.optim.Adam(parameters, lr=rate)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(stepper, T_max=max(steps, 1))

    def closure() -> Tensor:
        stepper.zero_grad()
        loss = error_of() ** 2
        loss.backward()
        return loss

    curve: list[float] = []
    bests: list[float] = []
    best_state = [p.detach().clone() for p in parameters]
    iteration = 0
    for iteration in range(1, steps + 1):
        # type ignore: torch stubs type the closure and step() as float; step returns the closure's tensor
        error = math.sqrt(max(float(stepper.step(closure).detach()), 0.0))  # type: ignore[arg-type, attr-defined]  # the error before this iteration's update
        if schedule is not None:
            schedule.step()
        if math.isfinite(error) and (not bests or error < bests[-1]):
            best_state = [p.detach().clone() for p in parameters]
        bests.append(min(error, bests[-1]) if bests else error)
        stop = error <= target_error or not math.isfinite(error) or _plateaued(bests, patience, plateau)
        if (iteration == 1 or iteration % PROGRESS_EVERY == 0) and not (stop or iteration == steps):
            _record(curve, progress, iteration, steps, error)
        if stop:
            break
    with torch.no_grad():
        final = float(error_of())
        if bests and not final <= bests[-1]:
            for parameter, saved in zip(parameters, best_state):
                parameter.copy_(saved)
            final = float(error_of())
    _record(curve, progress, iteration, steps, final)
    return iteration, curve


def _plateaued(bests: list[float], patience: int, plateau: float) -> bool:
    """The best error fell by less than ``plateau`` (a fraction) over the last ``patience`` iterations."""
    if len(bests) <= patience:
        return False
    return bests[-1] > bests[-1 - patience] * (1.0 - plateau)


def _record(
    curve: list[float], progress: Optional[Callable[[int, int, float], None]], iteration: int, steps: int, error: float
) -> None:
    curve.append(error)
    if progress is not None:
        progress(iteration, steps, error)
