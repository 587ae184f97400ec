"""The data-aware refinement's objective, optimizer loop and warm start (kcompress.formats.data_fit)."""

from __future__ import annotations

import pytest
import torch

from kcompress.formats import DataFitSettings, data_fit, get_format, output_error, whitened_svd
from kcompress.tuning.agreement import best_index


def _moment(size: int, rank: int, seed: int) -> torch.Tensor:
    """A second moment of ``rank`` correlated directions (rank-deficient when ``rank < size``)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(400, rank, generator=generator, dtype=torch.float64)
    inputs = inputs @ (torch.randn(rank, size, generator=generator, dtype=torch.float64) * torch.logspace(0, -1, size))
    return inputs.T @ inputs / len(inputs)


@pytest.mark.parametrize("rank", [3, 16])  # inputs spanning 3 of 16 directions, or all
@pytest.mark.parametrize("ridge", [0.0, 0.5])
@pytest.mark.parametrize("weighted", [False, True])  # with row weights: tr(D E C Eᵀ) / tr(D W C Wᵀ)
def test_output_loss_and_its_gradient_match_the_dense_expression(rank: int, ridge: float, weighted: bool) -> None:
    weight = torch.randn(24, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    approximation = weight + 0.3 * torch.randn(24, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    moment = _moment(16, rank, 2)
    rows = torch.logspace(-1, 1, 24, dtype=torch.float64) if weighted else None
    column = torch.ones(24, 1, dtype=torch.float64) if rows is None else rows[:, None]
    loss = data_fit.OutputLoss(weight, moment, ridge, torch.device("cpu"), rows)
    variable = approximation.float().requires_grad_(True)
    value = loss(variable)
    value.backward()
    ridged = data_fit.ridged(moment, ridge)
    assert float(value.detach()) == pytest.approx(output_error(weight, approximation, ridged, rows) ** 2, rel=1e-5)
    reference = approximation.clone().requires_grad_(True)
    error = weight - reference
    (((error @ ridged) * error * column).sum() / ((weight @ ridged) * weight * column).sum()).backward()
    assert variable.grad is not None and reference.grad is not None
    assert torch.allclose(variable.grad.double(), reference.grad, rtol=1e-4, atol=1e-6 * float(reference.grad.abs().max()))


def test_float32_refinement_reaches_the_closed_form_optimum() -> None:
    """Gradient refinement of an svd module (float32 work) ends at the whitened SVD's output error."""
    weight = torch.randn(20, 16, generator=torch.Generator().manual_seed(3))
    moment = _moment(16, 16, 4)
    fmt = get_format("svd")
    tz = fmt.default_tensorization(20, 16)
    module = fmt.fit(weight, tz, 4)
    before = output_error(weight, module.reconstruct(), moment)
    iterations, curve = data_fit.refine_to_data(module, weight, moment, DataFitSettings(ridge=0.0, optimizer="lbfgs"))
    left, right = whitened_svd(weight, moment, 4)
    optimum = output_error(weight, left @ right, moment)
    reached = output_error(weight, module.reconstruct(), moment)
    assert optimum < before and reached == pytest.approx(optimum, rel=2e-3)
    assert module.left.dtype == torch.float32 and module.left.grad is None
    assert curve == sorted(curve, reverse=True)  # the best point seen, never worse
    assert 1 <= iterations < 300 and len(curve) == iterations  # stopped by the relative-improvement rule
    assert curve[-1] == pytest.approx(reached, rel=1e-4)


def test_a_refinement_that_cannot_improve_stops_early_and_keeps_the_start() -> None:
    weight = torch.randn(16, 16, generator=torch.Generator().manual_seed(5))
    moment = _moment(16, 16, 6)
    fmt = get_format("tt")
    tz = fmt.default_tensorization(16, 16)
    module = fmt.fit(weight, tz, fmt.max_rank(tz))  # exact: nothing left to gain
    start = [p.detach().clone() for p in module.parameters()]
    iterations, _ = data_fit.refine_to_data(module, weight, moment, DataFitSettings(optimizer="adam"))
    assert iterations <= data_fit.STOP_WINDOW + 1
    for value, parameter in zip(start, module.parameters()):
        assert torch.equal(value, parameter)


