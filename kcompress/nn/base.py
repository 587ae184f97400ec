"""What every compressed layer shares: matrices keyed by torch's parameter names, torch's bias parameters,
construction from the dense module (:meth:`CompressedLayer.from_dense`) and :meth:`CompressedLayer.layer_config`.

A *matrix module* is anything with ``multiply(x)``: ``(..., in) -> (..., out)`` and ``reconstruct()``
(a format's ``Factorization``, ``formats.Stack`` or ``formats.Dense``); the :data:`MatrixBuilder` handed
to ``from_dense`` decides the format. Each layer holds an execution paths, ``layer.execution``:
``{matrix name: "factorized" | "materialized"}`` (see :mod:`kcompress.nn.execution`), and multiplies only
through :meth:`CompressedLayer.product` / :meth:`CompressedLayer.weight`, never asking which format it holds.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping, Optional

from torch import Tensor, nn

from kcompress.errors import KCompressError
from kcompress.nn.execution import FACTORIZED, MATERIALIZED, WeightCache, check_mode, chunked_multiply, is_dense

#: ``(torch parameter name, dense weight (rows, cols), gates) -> matrix module``; gates is 4 for LSTM
#: matrices, 3 for GRU, 1 for Linear
MatrixBuilder = Callable[[str, Tensor, int], nn.Module]


class CompressedLayer(nn.Module):
    """Base of the drop-in layers. Subclasses name their torch class, gate count and parameter names.

    ``config`` holds the torch class's constructor kwargs; the keys listed in ``attributes`` become
    attributes of the same name (``input_size``, ``hidden_size``, …), as on the torch module.
    """

    dense_type: ClassVar[type[nn.Module]]
    gates: ClassVar[int]
    #: constructor kwargs of ``dense_type`` (read from the dense module by :meth:`dense_config`)
    config_keys: ClassVar[tuple[str, ...]]
    #: config keys that are also attributes of the layer
    attributes: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        config: Mapping[str, Any],
        matrices: Mapping[str, nn.Module],
        biases: Mapping[str, Optional[Tensor]],
    ) -> None:
        super().__init__()
        self._config = {key: config[key] for key in self.config_keys}
        for key in self.attributes:
            setattr(self, key, self._config[key])
        matrix_names, bias_names = self.parameter_names(self._config)
        _check_names("matrices", matrices, matrix_names)
        _check_names("biases", biases, bias_names)
        self.matrices = nn.ModuleDict({name: matrices[name] for name in matrix_names})
        for name in bias_names:
            bias = biases[name]
            self.register_parameter(name, None if bias is None else nn.Parameter(bias))
        self.execution: dict[str, str] = {}
        #: what was asked per matrix: a path, or ``"auto"`` where the planner chose it (stored in artifacts,
        #: so a file records the request and not a machine-dependent measurement)
        self.requested: dict[str, str] = {}
        self._weights = WeightCache()
        self.set_execution({name: FACTORIZED for name in matrix_names})

    def set_execution(self, paths: Mapping[str, str], requested: Optional[Mapping[str, str]] = None) -> None:
        """Set the path of the matrices named in ``paths`` (``"factorized"`` or ``"materialized"``); a
        ``formats.Dense`` matrix is always materialized. ``requested``: ``"auto"`` for the matrices whose
        path the planner chose (default: the path itself is what was asked)."""
        unknown = sorted(set(paths) - set(self.matrices))
        if unknown:
            raise KCompressError(f"{type(self).__name__} has no matrix {', '.join(unknown)}")
        for name, mode in paths.items():
            mode = check_mode(mode, name)
            self.execution[name] = MATERIALIZED if is_dense(self.matrices[name]) else mode
            self.requested[name] = (requested or {}).get(name, self.execution[name])
        self._weights.clear()

    @property
    def all_materialized(self) -> bool:
        return all(mode == MATERIALIZED for mode in self.execution.values())

    def materialized(self, name: str) -> bool:
        return self.execution[name] == MATERIALIZED

    def weight(self, name: str) -> Tensor:
        """The dense ``(M, N)`` weight of matrix ``name``: cached, or rebuilt differentiably while training."""
        return self._weights.get(name, self.matrices[name])

    def product(self, name: str, x: Tensor) -> Tensor:
        """``x @ W.T`` for ``x (..., N)`` on the matrix's planned path -> ``(..., M)``."""
        if self.materialized(name):
            return nn.functional.linear(x, self.weight(name))
        return chunked_multiply(self.matrices[name], x)

    @classmethod
    def parameter_names(cls, config: Mapping[str, Any]) -> tuple[list[str], list[str]]:
        """torch's ``(matrix names, bias names)`` for a module built with ``config``."""
        raise NotImplementedError

    @classmethod
    def dense_config(cls, dense: nn.Module) -> dict[str, Any]:
        """Constructor kwargs of ``dense`` (raises :class:`KCompressError` for unsupported options)."""
        return {key: getattr(dense, key) for key in cls.config_keys}

    @classmethod
    def dense_matrix(cls, dense: nn.Module, name: str) -> Tensor:
        """Matrix ``name`` of the dense module as the ``(M, N)`` matrix the format compresses (a convolution's
        kernel flattened, :mod:`kcompress.nn.conv`)."""
        weight: Tensor = getattr(dense, name)
        return weight

    @classmethod
    def from_dense(cls, dense: nn.Module, build: MatrixBuilder) -> "CompressedLayer":
        """The compressed layer whose matrices are ``build(name, weight, gates)``; biases are copied."""
        if not isinstance(dense, cls.dense_type):
            raise KCompressError(
                f"{cls.__name__}.from_dense needs an nn.{cls.dense_type.__name__}, got {type(dense).__name__}"
            )
        config = cls.dense_config(dense)
        matrix_names, bias_names = cls.parameter_names(config)
        matrices = {name: build(name, cls.dense_matrix(dense, name).detach(), cls.gates) for name in matrix_names}
        biases = {name: _copy(getattr(dense, name, None)) for name in bias_names}
        return cls(config, matrices, biases)

    def layer_config(self) -> dict[str, Any]:
        """``{"type": torch class name, "kwargs": its constructor kwargs, "execution": the paths as requested}``
        (``"auto"`` where the planner chose; see :func:`kcompress.nn.rebuild`)."""
        return {"type": self.dense_type.__name__, "kwargs": dict(self._config), "execution": dict(self.requested)}

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self._config.items())


def _copy(bias: Optional[Tensor]) -> Optional[Tensor]:
    return None if bias is None else bias.detach().clone()


def _check_names(what: str, given: Mapping[str, Any], expected: list[str]) -> None:
    if set(given) != set(expected):
        raise KCompressError(f"{what} must be named {sorted(expected)}, got {sorted(given)}")
