"""Drop-in ``nn.Conv1d`` / ``nn.Conv2d`` whose kernel is a matrix module (``matrices["weight"]``).

The kernel ``(out_channels, in_channels, *kernel_size)`` is compressed as the matrix
``(out_channels, in_channels·k)`` (``k`` the product of the kernel sizes), rows in torch's order: channel
first, then the kernel positions row-major, which is also the order of :func:`patches` (``F.unfold``'s). So
``y[:, :, p] = W · patch_p + b``, one matrix-vector product per output position ``p``.

Execution paths (the layer's paths, :mod:`kcompress.nn.execution`):

* ``materialized``: the reconstructed kernel through torch's convolution (``F.conv1d``/``F.conv2d``, as the
  dense module calls it): the kernel is cached as every materialized weight.
* ``factorized``: a format that is a product of two factors (``matrix.low_rank_factors()``: SVD's
  ``U (M, r)``, ``V (r, N)``) runs as two convolutions, ``V`` reshaped as an ``r``-channel kernel with the
  layer's stride, padding and dilation, then ``U`` as a 1x1 convolution with the bias: ``r·(N + M)`` MACs per
  output position instead of ``M·N``. Any other format multiplies the unfolded patches (im2col) with its
  factors (:func:`kcompress.nn.execution.chunked_multiply`).

``padding_mode`` (``zeros``, ``reflect``, ``replicate``, ``circular``), string paddings (``"same"``,
``"valid"``), stride and dilation behave as torch's; ``groups`` must be 1 (grouped and depthwise
convolutions are refused with one line).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kcompress.errors import KCompressError
from kcompress.nn.base import CompressedLayer
from kcompress.nn.execution import chunked_multiply, tracing

#: output positions per spatial dimension of the input the planner times a layer on (``example_input``)
PROBE_POSITIONS = {1: 128, 2: 16}
_CONV: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d}


def reversed_padding(padding: Union[str, Sequence[int]], kernel_size: Sequence[int],
                     dilation: Sequence[int]) -> list[int]:
    """``F.pad``'s amounts (last dimension first, ``[left, right, top, bottom]``) for a convolution's
    ``padding``, as torch's ``_ConvNd`` computes ``_reversed_padding_repeated_twice`` (``"same"``: the extra
    position of an odd total goes to the right)."""
    if isinstance(padding, str):
        amounts = [0, 0] * len(kernel_size)
        if padding == "same":
            for i, (d, k) in enumerate(zip(reversed(dilation), reversed(kernel_size))):
                total = d * (k - 1)
                amounts[2 * i : 2 * i + 2] = [total // 2, total - total // 2]
        return amounts
    return [p for p in reversed(padding) for _ in range(2)]


def padded(x: Tensor, amounts: Sequence[int], padding_mode: str) -> Tensor:
    """``x (B, C, *spatial)`` padded by ``amounts`` (:func:`reversed_padding`) the way ``padding_mode`` says."""
    if not any(amounts):
        return x
    return F.pad(x, list(amounts), mode="constant" if padding_mode == "zeros" else padding_mode)


def output_shape(spatial: Sequence[int], kernel_size: Sequence[int], stride: Sequence[int],
                 dilation: Sequence[int]) -> tuple[int, ...]:
    """The output's spatial shape for an already padded input of spatial shape ``spatial``."""
    return tuple((size - d * (k - 1) - 1) // s + 1 for size, k, s, d in zip(spatial, kernel_size, stride, dilation))


def patches(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int],
            dilation: Sequence[int]) -> tuple[Tensor, tuple[int, ...]]:
    """The patches (im2col) of an already padded ``x (B, C, *spatial)``: ``(B, L, C·k)`` with ``L`` output
    positions, and the output's spatial shape. 1-D inputs are unfolded as images of height 1."""
    spatial = output_shape(x.shape[2:], kernel_size, stride, dilation)
    if len(kernel_size) == 1:
        x, kernel_size, stride, dilation = x.unsqueeze(2), (1, *kernel_size), (1, *stride), (1, *dilation)
    columns = F.unfold(x, tuple(kernel_size), dilation=tuple(dilation), stride=tuple(stride))
    return columns.transpose(1, 2), spatial


