"""Data-aware fitting of one matrix: match what the matrix computes on real inputs, not the raw weight.

For a matrix ``W (M, N)`` whose inputs ``x`` have the second moment ``C = E[x xᵀ] (N, N)``, the output
error of an approximation ``Ŵ`` is ``tr(E C Eᵀ) / tr(W C Wᵀ)`` with ``E = W − Ŵ``; its square root is
``‖(W − Ŵ) Xᵀ‖_F / ‖W Xᵀ‖_F`` over the calibration inputs ``X``. Only ``C`` is needed, never ``X``. With
row weights ``d (M,)`` (how much each output row moves the layer's state, :mod:`kcompress.calibration.gate_sensitivity`)
both traces weight row ``i`` by ``d_i``: ``tr(D E C Eᵀ) / tr(D W C Wᵀ)``, ``D = diag(d)``.

:func:`refine_to_data` minimises it over a format's own parameters through its differentiable
``reconstruct()`` (every tensor format); :func:`whitened_svd` is the closed-form optimum at rank ``r``
(used by ``svd``). ``Factorization.fit_to_data`` runs either and keeps the result only when it lowers the
error on a held-out second moment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

from kcompress.errors import KCompressError

#: progress callback: ``(iteration, max_iterations, relative_error)``; called during fits
ProgressFn = Callable[[int, int, float], None]
OPTIMIZERS = ("auto", "lbfgs", "adam")
#: eigenvalues of the (ridged) second moment below this fraction of the largest are dropped from the
#: whitening of :func:`whitened_svd` (their directions carry no output energy)
EIGEN_CUTOFF = 1e-12
#: :func:`refine_to_data` optimises in this dtype (its loss is normalised to 1 at ``Ŵ = 0``)
WORK_DTYPE = torch.float32
#: refinement stops once the best loss fell by less than ``STOP_TOLERANCE`` (relative) over the last
#: ``STOP_WINDOW`` steps
STOP_WINDOW = 10
STOP_TOLERANCE = 1e-3
#: L-BFGS function evaluations per step at most (its strong Wolfe line search's budget)
LINE_SEARCH_EVALUATIONS = 25
#: a refinement takes at most as many steps as this many multiply-adds of its loss's product ``E C`` (``M·N²``
#: each) allow: 12 at hidden 512 (a few seconds per matrix), 96 at hidden 256, no cap at hidden 128 (774)
WORK_BUDGET = 6.5e9
#: ... but never fewer steps than this (hidden 1024 would get 1; 5 there cost about as much as 12 at 512)
MIN_BUDGETED_STEPS = 5


@dataclass(frozen=True)
class DataFitSettings:
    """How a matrix is fitted to data.

    ``ridge``: ``C + ridge·tr(C)/N·I`` is fitted (stabilises rank-deficient inputs and keeps the weight
    from drifting along directions the data never excites; 1, the inputs' mean energy per direction, had
    the best held-out agreement with the dense model among 0.01-10 on the JapaneseVowels models); ``optimizer``: ``"lbfgs"`` (strong Wolfe line
    search), ``"adam"``, or ``"auto"`` (L-BFGS: with its full line search it does not stall at the plain fit's start,
    and a 100-step Adam warm-up before it measured no better on JapaneseVowels); ``iterations``:
    the cap (optimizer steps, also limited by :data:`WORK_BUDGET`; the stopping rule of :func:`refine_to_data`
    usually ends sooner); ``lr``: Adam's
    learning rate (L-BFGS uses 1 with its line search); ``weighted_rows``: weight the output rows by the row
    weights handed to the fit (False: every row alike, whatever is handed).
    """

    ridge: float = 1.0
    optimizer: str = "auto"
    iterations: int = 300
    lr: float = 1e-2
    weighted_rows: bool = True

    def __post_init__(self) -> None:
        if not (self.ridge >= 0 and math.isfinite(self.ridge)):
            raise KCompressError(f"ridge must be a finite number >= 0, got {self.ridge!r}")
        if self.optimizer not in OPTIMIZERS:
            raise KCompressError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            raise KCompressError(f"iterations must be an integer >= 0, got {self.iterations!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise KCompressError(f"lr must be positive, got {self.lr!r}")
        if not isinstance(self.weighted_rows, bool):
            raise KCompressError(f"weighted_rows must be True or False, got {self.weighted_rows!r}")


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


def output_error(weight: Tensor, approximation: Tensor, moment: Tensor, row_weights: Optional[Tensor] = None) -> float:
    """``√(tr(D E C Eᵀ) / tr(D W C Wᵀ))`` with ``E = weight − approximation (M, N)``, ``C = moment (N, N)`` and
    ``D = diag(row_weights (M,))`` (identity when None); float64; 0 when ``tr(D W C Wᵀ)`` is 0 and the error is 0."""
    return OutputErrors(weight, moment, row_weights)(approximation)


class OutputErrors:
    """:func:`output_error` of any number of approximations of one ``weight (M, N)`` on one ``moment (N, N)``:
    ``reference = tr(D W C Wᵀ)`` computed once, then one product ``E C`` per approximation (float64)."""

    def __init__(self, weight: Tensor, moment: Tensor, row_weights: Optional[Tensor] = None) -> None:
        self.weight = weight.detach().to("cpu", torch.float64)
        self.moment = moment.to("cpu", torch.float64)
        self.rows = _row_column(row_weights, self.weight.shape[0], torch.float64, torch.device("cpu"))
        self.reference = float(((self.weight @ self.moment) * self.weight * self.rows).sum().clamp_min(0))

    def __call__(self, approximation: Tensor) -> float:
        """The relative output error of ``approximation (M, N)``."""
        error = self.weight - approximation.detach().to("cpu", torch.float64)
        num = float(((error @ self.moment) * error * self.rows).sum().clamp_min(0))
        return math.sqrt(num / self.reference) if self.reference > 0 else math.sqrt(num)


def _row_column(row_weights: Optional[Tensor], rows: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``row_weights`` as a ``(M, 1)`` column (ones when None)."""
    if row_weights is None:
        return torch.ones(rows, 1, dtype=dtype, device=device)
    if row_weights.shape != (rows,):
        raise KCompressError(f"row weights of shape {tuple(row_weights.shape)} do not match {rows} output rows")
    return row_weights.detach().to(device, dtype).reshape(rows, 1)


