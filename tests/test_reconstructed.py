"""ReconstructedLSTM: the compressed LSTM's function through torch's fused kernel, for fast fine-tuning."""

import pytest
import torch
from torch import nn

from kcompress import compress
from kcompress.nn import ReconstructedLSTM


def test_same_outputs_as_the_compressed_layer_and_gradients_reach_the_factors() -> None:
    dense = nn.LSTM(24, 16, batch_first=True)
    compressed, _ = compress(dense, "kcp", rank=3, targets="ih,hh", check_speed=False)
    fast = ReconstructedLSTM(compressed)
    x = torch.randn(3, 7, 24)
    state = (torch.randn(1, 3, 16), torch.randn(1, 3, 16))
    expected, (h, c) = compressed(x, state)
    got, (h_fast, c_fast) = fast(x, state)
    for a, b in ((got, expected), (h_fast, h), (c_fast, c)):
        assert torch.allclose(a, b, atol=1e-5)
    got.square().sum().backward()
    factors = [p for name, p in compressed.named_parameters() if name.startswith("matrices.")]
    assert factors and all(p.grad is not None and p.grad.abs().sum() > 0 for p in factors)
    assert not list(fast._template[0].parameters())[0].requires_grad


def test_refuses_layers_it_cannot_run() -> None:
    compressed, _ = compress(nn.LSTM(8, 4, num_layers=2), "svd", rank=2, check_speed=False)
    with pytest.raises(ValueError, match="one unidirectional batch-first layer"):
        ReconstructedLSTM(compressed)
