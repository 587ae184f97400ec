"""Data-aware fitting of one matrix: match what the matrix computes on real inputs, not the raw weight.

For a matrix ``W (M, N)`` whose inputs ``x`` have the second moment ``C = E[x xᵀ] (N, N)``, the output
error of an approximation ``Ŵ`` is ``tr(E C Eᵀ) / tr(W C Wᵀ)`` with ``E = W − Ŵ``; its square root is
``‖(W − Ŵ) Xᵀ‖_F / ‖W Xᵀ‖_F`` over the calibration inputs ``X``. Only ``C`` is needed, never ``X``.

:func:`refine_to_data` minimises it over a format's own parameters through its differentiable
``reconstruct()`` (every tensor format); :func:`whitened_svd` is the closed-form optimum at rank ``r``
(used by ``svd``). ``Factorization.fit_to_data`` runs either and keeps the result only when it lowers the
error on a held-out second moment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import Tensor

from ..errors import KCompressError

if TYPE_CHECKING:
    from .base import ProgressFn

OPTIMIZERS = ("auto", "lbfgs", "adam")
#: Adam steps before L-BFGS with ``optimizer="auto"`` (L-BFGS alone can stall at the plain fit's start)
WARMUP_STEPS = 100
#: eigenvalues of the (ridged) second moment below this fraction of the largest are dropped from the
#: whitening factor of :func:`refine_to_data` (their directions carry no output energy)
EIGEN_CUTOFF = 1e-12


@dataclass(frozen=True)
class DataFitSettings:
    """How a matrix is fitted to data.

    ``ridge``: ``C + ridge·tr(C)/N·I`` is fitted (stabilises rank-deficient inputs and keeps the weight
    from drifting along directions the data never excites; 1, the inputs' mean energy per direction, had
    the best held-out agreement with the dense model among 0.01-10 on the JapaneseVowels models); ``optimizer``: ``"lbfgs"`` (strong Wolfe line
    search), ``"adam"``, or ``"auto"`` (:data:`WARMUP_STEPS` Adam steps, then L-BFGS); ``iterations``: the
    cap (optimizer steps); ``lr``: Adam's learning rate (L-BFGS uses 1 with its line search).
    """

    ridge: float = 1.0
    optimizer: str = "auto"
    iterations: int = 300
    lr: float = 1e-2

    def __post_init__(self) -> None:
        if not (self.ridge >= 0 and math.isfinite(self.ridge)):
            raise KCompressError(f"ridge must be a finite number >= 0, got {self.ridge!r}")
        if self.optimizer not in OPTIMIZERS:
            raise KCompressError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            raise KCompressError(f"iterations must be an integer >= 0, got {self.iterations!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise KCompressError(f"lr must be positive, got {self.lr!r}")


@dataclass(frozen=True)
class DataFitInfo:
    """What a data-aware fit did. Errors are relative output errors ``√(tr(E C Eᵀ) / tr(W C Wᵀ))`` on the
    held-out second moment (``before``: the plain fit, ``after``: the kept result) and on the fitted one
    (``fit_before``/``fit_after``). ``reference`` is ``tr(W C Wᵀ)`` of the held-out moment (combines the
    errors of stacked blocks exactly). ``kept`` is False when the data-aware result did not lower the
    held-out error and the plain fit was restored."""

    before: float
    after: float
    fit_before: float
    fit_after: float
    kept: bool
    method: str
    iterations: int
    seconds: float
    reference: float


def output_error(weight: Tensor, approximation: Tensor, moment: Tensor) -> float:
    """``√(tr(E C Eᵀ) / tr(W C Wᵀ))`` with ``E = weight − approximation (M, N)`` and ``C = moment (N, N)``
    (float64; 0 when ``tr(W C Wᵀ)`` is 0 and the error is 0)."""
    weight = weight.detach().to("cpu", torch.float64)
    error = weight - approximation.detach().to("cpu", torch.float64)
    moment = moment.to("cpu", torch.float64)
    num = float(((error @ moment) * error).sum().clamp_min(0))
    den = float(((weight @ moment) * weight).sum().clamp_min(0))
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def ridged(moment: Tensor, ridge: float) -> Tensor:
    """``C + ridge·tr(C)/N·I`` in float64."""
    moment = moment.double()
    size = moment.shape[0]
    return moment + (ridge * float(torch.trace(moment)) / max(size, 1)) * torch.eye(size, dtype=torch.float64)


def whitened_svd(weight: Tensor, moment: Tensor, rank: int, ridge: float = 0.0) -> tuple[Tensor, Tensor]:
    """The rank-``rank`` ``Ŵ = U V`` minimising ``tr((W − Ŵ) C (W − Ŵ)ᵀ)`` for ``C = moment + ridge``.

    Parameters
    ----------
    weight : Tensor
        ``W (M, N)``.
    moment : Tensor
        Second moment ``C (N, N)`` of the inputs (symmetric positive semi-definite).
    rank : int
        ``r``.
    ridge : float
        Relative ridge (see :func:`ridged`); with 0 and a singular ``C`` the pseudo-inverse root is used,
        which is still optimal (directions without data carry no error).

    Returns
    -------
    left, right : Tensor
        ``(M, r)`` and ``(r, N)`` float64 with ``Ŵ = left @ right``: the truncated SVD of ``W S`` for
        ``S = C^{1/2}`` (symmetric root by ``eigh``, negative eigenvalues clipped to 0), the right factor
        multiplied back by ``S^{-1}``, the singular values split evenly between the factors.
    """
    values, vectors = torch.linalg.eigh(ridged(moment, ridge))
    values = values.clamp_min(0)
    keep = values > values.max() * EIGEN_CUTOFF if values.max() > 0 else values > 0
    root = values.sqrt()
    inverse_root = torch.where(keep, 1.0 / torch.where(keep, root, torch.ones_like(root)), 0.0)
    whiten = (vectors * root) @ vectors.T
    unwhiten = (vectors * inverse_root) @ vectors.T
    u, s, vh = torch.linalg.svd(weight.double() @ whiten, full_matrices=False)
    half = s[:rank].sqrt()
    return u[:, :rank] * half, (half[:, None] * vh[:rank]) @ unwhiten


def whitening_factor(moment: Tensor, ridge: float) -> Tensor:
    """``S (N, k)`` with ``S Sᵀ = C + ridge`` up to eigenvalues below :data:`EIGEN_CUTOFF` of the largest,
    so ``tr(E C Eᵀ) = ‖E S‖²_F`` costs ``M·N·k`` instead of ``M·N²`` when the inputs span ``k < N`` directions."""
    values, vectors = torch.linalg.eigh(ridged(moment, ridge))
    keep = values > values.max().clamp_min(0) * EIGEN_CUTOFF
    if not bool(keep.any()):
        return torch.zeros(moment.shape[0], 1, dtype=torch.float64)
    return vectors[:, keep] * values[keep].sqrt()


def refine_to_data(
    module: torch.nn.Module,
    weight: Tensor,
    moment: Tensor,
    settings: DataFitSettings = DataFitSettings(),
    *,
    seed: int = 0,
    progress: Optional["ProgressFn"] = None,
) -> tuple[int, list[float]]:
    """Refine ``module``'s parameters in place to minimise the output error on ``moment``.

    Parameters
    ----------
    module : Factorization
        A fitted format (its parameters are the variables; ``module.reconstruct()`` must be differentiable
        in them). It is refined in float64 and cast back to its dtype afterwards.
    weight : Tensor
        The dense ``W (M, N)`` it approximates.
    moment : Tensor
        ``C (N, N)``, the second moment of the calibration inputs; ``settings.ridge`` is added.
    settings : DataFitSettings
        Optimizer, iteration cap, ridge, learning rate.
    seed : int
        Seeds torch's RNG inside a forked RNG state (the optimizers themselves are deterministic).
    progress : callable, optional
        ``progress(iteration, iterations, loss)`` after each step, ``loss`` the relative output error.

    Returns
    -------
    iterations : int
        Steps taken.
    curve : list of float
        Relative output error ``√loss`` on ``moment`` (with the ridge) after each step; the parameters end
        at the best point of the curve.
    """
    dtype, device = next(module.parameters()).dtype, next(module.parameters()).device
    factor = whitening_factor(moment.cpu(), settings.ridge).to(device)  # may refuse the moment: before any change
    parameters = [p for p in module.parameters()]
    flags = [p.requires_grad for p in parameters]
    module.double()
    target = weight.detach().to(device, torch.float64)
    projected = target @ factor
    scale = float((projected * projected).sum())
    scale = scale if scale > 0 else 1.0

    def loss() -> Tensor:
        residual = projected - module.reconstruct() @ factor
        return (residual * residual).sum() / scale

    best = (float("inf"), [p.detach().clone() for p in parameters])
    curve: list[float] = []
    try:
        best = (float(loss().detach()), best[1])
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(seed)
            for p in parameters:
                p.requires_grad_(True)
            best = _optimize(parameters, loss, settings, best, curve, progress)
    finally:
        with torch.no_grad():
            for p, value, flag in zip(parameters, best[1], flags):
                p.copy_(value)
                p.requires_grad_(flag)
        module.to(dtype)
    return len(curve), curve


def _optimize(
    parameters: list[Tensor],
    loss: Callable[[], Tensor],
    settings: DataFitSettings,
    best: tuple[float, list[Tensor]],
    curve: list[float],
    progress: Optional["ProgressFn"],
) -> tuple[float, list[Tensor]]:
    """The optimizer loop; returns the best ``(loss, parameter values)`` seen."""
    adam = torch.optim.Adam(parameters, lr=settings.lr)
    lbfgs = torch.optim.LBFGS(parameters, lr=1.0, max_iter=1, history_size=20, line_search_fn="strong_wolfe")
    warmup = {"adam": settings.iterations, "lbfgs": 0, "auto": min(WARMUP_STEPS, settings.iterations // 3)}
    switch = warmup[settings.optimizer]

    def closure() -> Tensor:
        adam.zero_grad(set_to_none=True)
        value = loss()
        value.backward()
        return value

    stall = 0
    for step in range(1, settings.iterations + 1):
        optimizer = adam if step <= switch else lbfgs
        optimizer.zero_grad(set_to_none=True)
        optimizer.step(closure)
        with torch.no_grad():
            value = float(loss())
        if not math.isfinite(value):
            break
        curve.append(math.sqrt(max(value, 0.0)))
        if progress is not None:
            progress(step, settings.iterations, curve[-1])
        if value < best[0] * (1 - 1e-9):
            best, stall = (value, [p.detach().clone() for p in parameters]), 0
        else:
            stall += 1
        if stall >= 20 and step > switch:  # no progress for 20 steps (L-BFGS converged, or Adam oscillating at its lr)
            break
    return best
