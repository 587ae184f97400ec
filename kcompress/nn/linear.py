"""Drop-in ``nn.Linear`` whose weight is a matrix module (``weight``) and whose ``bias`` is torch's."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import Tensor, nn

from kcompress.nn.base import CompressedLayer


class CompressedLinear(CompressedLayer):
    """``y = W x + b`` with ``W = matrices["weight"]``: ``(..., in_features) -> (..., out_features)``."""

    dense_type = nn.Linear
    gates = 1
    config_keys = ("in_features", "out_features", "bias")
    attributes = ("in_features", "out_features")

    in_features: int
    out_features: int
    bias: Optional[nn.Parameter]

    @classmethod
    def parameter_names(cls, config: Mapping[str, Any]) -> tuple[list[str], list[str]]:
        return ["weight"], ["bias"]

    @classmethod
    def dense_config(cls, dense: nn.Module) -> dict[str, Any]:
        return {"in_features": dense.in_features, "out_features": dense.out_features, "bias": dense.bias is not None}

    def forward(self, input: Tensor) -> Tensor:
        if self.materialized("weight"):
            return nn.functional.linear(input, self.weight("weight"), self.bias)
        out = self.product("weight", input)
        return out if self.bias is None else out + self.bias