def test_warm_start_from_another_ridge() -> None:
    """``start`` loads another fit's parameters first; the plain fit stays the reference that is kept or
    restored, and a start of other shapes is ignored."""
    weight = torch.randn(16, 16, generator=torch.Generator().manual_seed(7))
    moment, holdout = _moment(16, 16, 8), _moment(16, 16, 9)
    fmt = get_format("tt")
    tz = fmt.default_tensorization(16, 16)
    first = fmt.fit(weight, tz, 2)
    first.fit_to_data(weight, moment, holdout, DataFitSettings(ridge=1.0, iterations=40))
    plain = fmt.fit(weight, tz, 2)
    warm = fmt.fit(weight, tz, 2)
    info = warm.fit_to_data(weight, moment, holdout, DataFitSettings(ridge=0.1, iterations=0), start=first)
    assert info.before == pytest.approx(output_error(weight, plain.reconstruct(), holdout), rel=1e-6)
    assert info.kept  # no iterations: the start itself, which beats the plain fit on the held-out moment
    assert torch.equal(warm.reconstruct(), first.reconstruct())
    other = fmt.fit(weight, tz, 3)
    ignored = other.fit_to_data(weight, moment, holdout, DataFitSettings(ridge=0.1, iterations=0), start=first)
    assert not ignored.kept and ignored.after == ignored.before


def test_ridge_auto_collects_dense_statistics_once_and_warm_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ridge="auto"``: the dense model's statistics serve all three ridges and the finishing pass, each matrix's
    refinement after the first ridge starts from its fit at the previous ridge, the later ridges are screened, and
    the screened winner cut short is refined on at its ridge (a fourth candidate)."""
    import warnings

    from kcompress import compress
    from kcompress.calibration import run as calibrated
    from kcompress.formats.base import Factorization
    from kcompress.io.models import SequenceClassifier
    from kcompress.tuning.data import SequenceData

    made: list[str] = []
    starts: list[bool] = []
    caps: list[int] = []

    class Counting(calibrated.Calibrator):
        def __init__(self, *args: object, **kwargs: object) -> None:
            made.append("calibrator")
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    original = Factorization.fit_to_data

    def spy(self: Factorization, *args: object, **kwargs: object) -> object:
        starts.append(kwargs.get("start") is not None)
        caps.append(args[3].iterations)  # type: ignore[attr-defined]
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(calibrated, "Calibrator", Counting)
    monkeypatch.setattr(Factorization, "fit_to_data", spy)
    torch.manual_seed(0)
    model = SequenceClassifier(6, 8, 3)
    data = SequenceData(torch.randn(24, 5, 6), torch.zeros(24, dtype=torch.long), torch.full((24,), 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, report = compress(model, "tt", ratio=2, targets="ih,hh", check_speed=False, calibration=data,
                             allocate="uniform", calibrate_options={"iterations": 2 * calibrated.SCREEN_ITERATIONS, "ridge": "auto",
                                                "gate_weights": True})
    candidates = report.calibration["fit_candidates"]
    assert made == ["calibrator"]  # also for a finishing pass
    assert [(c["ridge"], c["screened"]) for c in candidates[:3]] == [(1.0, False), (0.1, True), (0.01, True)]
    assert starts == [False, False] + [True] * 2 * (len(candidates) - 1)  # ih and hh per candidate
    best = candidates[best_index(candidates[:3])]
    assert best["screened"]  # here ridge 0.1, cut short at SCREEN_ITERATIONS steps: refined on from there
    assert len(candidates) == 4 and (candidates[3]["ridge"], candidates[3]["screened"]) == (best["ridge"], False)
    steps, screened = 2 * calibrated.SCREEN_ITERATIONS, calibrated.SCREEN_ITERATIONS  # the finish: the rest
    assert caps == [steps] * 2 + [screened] * 4 + [steps - screened] * 2
    assert report.calibration["ridge"] == candidates[best_index(candidates)]["ridge"]


def test_each_plain_fit_runs_once_and_gives_the_result_of_refitting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every candidate ridge refines a copy of the one plain fit of each matrix: the same model as refitting it."""
    import warnings

    from kcompress import compress
    from kcompress.calibration import run as calibrated
    from kcompress.formats.base import Factorization
    from kcompress.io.models import SequenceClassifier
    from kcompress.tuning.data import SequenceData

    torch.manual_seed(0)
    model = SequenceClassifier(6, 8, 3)
    data = SequenceData(torch.randn(24, 5, 6), torch.zeros(24, dtype=torch.long), torch.full((24,), 5))
    fits: list[str] = []
    original = Factorization.fit.__func__  # type: ignore[attr-defined]

    def counted(cls: type, *args: object, **kwargs: object) -> object:
        fits.append(cls.__name__)
        return original(cls, *args, **kwargs)

    def compressed() -> dict[str, torch.Tensor]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result, report = compress(model, "kcp", ratio=2, targets="ih,hh", check_speed=False, calibration=data,
                                      allocate="uniform", calibrate_options={"iterations": 10, "gate_weights": True})
        assert len(report.calibration["fit_candidates"]) >= 3
        return result.state_dict()

    monkeypatch.setattr(Factorization, "fit", classmethod(counted))
    once = compressed()
    assert fits == ["KCP", "KCP"]  # ih and hh, for all ridges
    monkeypatch.setattr(calibrated.CalibrationRun, "plain_fit", lambda self, name, fit: fit())
    refitted = compressed()
    assert len(fits) > 2 and once.keys() == refitted.keys()
    assert all(torch.equal(once[name], refitted[name]) for name in once)


