"""The KCP GEMM chain (``algorithm="chain"``): exact against ``x @ W.T``, gradients, and when ``auto`` takes it."""

import pytest
import torch

from kcompress.errors import KCompressError
from kcompress.formats.kcp import KCP
from kcompress.formats.kcp_chain import GemmChain, chain_suits
from kcompress.formats.kcp_contraction import best_contraction, kcp_step_costs
from kcompress.formats.tensorize import Tensorization, choose_tensorization
from tests.formats.test_kcp import relative

PAPER = Tensorization(1024, 57600, (16, 4, 4, 4), (8, 20, 20, 18))
#: (out_features, in_features, out_modes, in_modes): 2 to 5 modes, with and without padding
SHAPES = [
    (12, 20, (3, 4), (4, 5)),
    (4 * 32, 48, (16, 2, 4), (3, 4, 4)),
    (4 * 131, 97, (16, 6, 6), (4, 5, 5)),
    (1000, 960, (4, 4, 4, 16), (4, 10, 6, 4)),
    (96, 90, (2, 3, 2, 2, 4), (3, 2, 5, 3, 1)),
]


def random_kcp(tz: Tensorization, rank: int, dtype: torch.dtype = torch.float32, **options: object) -> KCP:
    module = KCP(tz, rank, **options).to(dtype)
    with torch.no_grad():
        for factor in module.factors:
            factor.normal_()
    return module


@pytest.mark.parametrize("rows, cols, out_modes, in_modes", SHAPES)
@pytest.mark.parametrize("rank", [1, 3, 8])
@pytest.mark.parametrize("batch", [1, 7])
def test_chain_equals_dense_product(rows: int, cols: int, out_modes: tuple, in_modes: tuple, rank: int,
                                    batch: int) -> None:
    module = random_kcp(Tensorization(rows, cols, out_modes, in_modes), rank, algorithm="chain")
    assert isinstance(module.contraction, GemmChain) and module.algorithm_for(batch) == "chain"
    x = torch.randn(batch, 2, cols)
    with torch.no_grad():
        out = module.multiply(x)
        assert out.shape == (batch, 2, rows)
        assert relative(out, x @ module.reconstruct().T) < 1e-5


def test_chain_is_exact_in_float64() -> None:
    module = random_kcp(Tensorization(1000, 960, (4, 4, 4, 16), (4, 10, 6, 4)), 5, torch.float64, algorithm="chain")
    x = torch.randn(9, 960, dtype=torch.float64)
    with torch.no_grad():
        assert relative(module.multiply(x), x @ module.reconstruct().T) < 1e-12


@pytest.mark.parametrize("rows, cols, out_modes, in_modes", SHAPES[1:4])
def test_chain_gradients_match_the_dense_products(rows: int, cols: int, out_modes: tuple, in_modes: tuple) -> None:
    tz = Tensorization(rows, cols, out_modes, in_modes)
    module = random_kcp(tz, 4, algorithm="chain")
    x = torch.randn(6, cols, requires_grad=True)
    upstream = torch.randn(6, rows)
    (module.multiply(x) * upstream).sum().backward()
    chain_grads = [x.grad.clone()] + [factor.grad.clone() for factor in module.factors]
    x.grad = None
    module.zero_grad()
    (x @ module.reconstruct().T * upstream).sum().backward()  # W rebuilt differentiably from the factors
    dense_grads = [x.grad] + [factor.grad for factor in module.factors]
    for chain, dense in zip(chain_grads, dense_grads):
        assert relative(chain, dense) < 1e-5


def test_chunked_batches_and_per_rank_run_the_chain_exactly() -> None:
    module = random_kcp(PAPER, 8)
    per_rank = random_kcp(PAPER, 8, algorithm="per_rank")
    per_rank.load_state_dict(module.state_dict())
    assert module.algorithm_for(40) == "chain" and module._chunk_rows("chain") < 40
    assert isinstance(per_rank.contraction, GemmChain) and per_rank.algorithm_for(40) == "per_rank"
    x = torch.randn(40, 57600)
    with torch.no_grad():
        dense = x @ module.reconstruct().T
        assert relative(module.multiply(x), dense) < 1e-5
        assert relative(per_rank.multiply(x), dense) < 1e-5


def test_chain_macs_and_plan_interface() -> None:
    chain = GemmChain.for_tensorization(PAPER)
    assert chain.order == (3, 2, 1, 0)
    assert chain.macs() == kcp_step_costs(PAPER, chain.order)[0] == 300_032
    assert KCP(PAPER, 8).macs_per_vector() == 8 * 300_032  # 1/24.6 of the dense 58,982,400
    assert chain.elements_per_vector(8) == 57600 + 8 * 12800  # the first step: the input and every rank's output
    assert chain.cost() > chain.macs()


def test_auto_takes_the_chain_where_it_suits() -> None:
    assert isinstance(KCP(PAPER, 8).contraction, GemmChain)
    for hidden in (128, 256, 512, 1024):  # the LSTM(H, H) matrices of bench_exec's grid
        tz = KCP.default_tensorization(4 * hidden, hidden, out_group=4)
        assert isinstance(KCP(tz, 4).contraction, GemmChain), tz
    gates_last = Tensorization(1024, 57600, (4, 4, 4, 16), (8, 20, 20, 18))  # the chain's order costs 2.4x the MACs
    wide = Tensorization(1024, 512, (256, 4), (2, 256))  # equal MACs, but a 256-wide mode
    for tz in (gates_last, wide):
        assert not chain_suits(tz, None, kcp_step_costs(tz, best_contraction(tz).order)[0])
        assert KCP(tz, 4).algorithm_for(16) == "rank_batch"
    assert KCP(PAPER, 8, algorithm="rank_batch").algorithm_for(16) == "rank_batch"


def test_mode_order_selects_or_excludes_the_chain() -> None:
    assert isinstance(KCP(PAPER, 2, mode_order=[3, 2, 1, 0]).contraction, GemmChain)
    assert KCP(PAPER, 2, mode_order=[1, 2, 3, 0]).contraction.order == (1, 2, 3, 0)
    with pytest.raises(KCompressError, match="chain"):
        KCP(PAPER, 2, algorithm="chain", mode_order=[1, 2, 3, 0])


class Product(torch.nn.Module):
    def __init__(self, matrix: KCP) -> None:
        super().__init__()
        self.matrix = matrix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matrix.multiply(x)


def test_chain_traces_for_other_batch_sizes() -> None:
    module = random_kcp(choose_tensorization(4 * 64, 96, order=3, out_group=4), 3, algorithm="chain")
    x = torch.randn(5, 96)
    with torch.no_grad():
        traced = torch.jit.trace(Product(module), (x,))
        other = torch.randn(11, 96)
        assert relative(traced(other), other @ module.reconstruct().T) < 1e-5
