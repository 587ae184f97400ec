"""What a convolution's kernel matrix multiplies: the patches of its input (the im2col view), streamed.

The kernel ``(C_out, C_in, *k)`` is the matrix ``(C_out, C_in·k)`` (:mod:`kcompress.nn.conv`), and each
output position multiplies one patch of the padded input, so the matrix's second moment is ``E[p pᵀ]`` over
every patch of every sample. A batch's unfold holds ``k`` copies of its input; :func:`patch_rows` unfolds a
few samples at a time, so at most :data:`PATCH_BUDGET_BYTES` of patches (as float64, as they are summed)
exist at once, whatever the batch.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

from torch import Tensor

from kcompress.nn.conv import output_shape, padded, patches, reversed_padding

#: most bytes of float64 patches unfolded at once (one sample at least)
PATCH_BUDGET_BYTES = 32 * 2**20


def patch_rows(module: Any, input: Tensor, budget: int = PATCH_BUDGET_BYTES) -> Iterator[Tensor]:
    """Patch rows ``(n, C_in·k)`` of a dense ``nn.Conv1d``/``nn.Conv2d`` (``module``) called on ``input``
    ``(B, C_in, *spatial)`` or unbatched ``(C_in, *spatial)``: padded as the module pads (``padding``,
    ``padding_mode``), in chunks of samples whose patches take at most ``budget`` bytes as float64."""
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    x = input if input.dim() == len(kernel) + 2 else input.unsqueeze(0)
    x = padded(x, reversed_padding(module.padding, kernel, dilation), module.padding_mode)
    per_sample = math.prod(output_shape(x.shape[2:], kernel, stride, dilation)) * x.shape[1] * math.prod(kernel) * 8
    chunk = max(1, budget // max(1, per_sample))
    for start in range(0, x.shape[0], chunk):
        columns, _ = patches(x[start : start + chunk], kernel, stride, dilation)
        yield columns.reshape(-1, columns.shape[-1])
