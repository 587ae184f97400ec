"""The contract every registered format keeps, checked for each entry of ``formats.FORMATS``.

Format-specific behaviour (exact recovery of a structured weight, the papers' counts, rank rules, ALS and
Adam behaviour) is tested in the format's own file.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kcompress.errors import KCompressError
from kcompress.formats import FORMATS, Factorization, KCPOptions, TreeOptions, build, compression_formats, get_format
from tests.conftest import trained_like

#: small matrices: (rows, cols, order for factored formats)
SHAPES = [(16, 12, 3), (40, 24, 2)]
RANK = 2
#: options that keep the slow fits short (test time only; every other option at its default)
QUICK = {"adtn": {"steps": 3}, "kcp": {"max_iterations": 20}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def fitted(cls: type[Factorization], rows: int, cols: int, order: int, seed: int = 0) -> Factorization:
    tz = cls.default_tensorization(rows, cols, order if cls.factored else None)
    return cls.fit(trained_like(rows, cols), tz, RANK, seed=seed, **QUICK.get(cls.name, {}))


def measured_macs(module: Factorization, x: torch.Tensor) -> float:
    """Multiply-accumulates per vector that torch actually runs in ``module.multiply(x)`` (eval mode)."""
    module.eval().multiply(x)  # caches are filled before counting
    with FlopCounterMode(display=False) as counter:
        module.multiply(x)
    return counter.get_total_flops() / 2 / x.shape[0]


FORMAT_CLASSES = pytest.mark.parametrize("cls", list(FORMATS.values()), ids=list(FORMATS))


@FORMAT_CLASSES
@pytest.mark.parametrize("rows, cols, order", SHAPES)
def test_multiply_and_reconstruct_agree_with_the_dense_product(cls, rows: int, cols: int, order: int) -> None:
    module = fitted(cls, rows, cols, order)
    weight = trained_like(rows, cols)
    x = torch.randn(2, 3, cols)
    out = module.multiply(x)
    assert out.shape == (2, 3, rows) and module(x).shape == (2, 3, rows)
    assert relative(out, x @ module.reconstruct().T) < 1e-5
    assert module.reconstruct().shape == (rows, cols)
    assert module.fit_info.relative_error == pytest.approx(relative(module.reconstruct(), weight), rel=1e-4, abs=1e-7)
    assert len(module.fit_info.error_curve) >= 1 and module.fit_info.seconds >= 0


@FORMAT_CLASSES
@pytest.mark.parametrize("rows, cols, order", SHAPES)
def test_closed_form_counts_match_the_module(cls, rows: int, cols: int, order: int) -> None:
    module = fitted(cls, rows, cols, order)
    tz, rank = module.tensorization, module.rank
    assert module.num_params() == cls.param_count(tz, rank) == sum(p.numel() for p in module.parameters())
    assert module.macs_per_vector() == cls.macs(tz, rank) == cls.macs(tz, rank, module.options)
    assert measured_macs(module, torch.randn(5, cols)) == module.macs_per_vector()


@FORMAT_CLASSES
def test_config_round_trips_through_build(cls) -> None:
    module = fitted(cls, 40, 24, 2)
    config = json.loads(json.dumps(module.config()))
    rebuilt = build(config)
    rebuilt.load_state_dict(module.state_dict())
    assert type(rebuilt) is cls and rebuilt.rank == module.rank and rebuilt.options == module.options
    assert rebuilt.tensorization == module.tensorization
    x = torch.randn(3, 24)
    assert torch.equal(rebuilt.eval().multiply(x), module.eval().multiply(x))
    assert get_format(cls.name.upper()) is cls


@FORMAT_CLASSES
def test_options_are_typed_and_unknown_keys_refused(cls) -> None:
    tz = cls.default_tensorization(16, 12, 3 if cls.factored else None)
    defaults = cls.options_type()
    assert cls.options_type.from_dict(defaults.to_dict()) == defaults == cls(tz, RANK).options
    for old, new in cls.options_type.renamed.items():
        assert cls.options_type.from_dict({old: getattr(defaults, new)}) == defaults
    with pytest.raises(KCompressError, match=f"unknown {cls.name} options 'no_such_option'; allowed") as error:
        cls(tz, RANK, no_such_option=1)
    assert "\n" not in str(error.value)
    rank, options = cls.check(tz, RANK)
    assert rank == cls(tz, RANK).rank and options == defaults
    assert cls(tz, RANK, defaults).options is defaults
    other = next(o for o in (KCPOptions(), TreeOptions()) if type(o) is not cls.options_type)
    with pytest.raises(KCompressError, match=f"{cls.name} takes {cls.options_type.__name__}"):
        cls(tz, RANK, other)


@FORMAT_CLASSES
def test_same_seed_same_factors(cls) -> None:
    first, second = (fitted(cls, 16, 12, 3, seed=5) for _ in range(2))
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)


@FORMAT_CLASSES
def test_gradients_reach_every_parameter(cls) -> None:
    module = fitted(cls, 16, 12, 3).train()
    module.multiply(torch.randn(4, 12)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize("cls", [cls for cls in FORMATS.values() if cls.exact_at_max_rank], ids=lambda c: c.name)
def test_exact_at_max_rank_where_promised(cls) -> None:
    weight = trained_like(24, 20)
    tz = cls.default_tensorization(24, 20, 3 if cls.factored else None)
    module = cls.fit(weight, tz, cls.max_rank(tz))
    assert module.fit_info.relative_error < 1e-6
    assert relative(module.multiply(torch.eye(20)), weight.T) < 1e-5


@FORMAT_CLASSES
def test_bad_weights_are_refused(cls) -> None:
    tz = cls.default_tensorization(16, 12, 3 if cls.factored else None)
    with pytest.raises(KCompressError, match="does not match"):
        cls.fit(torch.randn(12, 16), tz, RANK)
    bad = torch.randn(16, 12)
    bad[0, 0] = math.nan
    with pytest.raises(KCompressError, match="NaN"):
        cls.fit(bad, tz, RANK)


def test_registry() -> None:
    assert set(compression_formats()) == {name for name, cls in FORMATS.items() if cls.compresses}
    assert [name for name, cls in FORMATS.items() if not cls.compresses] == ["dense"]
    with pytest.raises(KCompressError, match="choose one of"):
        get_format("nope")