def same_shapes(state: Mapping[str, Tensor], other: Mapping[str, Tensor]) -> bool:
    """Whether two state dicts hold the same names with the same shapes (one can be loaded into the other)."""
    return state.keys() == other.keys() and all(state[name].shape == other[name].shape for name in state)


def budgeted(settings: DataFitSettings, shape: tuple[int, ...]) -> DataFitSettings:
    """``settings`` with at most the steps :data:`WORK_BUDGET` allows a ``(M, N)`` matrix (at least
    :data:`MIN_BUDGETED_STEPS`, at most ``settings.iterations``)."""
    rows, columns = shape
    allowed = max(MIN_BUDGETED_STEPS, int(WORK_BUDGET // (rows * columns**2)))
    return replace(settings, iterations=min(settings.iterations, allowed))


def ridged(moment: Tensor, ridge: float) -> Tensor:
    """``C + ridge·tr(C)/N·I`` in float64."""
    moment = moment.double()
    size = moment.shape[0]
    return moment + (ridge * float(torch.trace(moment)) / max(size, 1)) * torch.eye(size, dtype=torch.float64)


def whitened_svd(weight: Tensor, moment: Tensor, rank: int, ridge: float = 0.0,
                 row_weights: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The rank-``rank`` ``Ŵ = U V`` minimising ``tr(D (W − Ŵ) C (W − Ŵ)ᵀ)`` for ``C = moment + ridge``.

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
    row_weights : Tensor, optional
        ``d (M,)``, positive: ``D = diag(d)`` (identity when None).

    Returns
    -------
    left, right : Tensor
        ``(M, r)`` and ``(r, N)`` float64 with ``Ŵ = left @ right``: the truncated SVD of ``D^{1/2} W S`` for
        ``S = C^{1/2}`` (symmetric root by ``eigh``, negative eigenvalues clipped to 0), the right factor
        multiplied back by ``S^{-1}`` and the left by ``D^{-1/2}``, the singular values split evenly between
        the factors (optimal: ``Ŵ ↦ D^{1/2} Ŵ S`` keeps the rank).
    """
    values, vectors = torch.linalg.eigh(ridged(moment, ridge))
    values = values.clamp_min(0)
    keep = values > values.max() * EIGEN_CUTOFF if values.max() > 0 else values > 0
    root = values.sqrt()
    inverse_root = torch.where(keep, 1.0 / torch.where(keep, root, torch.ones_like(root)), 0.0)
    whiten = (vectors * root) @ vectors.T
    unwhiten = (vectors * inverse_root) @ vectors.T
    rows = _row_column(row_weights, weight.shape[0], torch.float64, torch.device("cpu")).sqrt()
    u, s, vh = torch.linalg.svd(rows * weight.double() @ whiten, full_matrices=False)
    half = s[:rank].sqrt()
    return u[:, :rank] * half / rows, (half[:, None] * vh[:rank]) @ unwhiten


class OutputLoss:
    """``tr(D E C_r Eᵀ) / tr(D W C_r Wᵀ)`` as a differentiable function of ``Ŵ (M, N)``, with ``E = W − Ŵ``,
    ``C_r = C + λI`` (:func:`ridged`) and ``D`` the diagonal of the row weights (identity without), evaluated
    in :data:`WORK_DTYPE` (``tr(D W C_r Wᵀ)`` in float64).

    One product ``E C_r`` (``M·N²`` multiply-adds) gives both the loss and its gradient
    ``−2 D E C_r / tr(D W C_r Wᵀ)``.
    """

    def __init__(self, weight: Tensor, moment: Tensor, ridge: float, device: torch.device,
                 row_weights: Optional[Tensor] = None) -> None:
        ridged_moment = ridged(moment.to("cpu"), ridge)
        weight = weight.detach().to("cpu", torch.float64)
        rows = _row_column(row_weights, weight.shape[0], torch.float64, torch.device("cpu"))
        scale = float(((weight @ ridged_moment) * weight * rows).sum())
        self.scale = scale if scale > 0 else 1.0
        self.moment = ridged_moment.to(device, WORK_DTYPE)
        self.target = weight.to(device, WORK_DTYPE)
        self.rows = rows.to(device, WORK_DTYPE)

    def __call__(self, approximation: Tensor) -> Tensor:
        """The loss (a 0-dim tensor) for ``approximation = Ŵ (M, N)``, differentiable in it."""
        return _OutputLossFunction.apply(approximation, self)


class _OutputLossFunction(torch.autograd.Function):
    """:class:`OutputLoss` with the gradient from the forward pass's product (no second product)."""

    @staticmethod
    def forward(ctx: Any, approximation: Tensor, loss: OutputLoss) -> Tensor:  # type: ignore[override]
        error = loss.target - approximation
        product = (error @ loss.moment) * loss.rows
        ctx.save_for_backward(product)
        ctx.scale = loss.scale
        return (error * product).sum() / loss.scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (product,) = ctx.saved_tensors
        return product * (grad * (-2.0 / ctx.scale)), None


class _Best:
    """The lowest loss seen and the parameter values where it was seen."""

    def __init__(self, parameters: list[Tensor]) -> None:
        self.value = float("inf")
        self.values = [p.detach().clone() for p in parameters]

    def offer(self, value: float, parameters: list[Tensor]) -> None:
        if value < self.value:
            self.value, self.values = value, [p.detach().clone() for p in parameters]

    def restore(self, parameters: list[Tensor]) -> None:
        with torch.no_grad():
            for p, value in zip(parameters, self.values):
                p.copy_(value)


def refine_to_data(
    module: torch.nn.Module,
    weight: Tensor,
    moment: Tensor,
    settings: DataFitSettings = DataFitSettings(),
    *,
    seed: int = 0,
    progress: Optional["ProgressFn"] = None,
    row_weights: Optional[Tensor] = None,
) -> tuple[int, list[float]]:
    """Refine ``module``'s parameters in place to minimise the output error on ``moment``.

    Parameters
    ----------
    module : Factorization
        A fitted format (its parameters are the variables; ``module.reconstruct()`` must be differentiable
        in them). It is refined in :data:`WORK_DTYPE` and cast back to its dtype afterwards.
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
    row_weights : Tensor, optional
        ``d (M,)``: each output row's weight in the error (see :class:`OutputLoss`).

    Returns
    -------
    iterations : int
        Steps taken.
    curve : list of float
        Relative output error ``√loss`` on ``moment`` (with the ridge) of the best point seen after each
        step; the parameters end at that point (never worse than where they started).
    """
    dtype, device = next(module.parameters()).dtype, next(module.parameters()).device
    objective = OutputLoss(weight, moment, settings.ridge, device, row_weights)
    parameters: list[Tensor] = [p for p in module.parameters()]
    flags = [p.requires_grad for p in parameters]
    best = _Best(parameters)
    curve: list[float] = []
    module.to(WORK_DTYPE)
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(seed)
            for p in parameters:
                p.requires_grad_(True)
            _optimize(parameters, lambda: objective(module.reconstruct()), budgeted(settings, weight.shape), best,  # type: ignore[operator]  # nn.Module attrs typed Tensor | Module
                      curve, progress)
    finally:
        module.to(dtype)
        best.restore(parameters)
        for p, flag in zip(parameters, flags):
            p.grad = None
            p.requires_grad_(flag)
    return len(curve), curve


def _optimize(
    parameters: list[Tensor],
    loss: Callable[[], Tensor],
    settings: DataFitSettings,
    best: _Best,
    curve: list[float],
    progress: Optional["ProgressFn"],
) -> None:
    """The optimizer loop: Adam for ``"adam"``, else L-BFGS, until the best loss fell by less than
    :data:`STOP_TOLERANCE` over the last :data:`STOP_WINDOW` steps. Every evaluation goes through one closure
    that offers its point to ``best`` (no step needs an extra evaluation) and answers L-BFGS's re-evaluation of
    the point its previous step accepted from memory."""
    if settings.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(parameters, lr=settings.lr)
    else:
        optimizer = torch.optim.LBFGS(parameters, lr=1.0, max_iter=1, max_eval=1 + LINE_SEARCH_EVALUATIONS,
                                      history_size=20, line_search_fn="strong_wolfe")
    last: dict[str, Any] = {}

    def closure() -> Tensor:
        if last and all(torch.equal(p, q) for p, q in zip(parameters, last["point"])):
            for p, gradient in zip(parameters, last["grads"]):
                p.grad = gradient.clone()
            return last["value"]
        for p in parameters:
            p.grad = None
        value = loss()
        value.backward()
        best.offer(float(value.detach()), parameters)
        last.update(point=[p.detach().clone() for p in parameters], value=value.detach(),
                    grads=[torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in parameters])
        return value

    for step in range(1, settings.iterations + 1):
        optimizer.step(closure)  # type: ignore[arg-type]  # torch stubs type the closure as returning float
        if not math.isfinite(float(last["value"])):
            break
        curve.append(math.sqrt(max(best.value, 0.0)))
        if progress is not None:
            progress(step, settings.iterations, curve[-1])
        earlier = curve[-1 - STOP_WINDOW] ** 2 if step > STOP_WINDOW else math.inf
        if earlier - best.value <= STOP_TOLERANCE * best.value:
            break
