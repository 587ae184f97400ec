"""ADTN: the weight is the output of a deep tensor network of 2x2x2x2 gates with activations between layers.

Qing, Li, Zhou, Ran, "Compressing Neural Networks Using Tensor Networks with Exponentially Fewer Variational
Parameters", arXiv 2305.06058 (Intelligent Computing 2025); structure as in
``docs/adtn.md``. The padded ``(2^a, 2^b)`` weight is a vector of ``2^Q`` entries (``Q = a + b`` binary
indices, row bits first, most significant first). Starting from the product state ``v^{⊗Q}`` with
``v = [1, 0]``, ``depth`` layers of ``Q − 1`` gates act on adjacent index pairs, with an activation ``σ``
between layers (none after the last), and a learned global scale multiplies the result::

    W = scale · reshape(𝓛^(depth) σ(… σ(𝓛^(1) v^{⊗Q})), (2^a, 2^b))

The common ``rank`` argument is the depth. Parameters: ``16 · depth · (Q − 1) + 1``. ADTN saves storage, not
compute: :meth:`ADTN.multiply` is a dense product with the decoded weight, cached in eval mode. Decoding and
the fit loop live in :mod:`kcompress.formats.adtn_fit`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kcompress.errors import KCompressError
from kcompress.formats import adtn_fit
from kcompress.formats.base import Factorization, OptionsLike, ProgressFn, Rank, dense_macs
from kcompress.formats.options import FormatOptions, option
from kcompress.formats.tensorize import Tensorization


def _identity(x: Tensor) -> Tensor:
    return x


#: activations allowed between layers (``leaky_relu`` uses torch's slope 0.01)
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "leaky_relu": F.leaky_relu,
    "tanh": torch.tanh,
    "identity": _identity,
}
PLACEMENTS = ("brick", "stair")
#: largest depth :meth:`ADTN.max_rank` allows (fewer when the gates would outnumber the dense entries)
MAX_DEPTH = 64


@dataclass(frozen=True)
class ADTNOptions(FormatOptions):
    """Options of ``adtn``.

    Attributes
    ----------
    activation : {'relu', 'leaky_relu', 'tanh', 'identity'}
        σ between gate layers.
    placement : {'brick', 'stair'}
        Gate order within a layer (:func:`gate_pairs`).
    optimizer : {'adam', 'lbfgs'}
        Adam with a cosine learning-rate schedule, or L-BFGS with a strong-Wolfe line search (it stalls near
        error 1 on the bundled example's weights, where Adam reaches 0.5-0.9: see docs/adtn.md).
    steps : int
        Most iterations of the fit.
    lr : float or None
        Learning rate (None: 1.0 for L-BFGS, 0.01 for Adam).
    target_error : float
        The fit stops once the relative error is at most this (earlier key ``tol``).
    patience : int
        The fit stops on a plateau: when the best error fell by less than ``plateau`` over this many iterations.
    plateau : float
        The smallest relative improvement over ``patience`` iterations that keeps the fit going.
    init_noise : float
        Standard deviation of the noise added to the identity gates at the start.
    decode_every_forward : bool
        Decode the weight on every multiply instead of caching it (no resident dense copy).
    """

    renamed: ClassVar[Mapping[str, str]] = {"tol": "target_error"}

    activation: str = option("relu", choices=tuple(ACTIVATIONS))
    placement: str = option("brick", choices=PLACEMENTS)
    optimizer: str = option("adam", choices=adtn_fit.OPTIMIZERS)
    steps: int = option(500, minimum=1)
    lr: Optional[float] = option(None, positive=True)
    target_error: float = option(1e-4, minimum=0)
    patience: int = option(20, minimum=1)
    plateau: float = option(1e-3, minimum=0)
    init_noise: float = option(0.01, minimum=0)
    decode_every_forward: bool = option(False)


def bits(size: int) -> int:
    """Smallest ``a`` with ``2^a >= size``."""
    return (size - 1).bit_length()


def binary_tensorization(out_features: int, in_features: int) -> Tensorization:
    """Modes ``(2,)*a x (2,)*b`` with minimal ``2^a >= M``, ``2^b >= N``, and ``a + b >= 2`` (one gate at least).

    The shorter tuple is filled with size-1 modes, since :class:`Tensorization` wants equal lengths.
    """
    a, b = bits(out_features), bits(in_features)
    while a + b < 2:
        a, b = (a + 1, b) if a <= b else (a, b + 1)
    length = max(a, b)
    return Tensorization(
        out_features, in_features, (2,) * a + (1,) * (length - a), (2,) * b + (1,) * (length - b)
    )


def gate_pairs(qubits: int, placement: str) -> list[int]:
    """First index ``q`` of each gate's pair ``(q, q+1)`` in one layer, in the order the gates act.

    ``brick``: pairs starting at even ``q`` (0-based), then at odd ``q``; ``stair``: ``q = 0 … Q−2``.
    Both give ``Q − 1`` gates.
    """
    if placement == "stair":
        return list(range(qubits - 1))
    return list(range(0, qubits - 1, 2)) + list(range(1, qubits - 1, 2))


class ADTN(Factorization):
    """ADTN weight: ``gates`` of shape ``(depth, Q−1, 2, 2, 2, 2)`` and a scalar ``scale``.

    ``rank`` is the depth ``M`` (number of gate layers). ``scale`` is a learned global factor, so a fit can match
    a trained weight of any norm (the gates alone rescale only through σ, and not at all with tanh). Gate ``gates[m, k]`` acts on the index pair
    ``(q, q+1)`` with ``q = gate_pairs(Q, placement)[k]``; its entries are ``(out_q, out_q+1, in_q, in_q+1)``.
    Options: :class:`ADTNOptions`.

    :meth:`multiply` uses the decoded dense weight: cached while the module is in eval mode or grad is off,
    decoded afresh (so autograd reaches the gates) in training mode with grad on, or always with
    ``decode_every_forward=True`` (no resident dense copy). The cache is keyed on the parameters' storage,
    version counters, dtype and device, so optimizer steps, ``load_state_dict``, ``copy_`` and ``.to()`` all
    invalidate it; ``train()``/``eval()`` clear it too. Only edits through ``.data`` go unseen (call
    :meth:`clear_cache`). :meth:`multiply` replaces the base one (the weight it caches is already cropped to
    ``(M, N)``: no padding, ``M·N`` MACs), so the padded-size ``_multiply`` hook is not implemented.
    """

    name = "adtn"
    summary = "ADTN, W = deep 2x2x2x2-gate tensor network with activations (Qing et al. 2305.06058), Adam fit"
    options_type = ADTNOptions
    options: ADTNOptions

    @classmethod
    def check(cls, tensorization: Tensorization, rank: Rank, options: OptionsLike = None) -> tuple[Any, ADTNOptions]:
        """Also: padded sizes that are powers of two, with at least 4 entries."""
        rank, checked = super().check(tensorization, rank, options)
        tz = tensorization
        if cls.qubits_of(tz) < 2:
            raise KCompressError(f"adtn needs at least 4 padded entries, got {tz.padded_out}x{tz.padded_in}")
        return rank, cast(ADTNOptions, checked)  # the base check returns an options_type instance

    def _allocate(self) -> None:
        tz = self.tensorization
        self.out_bits, self.in_bits = _exact_bits(tz.padded_out), _exact_bits(tz.padded_in)
        self.qubits = self.out_bits + self.in_bits
        self.pairs = gate_pairs(self.qubits, self.options.placement)
        self.layout = adtn_fit.windows(self.pairs)
        self.gates = nn.Parameter(torch.empty(self.rank, self.qubits - 1, 2, 2, 2, 2))
        self.scale = nn.Parameter(torch.empty(()))
        self._cache: Optional[tuple[tuple[Any, ...], Tensor]] = None
        self.reset_parameters(0)

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
        """Binary modes (:func:`binary_tensorization`); ``order`` and ``out_group`` do not apply.

        Explicit ``out_modes`` and ``in_modes`` are kept when both products are powers of two (checked when
        the module is built): only the padded sizes matter to ADTN.
        """
        if out_modes is not None and in_modes is not None:
            return Tensorization(out_features, in_features, tuple(out_modes), tuple(in_modes))
        return binary_tensorization(out_features, in_features)

    @classmethod
    def qubits_of(cls, tensorization: Tensorization) -> int:
        """``Q = log2(padded rows) + log2(padded columns)``."""
        return _exact_bits(tensorization.padded_out) + _exact_bits(tensorization.padded_in)

    @classmethod
    def param_count(cls, tensorization: Tensorization, rank: Rank) -> int:
        """``16 · depth · (Q − 1)`` gate entries plus the scale."""
        return 16 * cast(int, rank) * (cls.qubits_of(tensorization) - 1) + 1

    @classmethod
    def max_rank(cls, tensorization: Tensorization) -> int:
        """:data:`MAX_DEPTH`, or fewer so the parameters stay at most ``M·N`` (at least 1)."""
        per_layer = 16 * (cls.qubits_of(tensorization) - 1)
        within_dense = (dense_macs(tensorization) - 1) // per_layer
        return max(1, min(MAX_DEPTH, within_dense))

    @classmethod
    def macs(cls, tensorization: Tensorization, rank: Rank, options: Optional[FormatOptions] = None) -> int:
        """Dense ``M·N``: multiply runs on the decoded (cached) weight. Decoding is :meth:`decode_macs`."""
        return dense_macs(tensorization)

    def decode_macs(self) -> int:
        """MACs of one decode: per layer and window of ``w`` indices, ``2^Q · k`` for applying its merged operator
        (``k = 2^w``, or more where it is widened: :func:`adtn_fit.applied_size`) and ``4 · 4^w`` per merged gate
        for building it; plus ``2^Q`` for the scale."""
        per_layer = sum(2**self.qubits * adtn_fit.applied_size(w, self.qubits) + w.count * 4 * 4**w.bits
                        for w in self.layout)
        return self.rank * per_layer + 2**self.qubits

    def reset_parameters(self, seed: int) -> None:
        """Gates = identity + ``init_noise`` · N(0, 1) from a generator seeded with ``seed``; scale = 1."""
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(self.gates.shape, generator=generator, dtype=torch.float64)
        identity = torch.eye(4, dtype=torch.float64).reshape(2, 2, 2, 2)
        with torch.no_grad():
            self.gates.copy_(identity + self.options.init_noise * noise)
            self.scale.fill_(1.0)

    # ------------------------------------------------------------------ decoding
    def _reconstruct(self) -> Tensor:
        """Padded ``(2^a, 2^b)`` weight, differentiable in the gates and the scale."""
        return self._decode(self.gates, self.scale).reshape(2**self.out_bits, 2**self.in_bits)

    def _decode(self, gates: Tensor, scale: Tensor) -> Tensor:
        """The ``(2^Q,)`` decoded vector for these ``gates`` and ``scale`` (:func:`adtn_fit.decode`)."""
        activation = ACTIVATIONS[self.options.activation]
        return adtn_fit.decode(gates, scale, self.pairs, self.layout, activation)

    def multiply(self, x: Tensor) -> Tensor:
        """``(..., N) -> (..., M)``: ``x @ W.T`` with the decoded ``(M, N)`` weight (no padding, ``M·N`` MACs)."""
        fresh = self.options.decode_every_forward or (self.training and torch.is_grad_enabled())
        return F.linear(x, self.reconstruct() if fresh else self._cached_weight())

    def _cached_weight(self) -> Tensor:
        """Decoded ``(M, N)`` weight without autograd history, re-decoded when the parameters changed."""
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in (self.gates, self.scale))
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.reconstruct().contiguous())
        return self._cache[1]

    def clear_cache(self) -> None:
        """Drop the cached decoded weight (it is rebuilt on the next eval-mode multiply)."""
        self._cache = None

    def train(self, mode: bool = True) -> "ADTN":
        self.clear_cache()
        return super().train(mode)

    # ------------------------------------------------------------------ fitting
    def _fit(self, weight: Tensor, seed: int, progress: Optional[ProgressFn]) -> tuple[int, list[float]]:
        """Minimise ``‖scale·T − W‖/‖W‖`` from identity-plus-noise gates on float32 working copies (Adam or
        L-BFGS, :func:`adtn_fit.descend`); stops at ``target_error``, on a plateau or after ``steps`` iterations."""
        self.reset_parameters(seed)
        norm = torch.linalg.norm(weight)
        if norm == 0:
            self.scale.zero_()
            return 0, [0.0]
        self.scale.fill_(norm / torch.linalg.norm(self._reconstruct()))
        gates, scale = (p.detach().float().requires_grad_() for p in (self.gates, self.scale / norm))
        target = (weight / norm).float().reshape(-1)
        o = self.options
        with torch.enable_grad():
            result = adtn_fit.descend(
                [gates, scale], lambda: torch.linalg.norm(self._decode(gates, scale) - target),
                optimizer=o.optimizer, steps=o.steps, lr=o.lr, target_error=o.target_error, patience=o.patience,
                plateau=o.plateau, progress=progress,
            )
        self.gates.copy_(gates.detach())
        self.scale.copy_(scale.detach() * norm)
        return result

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, placement={self.options.placement}, activation={self.options.activation}"


def _exact_bits(size: int) -> int:
    """``log2(size)``; a clear error when ``size`` is not a power of two."""
    if size < 1 or size & (size - 1):
        raise KCompressError(f"adtn needs padded sizes that are powers of two, got {size}")
    return bits(size)
