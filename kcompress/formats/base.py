"""The one interface every weight format implements.

A format is a small ``nn.Module`` holding the factors of one ``(M, N)`` matrix as ``nn.Parameter``s, so
layers, fine-tuning and ``state_dict`` need no special cases. Layers and the converter use only what is
defined here and never ask which format they hold.

Subclasses implement ``_allocate`` (parameters of the right shapes), ``_fit`` (fill them from a dense
matrix), ``_multiply`` (``(B, N') -> (B, M')`` on padded sizes, never building W), ``_reconstruct``
(padded dense matrix, for tests and inspection), and the closed forms ``param_count``, ``max_rank`` and
``macs``. A format with options declares them as a :class:`~.options.FormatOptions` dataclass
(``options_type``) and its checks of modes, rank and options together in :meth:`Factorization.check`, so
planning and ``inspect`` validate and count without building modules.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from kcompress._threads import fit_threads
from kcompress.errors import KCompressError
from kcompress.formats.data_fit import (
    DataFitInfo,
    DataFitSettings,
    OutputErrors,
    ProgressFn,
    refine_to_data,
    same_shapes,
)
from kcompress.formats.options import FormatOptions
from kcompress.formats.tensorize import Tensorization, choose_tensorization

Rank = Union[int, Sequence[int]]
#: format options as given: the format's options object, a dict of key -> value, or None (defaults)
OptionsLike = Union[FormatOptions, Mapping[str, Any], None]


@dataclass
class FitInfo:
    """What a fit did. ``relative_error`` is ``‖W − Ŵ‖_F / ‖W‖_F`` computed explicitly in float64."""

    relative_error: float
    seconds: float
    iterations: int = 0
    error_curve: list[float] = field(default_factory=list)
    #: ``‖W‖_F`` of the fitted matrix (combines the errors of stacked blocks exactly)
    reference_norm: float = 0.0


class Factorization(nn.Module):
    """Base class of every format: a factorized ``(M, N)`` matrix acting as ``x -> x @ W.T``."""

    name: ClassVar[str] = ""
    #: one line for ``kcompress inspect`` and the docs
    summary: ClassVar[str] = ""
    #: False for formats that keep the matrix unfactored (order 1: no modes, no padding)
    factored: ClassVar[bool] = True
    #: False for the format that keeps the matrix as it is (``dense``): not a compression format
    compresses: ClassVar[bool] = True
    #: True where a fit at :meth:`max_rank` represents every matrix exactly (svd, tt, ht, dense)
    exact_at_max_rank: ClassVar[bool] = False
    #: the format's options (:mod:`kcompress.formats.options`); the base has none
    options_type: ClassVar[type[FormatOptions]] = FormatOptions

    def __init__(self, tensorization: Tensorization, rank: Rank, options: OptionsLike = None, **keywords: Any) -> None:
        """An unfitted module; ``options`` (an ``options_type``, a dict, or None) and ``keywords`` (single
        options, overriding ``options``) are checked with modes and rank by :meth:`check`."""
        super().__init__()
        self.tensorization = tensorization
        self.rank, self.options = self.check(tensorization, rank, _merged(options, keywords))
        self.fit_info: Optional[FitInfo] = None
        self._allocate()

    # ----------------------------------------------------------------- to implement in each format
    def _allocate(self) -> None:
        """Create the factor parameters (uninitialised) for ``self.tensorization`` and ``self.rank``."""
        raise NotImplementedError

    def _fit(self, weight: Tensor, seed: int, progress: Optional[ProgressFn]) -> tuple[int, list[float]]:
        """Fill the parameters from the padded float64 ``weight`` (M', N'); return (iterations, error curve)."""
        raise NotImplementedError

    def _multiply(self, x: Tensor) -> Tensor:
        """``(B, N') -> (B, M')`` with the factors only."""
        raise NotImplementedError

    def _reconstruct(self) -> Tensor:
        """Padded dense matrix ``(M', N')``."""
        raise NotImplementedError

    @classmethod
    def param_count(cls, tensorization: Tensorization, rank: Rank) -> int:
        """Number of stored values for this shape and rank (closed form)."""
        raise NotImplementedError

    @classmethod
    def max_rank(cls, tensorization: Tensorization) -> int:
        """Largest rank that makes sense: exact representation (svd, tt, ht) or no larger than dense (kcp)."""
        raise NotImplementedError

    @classmethod
    def macs(cls, tensorization: Tensorization, rank: Rank, options: Optional[FormatOptions] = None) -> int:
        """Multiply-accumulates of :meth:`multiply` for one input vector (closed form; ``options`` where the
        format's multiplication depends on them, defaults when None)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- shared behaviour
    @classmethod
    def check(cls, tensorization: Tensorization, rank: Rank, options: OptionsLike = None) -> tuple[Any, FormatOptions]:
        """``(normalized rank, typed options)``, or the one-line :class:`KCompressError` that building the
        module would raise. Formats with checks of modes, rank and options together extend this."""
        rank = cls.normalize_rank(tensorization, rank)
        if type(options) is cls.options_type:
            return rank, options
        if isinstance(options, FormatOptions):
            raise KCompressError(f"{cls.name} takes {cls.options_type.__name__}, got {type(options).__name__}")
        return rank, cls.options_type.from_dict(options, owner=cls.name)

    def macs_per_vector(self) -> int:
        """Multiply-accumulates of :meth:`multiply` for one input vector (:meth:`macs`)."""
        return self.macs(self.tensorization, self.rank, self.options)

    @classmethod
    def normalize_rank(cls, tensorization: Tensorization, rank: Rank) -> Any:
        """Validate ``rank``; formats with per-bond ranks override this. Returns a JSON-able value."""
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise KCompressError(f"{cls.name} takes one integer rank, got {rank!r}")
        if rank <= 0:
            raise KCompressError(f"rank must be a positive integer, got {rank}")
        return rank

    @classmethod
    def default_tensorization(
        cls,
        out_features: int,
        in_features: int,
        order: Optional[int] = None,
        out_modes: Optional[Sequence[int]] = None,
        in_modes: Optional[Sequence[int]] = None,
        out_group: int = 1,
    ) -> Tensorization:
        """Mode shapes this format uses for an ``(out_features, in_features)`` matrix."""
        if not cls.factored:
            return Tensorization(out_features, in_features, (out_features,), (in_features,))
        return choose_tensorization(out_features, in_features, order, out_modes, in_modes, out_group)

    @classmethod
    def clamp_rank(cls, tensorization: Tensorization, rank: Rank) -> Any:
        """``rank`` limited to :meth:`max_rank` (per bond where ranks are lists)."""
        limit = cls.max_rank(tensorization)
        if isinstance(rank, int):
            return min(rank, limit)
        return [min(int(r), limit) for r in rank]

    @classmethod
    def rank_for_ratio(cls, tensorization: Tensorization, ratio: float) -> int:
        """Largest uniform rank whose parameter count is at most ``M·N / ratio``."""
        if not ratio > 0:
            raise KCompressError(f"compression ratio must be positive, got {ratio}")
        budget = tensorization.out_features * tensorization.in_features / ratio
        best = 0
        for rank in range(1, cls.max_rank(tensorization) + 1):
            if cls.param_count(tensorization, rank) > budget:
                break
            best = rank
        if best == 0:
            raise KCompressError(
                f"{cls.name}: even rank 1 ({cls.param_count(tensorization, 1)} parameters) is above "
                f"{budget:.0f} parameters (ratio {ratio:g}) for a {tensorization.out_features}x"
                f"{tensorization.in_features} matrix"
            )
        return best

    @classmethod
    def fit(
        cls,
        weight: Tensor,
        tensorization: Tensorization,
        rank: Rank,
        *,
        seed: int = 0,
        progress: Optional[ProgressFn] = None,
        options: OptionsLike = None,
        **keywords: Any,
    ) -> "Factorization":
        """Fit the factors to a dense ``weight`` of shape ``(M, N)``; parameters get ``weight``'s dtype.

        ``options`` and ``keywords`` as for the constructor. Numeric work runs in float64 on one torch and BLAS
        thread, the caller's settings restored after (see :mod:`kcompress._threads`).
        """
        expected = (tensorization.out_features, tensorization.in_features)
        if tuple(weight.shape) != expected:
            raise KCompressError(f"weight of shape {tuple(weight.shape)} does not match the modes' {expected}")
        dense = weight.detach().to("cpu", torch.float64)
        if not torch.isfinite(dense).all():
            raise KCompressError("weight contains NaN or Inf values")
        module = cls(tensorization, rank, options, **keywords)
        start = time.perf_counter()
        with fit_threads(), torch.no_grad():
            module.double()
            if bool((dense == 0).all()):  # nothing to fit (and ALS on it is singular): zero factors are exact
                for parameter in module.parameters():
                    parameter.zero_()
                iterations, curve = 0, [0.0]
            else:
                iterations, curve = module._fit(tensorization.pad_weight(dense), seed, progress)
            error = relative_error(dense, module.reconstruct())
        module.to(dtype=weight.dtype if weight.is_floating_point() else torch.float32, device=weight.device)
        norm = float(torch.linalg.norm(dense))
        module.fit_info = FitInfo(error, time.perf_counter() - start, iterations, curve, norm)
        return module

    # ----------------------------------------------------------------- data-aware fitting
    def fit_to_data(
        self,
        weight: Tensor,
        moment: Tensor,
        holdout: Tensor,
        settings: DataFitSettings = DataFitSettings(),
        *,
        seed: int = 0,
        progress: Optional[ProgressFn] = None,
        start: Optional[nn.Module] = None,
        row_weights: Optional[Tensor] = None,
    ) -> DataFitInfo:
        """Refit this (already fitted) module in place so that it matches ``weight (M, N)`` on inputs whose
        second moment is ``moment (N, N)``; kept only if the output error on ``holdout (N, N)`` (the second
        moment of held-out inputs) goes down, else the plain fit is restored. ``start``: a module of the same
        structure (e.g. this matrix's fit at another ridge) whose parameters the refinement starts from
        instead of the plain fit's; ignored when its parameter shapes differ. ``row_weights (M,)``: each output
        row's weight in every error (fitted and reported; see :class:`~kcompress.formats.data_fit.OutputLoss`),
        unless ``settings.weighted_rows`` is False.
        See :mod:`kcompress.formats.data_fit`; formats with a closed form override :meth:`_fit_to_data`."""
        begin = time.perf_counter()
        weight = weight.detach().to("cpu", torch.float64)
        row_weights = row_weights if settings.weighted_rows else None
        snapshot = {name: value.detach().clone() for name, value in self.state_dict().items()}
        plain = self.reconstruct().detach()
        on_holdout, on_fit = OutputErrors(weight, holdout, row_weights), OutputErrors(weight, moment, row_weights)
        before, fit_before = on_holdout(plain), on_fit(plain)
        if start is not None and same_shapes(start.state_dict(), snapshot):
            self.load_state_dict(start.state_dict())
        with fit_threads():
            method, iterations = self._fit_to_data(weight, moment.double(), settings, seed, progress, row_weights)
        fitted = self.reconstruct().detach()
        after, fit_after = on_holdout(fitted), on_fit(fitted)
        kept = after < before
        if not kept:
            self.load_state_dict(snapshot)
            after, fit_after = before, fit_before
        return DataFitInfo(before, after, fit_before, fit_after, kept, method, iterations,
                           time.perf_counter() - begin, on_holdout.reference)

    def _fit_to_data(
        self, weight: Tensor, moment: Tensor, settings: DataFitSettings, seed: int, progress: Optional[ProgressFn],
        row_weights: Optional[Tensor],
    ) -> tuple[str, int]:
        """Minimise the (row-weighted) output error on ``moment`` from the current parameters; ``(method,
        iterations)``. The default refines the parameters by gradient
        (:func:`~kcompress.formats.data_fit.refine_to_data`)."""
        iterations, _ = refine_to_data(self, weight, moment, settings, seed=seed, progress=progress,
                                       row_weights=row_weights)
        return settings.optimizer, iterations

    def forward(self, x: Tensor) -> Tensor:
        """Same as :meth:`multiply`."""
        return self.multiply(x)

    def multiply(self, x: Tensor) -> Tensor:
        """``y = x @ W.T`` for ``x`` of shape ``(..., N)`` -> ``(..., M)``, never building ``W``."""
        tz = self.tensorization
        leading = x.shape[:-1]
        flat = tz.pad_input(x.reshape(-1, x.shape[-1]))
        out = tz.crop_output(self._multiply(flat))
        return out.reshape(leading + (tz.out_features,))

    def reconstruct(self) -> Tensor:
        """Dense ``(M, N)`` matrix (tests and inspection; layers never call it to multiply)."""
        return self.tensorization.crop_weight(self._reconstruct())

    def rows(self, index: Tensor) -> Tensor:
        """Rows ``index`` (integers in ``[0, M)``, any shape) of ``W``: ``index.shape + (N,)``, gathered from
        the factors where the format can (``_rows``) and from the reconstruction otherwise."""
        tz = self.tensorization
        flat = index.reshape(-1)
        digits = mixed_radix(flat, tz.out_modes)
        return self._rows(flat, digits)[:, : tz.in_features].reshape(index.shape + (tz.in_features,))

    def _rows(self, index: Tensor, digits: Tensor) -> Tensor:
        """Padded rows ``(B, N')`` of ``index (B,)``, whose digits on the output modes are ``digits (B, d)``.
        The default builds ``W``; formats whose factors can be indexed override it."""
        return self._reconstruct()[index]

    def low_rank_factors(self) -> Optional[tuple[Tensor, Tensor]]:
        """``(U (M, r), V (r, N))`` with ``W = U V`` when the format is exactly such a product (a layer may then
        run it as two products, e.g. two convolutions); None for the others."""
        return None

    def num_params(self) -> int:
        return self.param_count(self.tensorization, self.rank)

    def config(self) -> dict[str, Any]:
        """JSON-able description from which :func:`kcompress.formats.build` recreates the module."""
        return {
            "format": self.name,
            "tensorization": self.tensorization.to_dict(),
            "rank": self.rank,
            "options": self.options.to_dict(),
        }

    def extra_repr(self) -> str:
        tz = self.tensorization
        return f"{tz.out_features}x{tz.in_features}, modes={tz.describe()}, rank={self.rank}"


def relative_error(reference: Tensor, approximation: Tensor) -> float:
    """``‖reference − approximation‖_F / ‖reference‖_F`` in float64 (0 for an all-zero reference)."""
    reference = reference.detach().double()
    norm = torch.linalg.norm(reference)
    diff = torch.linalg.norm(reference - approximation.detach().double())
    return float(diff / norm) if norm > 0 else float(diff)


def dense_macs(tensorization: Tensorization) -> int:
    """MACs of the dense product ``W x`` for one vector."""
    return tensorization.out_features * tensorization.in_features


def _merged(options: OptionsLike, keywords: Mapping[str, Any]) -> OptionsLike:
    """``options`` with single ``keywords`` on top (``options`` itself when there are none)."""
    if not keywords:
        return options
    if isinstance(options, FormatOptions):
        return {**options.to_dict(), **{options.renamed.get(key, key): value for key, value in keywords.items()}}
    return {**dict(options or {}), **keywords}


def mixed_radix(index: Tensor, modes: Sequence[int]) -> Tensor:
    """Digits ``(B, d)`` of ``index (B,)`` in the radices ``modes``, mode 1 the most significant."""
    digits = []
    for size in reversed(modes):
        digits.append(index % size)
        index = torch.div(index, size, rounding_mode="floor")
    return torch.stack(digits[::-1], dim=1)


def prod(values: Sequence[int]) -> int:
    return math.prod(values)