def test_the_work_budget_caps_the_steps_of_large_matrices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert data_fit.budgeted(DataFitSettings(), (2048, 512)).iterations == int(data_fit.WORK_BUDGET // (2048 * 512**2))
    assert data_fit.budgeted(DataFitSettings(), (256, 64)).iterations == 300  # small: the cap as given
    assert data_fit.budgeted(DataFitSettings(iterations=0), (256, 64)).iterations == 0
    assert data_fit.budgeted(DataFitSettings(), (4096, 1024)).iterations == data_fit.MIN_BUDGETED_STEPS  # the floor
    monkeypatch.setattr(data_fit, "WORK_BUDGET", 7 * 20 * 16**2)  # seven steps of a (20, 16) matrix
    weight = torch.randn(20, 16, generator=torch.Generator().manual_seed(7))
    fmt = get_format("svd")
    module = fmt.fit(weight, fmt.default_tensorization(20, 16), 4)
    iterations, curve = data_fit.refine_to_data(module, weight, _moment(16, 16, 8), DataFitSettings(ridge=0.0))
    assert iterations == len(curve) == 7


@pytest.mark.parametrize("weighted", [False, True])
def test_output_errors_match_the_dense_traces(weighted: bool) -> None:
    """``OutputErrors``: ``tr(D W C Wᵀ)`` once, then ``√(tr(D E C Eᵀ) / tr(D W C Wᵀ))`` per approximation."""
    generator = torch.Generator().manual_seed(9)
    weight = torch.randn(12, 10, generator=generator, dtype=torch.float64)
    moment = _moment(10, 4, 10)
    rows = torch.rand(12, generator=generator, dtype=torch.float64) + 0.5 if weighted else None
    d = torch.diag(rows) if rows is not None else torch.eye(12, dtype=torch.float64)
    errors = data_fit.OutputErrors(weight, moment, rows)
    assert errors.reference == pytest.approx(float(torch.trace(d @ weight @ moment @ weight.T)), rel=1e-12)
    for scale in (0.0, 0.1, 1.0):
        approximation = weight + scale * torch.randn(12, 10, generator=generator, dtype=torch.float64)
        error = weight - approximation
        expected = float(torch.trace(d @ error @ moment @ error.T) / torch.trace(d @ weight @ moment @ weight.T)) ** 0.5
        assert errors(approximation) == pytest.approx(expected, rel=1e-10, abs=1e-12)