class CompressedConv(CompressedLayer):
    """Base of :class:`CompressedConv1d` and :class:`CompressedConv2d`: ``input (B, C_in, *spatial)`` or
    unbatched ``(C_in, *spatial)`` -> ``(B, C_out, *spatial_out)``, as the torch module."""

    dims: ClassVar[int]
    gates = 1
    config_keys = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                   "bias", "padding_mode")
    #: set by ``__init__`` as torch's types (tuples), not the JSON-able config values (lists)
    attributes = ()

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: Union[str, tuple[int, ...]]
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    bias: Optional[nn.Parameter]

    def __init__(self, config: Mapping[str, Any], matrices: Mapping[str, nn.Module],
                 biases: Mapping[str, Optional[Tensor]]) -> None:
        super().__init__(config, matrices, biases)
        for key in ("in_channels", "out_channels", "groups", "padding_mode"):
            setattr(self, key, self._config[key])
        for key in ("kernel_size", "stride", "dilation"):
            setattr(self, key, tuple(self._config[key]))
        padding = self._config["padding"]
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self._amounts = reversed_padding(self.padding, self.kernel_size, self.dilation)
        self._shape = (self.out_channels, self.in_channels, *self.kernel_size)
        #: the cached weight and its kernel view (a view per call costs as much as a small convolution)
        self._view: tuple[Optional[Tensor], Optional[Tensor]] = (None, None)

    @classmethod
    def parameter_names(cls, config: Mapping[str, Any]) -> tuple[list[str], list[str]]:
        return ["weight"], ["bias"]

    @classmethod
    def dense_config(cls, dense: nn.Module) -> dict[str, Any]:
        """The constructor kwargs, JSON-able (tuples as lists); ``groups`` other than 1 is refused."""
        module: Any = dense  # Any: nn.Module attributes are typed Tensor | Module
        if module.groups != 1:
            kind = "depthwise" if module.groups == module.in_channels else "grouped"
            raise KCompressError(f"{type(dense).__name__}(groups={module.groups}) is a {kind} convolution; only "
                                 "groups=1 is compressed")
        config = super().dense_config(dense)
        config["bias"] = module.bias is not None
        return {key: list(value) if isinstance(value, tuple) else value for key, value in config.items()}

    @classmethod
    def dense_matrix(cls, dense: nn.Module, name: str) -> Tensor:
        """The kernel as the ``(out_channels, in_channels·k)`` matrix."""
        weight: Tensor = getattr(dense, name)
        return weight.reshape(weight.shape[0], -1)

    def kernel(self) -> Tensor:
        """The reconstructed kernel ``(out_channels, in_channels, *kernel_size)`` (cached when materialized)."""
        weight = self.weight("weight")
        if weight.requires_grad or tracing():  # rebuilt on every call (training, tracing): nothing to keep
            return weight.view(self._shape)
        if weight is not self._view[0]:
            self._view = (weight, weight.view(self._shape))
        return self._view[1]  # type: ignore[return-value]  # set just above

    def forward(self, input: Tensor) -> Tensor:
        if self.materialized("weight"):
            return self._convolve(input, self.kernel(), self.bias)
        factors = self.matrices["weight"].low_rank_factors()  # type: ignore[operator]  # nn.Module attrs typed Tensor | Module
        if factors is not None:
            left, right = factors
            inner = self._convolve(input, right.view(-1, self.in_channels, *self.kernel_size), None)
            return _CONV[self.dims](inner, left.view(*left.shape, *(1,) * self.dims), self.bias)
        return self._unfolded(input)

    def _convolve(self, input: Tensor, kernel: Tensor, bias: Optional[Tensor]) -> Tensor:
        """torch's convolution with this layer's stride, padding, dilation and padding mode (as
        ``nn.Conv*._conv_forward``)."""
        conv = _CONV[self.dims]
        if self.padding_mode != "zeros":
            return conv(padded(input, self._amounts, self.padding_mode), kernel, bias, self.stride, 0, self.dilation)
        return conv(input, kernel, bias, self.stride, self.padding, self.dilation)

    def _unfolded(self, input: Tensor) -> Tensor:
        """The factorized product on the unfolded patches: ``(B, C_in, *spatial)`` -> ``(B, C_out, *out)``."""
        batched = input.dim() == self.dims + 2
        x = input if batched else input.unsqueeze(0)
        columns, spatial = patches(padded(x, self._amounts, self.padding_mode), self.kernel_size, self.stride,
                                   self.dilation)
        out = chunked_multiply(self.matrices["weight"], columns)
        if self.bias is not None:
            out = out + self.bias
        out = out.transpose(1, 2).reshape(x.shape[0], self.out_channels, *spatial)
        return out if batched else out.squeeze(0)

    def example_input(self, batch: int) -> Tensor:
        """Random input ``(batch, in_channels, *spatial)`` giving :data:`PROBE_POSITIONS` outputs per spatial
        dimension (the execution planner times the layer on it)."""
        reference = next(self.parameters())
        sizes = [s * PROBE_POSITIONS[self.dims] + d * (k - 1)
                 for k, s, d in zip(self.kernel_size, self.stride, self.dilation)]
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(batch, self.in_channels, *sizes, generator=generator)
        return x.to(reference.device, reference.dtype)


class CompressedConv1d(CompressedConv):
    """Drop-in ``nn.Conv1d``: ``(B, C_in, L)`` -> ``(B, C_out, L_out)``."""

    dense_type = nn.Conv1d
    dims = 1


class CompressedConv2d(CompressedConv):
    """Drop-in ``nn.Conv2d``: ``(B, C_in, H, W)`` -> ``(B, C_out, H_out, W_out)``."""

    dense_type = nn.Conv2d
    dims = 2
