"""What every compressed layer shares: matrices keyed by torch's parameter names, torch's bias parameters,
construction from the dense module (:meth:`CompressedLayer.from_dense`) and :meth:`CompressedLayer.layer_config`.

A *matrix module* is anything with ``multiply(x)``: ``(..., in) -> (..., out)`` (a format's
``Factorization``, ``formats.Stack`` or ``formats.Dense``). Layers only ever call ``multiply``; the
:data:`MatrixBuilder` handed to ``from_dense`` decides the format.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping, Optional

from torch import Tensor, nn

from ..errors import KCompressError

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

    @classmethod
    def parameter_names(cls, config: Mapping[str, Any]) -> tuple[list[str], list[str]]:
        """torch's ``(matrix names, bias names)`` for a module built with ``config``."""
        raise NotImplementedError

    @classmethod
    def dense_config(cls, dense: nn.Module) -> dict[str, Any]:
        """Constructor kwargs of ``dense`` (raises :class:`KCompressError` for unsupported options)."""
        return {key: getattr(dense, key) for key in cls.config_keys}

    @classmethod
    def from_dense(cls, dense: nn.Module, build: MatrixBuilder) -> "CompressedLayer":
        """The compressed layer whose matrices are ``build(name, weight, gates)``; biases are copied."""
        if not isinstance(dense, cls.dense_type):
            raise KCompressError(
                f"{cls.__name__}.from_dense needs an nn.{cls.dense_type.__name__}, got {type(dense).__name__}"
            )
        config = cls.dense_config(dense)
        matrix_names, bias_names = cls.parameter_names(config)
        matrices = {name: build(name, getattr(dense, name).detach(), cls.gates) for name in matrix_names}
        biases = {name: _copy(getattr(dense, name, None)) for name in bias_names}
        return cls(config, matrices, biases)

    def layer_config(self) -> dict[str, Any]:
        """``{"type": torch class name, "kwargs": its constructor kwargs}`` (see :func:`kcompress.nn.rebuild`)."""
        return {"type": self.dense_type.__name__, "kwargs": dict(self._config)}

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self._config.items())


def _copy(bias: Optional[Tensor]) -> Optional[Tensor]:
    return None if bias is None else bias.detach().clone()


def _check_names(what: str, given: Mapping[str, Any], expected: list[str]) -> None:
    if set(given) != set(expected):
        raise KCompressError(f"{what} must be named {sorted(expected)}, got {sorted(given)}")
