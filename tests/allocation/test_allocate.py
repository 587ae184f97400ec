"""Automatic allocation (kcompress.allocation.choose / kcompress.allocation.auto) and the accuracy budget search (kcompress.runs.search)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import warnings

import pytest
import torch
from torch import nn

import kcompress
from kcompress.allocation.auto import prepare
from kcompress.allocation.choose import Candidate, Option, allocate, estimate, pareto, solve
from kcompress.calibration.moments import collect_second_moments
from kcompress.config import BudgetOptions, CompressConfig
from kcompress.errors import KCompressError
from kcompress.formats import get_format
from kcompress.formats.data_fit import DataFitSettings, output_error
from kcompress.io.models import SequenceClassifier
from kcompress.nn.speed import Speed
from kcompress.runs.convert import compress_model
from kcompress.runs.pipeline import CompressionRun
from kcompress.runs.search import search_budget
from kcompress.tuning.evaluate import Budget, EvalSpec, Evaluation
from tests.conftest import trained_like
from tests.runs.test_sweep import save_tiny_model, write_param_evaluator


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is fastest, and stays fast on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: a short data-aware refinement: these tests are about the choice, not the fit
QUICK = DataFitSettings(iterations=5)


def moment(size: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    """A second moment ``X^T X / n`` of correlated inputs."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(200, size, generator=generator, dtype=torch.float64) @ torch.randn(
        size, size, generator=generator, dtype=torch.float64)
    return scale * x.T @ x / 200


def candidate(name: str, rows: int, cols: int, seed: int, scale: float = 1.0) -> Candidate:
    weight = trained_like(rows, cols, seed).double()
    c = moment(cols, seed, scale)
    tzs = {f: get_format(f).default_tensorization(rows, cols) for f in ("kcp", "tt", "svd")}
    return Candidate(name, weight, c, c, tzs)


def random_options(count: int, seed: int) -> list[list[Option]]:
    generator = torch.Generator().manual_seed(seed)
    options = []
    for m in range(count):
        costs = torch.randint(1, 400, (12,), generator=generator).tolist()
        errors = torch.rand(12, generator=generator, dtype=torch.float64).tolist()
        options.append([Option(f"m{m}", "svd", r + 1, c, c, e, True) for r, (c, e) in enumerate(zip(costs, errors))])
    return options


def brute_force(options: list[list[Option]], budget: int) -> float:
    totals = [sum(o.error for o in combo) for combo in itertools.product(*options)
              if sum(o.params for o in combo) <= budget]
    return min(totals)


# ---------------------------------------------------------------------- the knapsack
@pytest.mark.parametrize("seed", range(4))
def test_solve_never_exceeds_the_budget_and_is_exact(seed: int) -> None:
    options = random_options(3, seed)
    cheapest = sum(min(o.params for o in opts) for opts in options)
    for budget in (cheapest, cheapest + 57, 400, 700, 1200):
        if budget < cheapest:
            continue
        chosen = solve(options, budget)
        assert sum(o.params for o in chosen) <= budget
        assert sum(o.error for o in chosen) == pytest.approx(brute_force(options, budget))
        # coarse units (costs rounded up) still never exceed the budget
        coarse = solve(options, budget, resolution=7)
        assert sum(o.params for o in coarse) <= budget


def test_solve_refuses_a_budget_below_the_cheapest_allocation() -> None:
    options = random_options(2, 0)
    cheapest = sum(min(o.params for o in opts) for opts in options)
    with pytest.raises(KCompressError, match="below the smallest allocation"):
        solve(options, cheapest - 1)


def test_pareto_drops_dominated_options() -> None:
    options = [Option("m", "svd", 1, 10, 10, 5.0, True), Option("m", "kcp", 1, 20, 20, 6.0, True),
               Option("m", "tt", 1, 30, 30, 1.0, True)]
    assert [o.format for o in pareto(options, "size")] == ["svd", "tt"]


# ---------------------------------------------------------------------- estimates and the allocation
def test_allocation_is_within_budget_and_deterministic() -> None:
    candidates = [candidate("a.weight", 16, 8, 0), candidate("b.weight", 16, 8, 1)]
    first = estimate(candidates, ["kcp", "svd"], seed=3, settings=QUICK)
    again = estimate(candidates, ["kcp", "svd"], seed=3, settings=QUICK)
    assert first == again
    budget = sum(c.dense_params for c in candidates) // 4
    allocation = allocate(candidates, first, budget)
    assert allocation.used <= budget and allocation.to_dict() == allocate(candidates, again, budget).to_dict()
    assert sum(row.params for row in allocation.rows) == allocation.used


@pytest.mark.parametrize("weighted", [False, True])  # with gate-row weights: tr(D E C Eᵀ)
def test_svd_estimate_is_the_error_of_the_data_aware_fit(weighted: bool) -> None:
    """The closed-form curve at each rank equals the output error of the data-aware SVD fit (ridge included)."""
    cand = candidate("m.weight", 20, 12, 2)
    rows = torch.logspace(-1, 1, 20, dtype=torch.float64) if weighted else None
    cand = dataclasses.replace(cand, row_weights=rows)
    settings = DataFitSettings(ridge=0.05)
    options = estimate([cand], ["svd"], settings=settings)[0]
    svd = get_format("svd")
    for option in options:
        module = svd.fit(cand.weight, cand.tensorizations["svd"], option.rank)
        module.fit_to_data(cand.weight, cand.moment, cand.holdout, settings, row_weights=rows)
        fitted = output_error(cand.weight, module.reconstruct(), cand.moment, rows) ** 2 * cand.energy()
        assert option.error == pytest.approx(fitted, rel=1e-6, abs=1e-9)


def test_the_sensitive_matrix_gets_more_parameters() -> None:
    """Two identical matrices, one whose inputs are 100x stronger: it gets the larger share."""
    plain, loud = candidate("plain.weight", 24, 16, 0), candidate("loud.weight", 24, 16, 0, scale=100.0)
    for formats in (["svd"], ["kcp", "tt", "svd"]):
        options = estimate([plain, loud], formats, settings=QUICK)
        allocation = allocate([plain, loud], options, (plain.dense_params + loud.dense_params) // 5)
        by_name = {row.matrix: row for row in allocation.rows}
        assert by_name["loud.weight"].params > by_name["plain.weight"].params


# ---------------------------------------------------------------------- through compress
def toy_model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = SequenceClassifier(6, 16, 3).eval()
    with torch.no_grad():  # make the input matrix matter much more than the recurrent one
        model.rnn.weight_ih_l0.mul_(3.0)
    return model, torch.randn(40, 7, 6)


def summed_output_error(model: nn.Module, compressed: nn.Module, calibration: torch.Tensor) -> float:
    """Σ tr(E C Eᵀ) over the recurrent matrices, on the dense model's second moments."""
    moments = collect_second_moments(model, calibration, names=["rnn"])
    total = 0.0
    for name in ("weight_ih_l0", "weight_hh_l0"):
        weight = getattr(model.rnn, name).detach().double()
        approx = compressed.rnn.matrices[name].reconstruct().detach().double()
        c = moments[f"rnn.{name}"].fit
        total += float((((weight - approx) @ c) * (weight - approx)).sum())
    return total


def test_auto_over_one_format_beats_uniform_at_the_same_parameter_count() -> None:
    model, calibration = toy_model()
    common = dict(targets="ih,hh", calibration=calibration, calibrate_samples=40,
                  calibrate_options={"source": "dense"}, check_speed=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uniform, uniform_report = kcompress.compress(model, format="svd", ratio=4, **common)
        auto, report = kcompress.compress(model, format="svd", params=uniform_report.compressed_params_after,
                                          allocate="auto", **common)
    assert report.compressed_params_after <= uniform_report.compressed_params_after
    assert summed_output_error(model, auto, calibration) <= summed_output_error(model, uniform, calibration) + 1e-9
    rows = report.allocation["rows"]
    assert [row["matrix"] for row in rows] == ["rnn.weight_ih_l0", "rnn.weight_hh_l0"]
    assert all(row["measured_error"] is not None and row["path"] for row in rows)
    assert report.allocation["used"] <= report.allocation["budget"]
    assert kcompress.report.record.Report.from_dict(json.loads(report.to_json())).allocation == json.loads(
        json.dumps(report.allocation))


def test_auto_argument_errors() -> None:
    model, _ = toy_model()
    with pytest.raises(KCompressError, match="not rank"):
        kcompress.compress(model, format=["svd", "kcp"], rank=2, allocate="auto")
    with pytest.raises(KCompressError, match="exactly one of ratio and params"):
        kcompress.compress(model, format=["svd"], allocate="auto")
    with pytest.raises(KCompressError, match="allocate must be"):
        kcompress.compress(model, format="svd", ratio=4, allocate="greedy")
    with pytest.raises(KCompressError, match="allocate='auto' chooses"):
        kcompress.compress(model, format="svd", ratio=4, allocate="auto", overrides={"rnn.*": {"rank": 2}})


def test_latency_objective_keeps_every_matrix_within_dense_macs() -> None:
    model, _ = toy_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, report = kcompress.compress(model, format=["kcp", "tt", "svd"], ratio=3, targets="ih,hh",
                                       allocate="auto", objective="latency", check_speed=False)
    allocation = report.allocation
    assert allocation["objective"] == "latency" and allocation["used"] <= allocation["budget"]
    assert all(row["macs"] <= row["dense_params"] for row in allocation["rows"])
    assert sum(m.macs_after for m in report.matrices if m.format != "dense") <= allocation["budget"]


# ---------------------------------------------------------------------- the budget search
def searched(**settings) -> CompressConfig:
    """An allocated config whose ratio the budget search chooses."""
    return CompressConfig.from_keywords(["svd"], allocate="auto", targets="ih,hh", check_speed=False, **settings)


def search_run(model: nn.Module, measure) -> CompressionRun:
    evaluation = Evaluation(EvalSpec(evaluator="x:y"), measure, None, "test metric")
    return CompressionRun(dense=model, evaluation=evaluation, baseline=measure(model))


def test_search_finds_the_largest_passing_ratio() -> None:
    model, _ = toy_model()
    dense = sum(p.numel() for p in model.parameters())
    measure = lambda m: 1.0 if sum(p.numel() for p in m.parameters()) >= 0.55 * dense else 0.0
    prepared = prepare(model, searched())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = search_budget(search_run(model, measure), prepared, Budget(0.0), searched())
    assert result.passed and result.steps[result.chosen].passed
    chosen = result.steps[result.chosen]
    assert all(s.achieved_ratio <= chosen.achieved_ratio for s in result.steps if s.passed)
    assert all(s.used <= s.budget for s in result.steps)
    assert result.run.report.search["chosen"] == result.chosen and result.run.report.status == "ok"


def test_search_without_a_passing_step_returns_the_closest_marked_failed() -> None:
    model, _ = toy_model()
    measure = lambda m: float(sum(p.numel() for p in m.parameters()))
    prepared = prepare(model, searched())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = search_budget(search_run(model, measure), prepared, Budget(0.0), searched(), max_steps=3)
    assert not result.passed and len(result.steps) == 3
    assert result.steps[result.chosen].drop == min(s.drop for s in result.steps)
    assert result.run.report.status == "failed" and result.run.report.search["passed"] is False


def test_search_refuses_settings_it_chooses_itself() -> None:
    model, _ = toy_model()
    prepared = prepare(model, searched())
    run = search_run(model, lambda m: 1.0)
    for key, value in (("rank", 2), ("ratio", 4.0), ("params", 100)):
        with pytest.raises(KCompressError, match="chooses the"):
            search_budget(run, prepared, Budget(0.0), searched(**{key: value}))


def targeted_params(model: nn.Module) -> int:
    """Parameters of the recurrent matrices (dense or compressed) of a SequenceClassifier."""
    rnn = model.rnn
    matrices = getattr(rnn, "matrices", None)
    if matrices is None:
        return rnn.weight_ih_l0.numel() + rnn.weight_hh_l0.numel()
    return sum(p.numel() for p in matrices.parameters())


def test_search_steps_over_one_failure_and_never_exceeds_the_budget() -> None:
    """Accuracy not monotone in the ratio: 4x fails, 8x passes; the search doubles past one failure."""
    model, _ = toy_model()
    dense = targeted_params(model)
    measure = lambda m: 0.0 if 0.15 * dense < targeted_params(m) < 0.4 * dense else 1.0
    prepared = prepare(model, searched())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = search_budget(search_run(model, measure), prepared, Budget(0.0), searched())
    ratios = [s.ratio for s in result.steps]
    assert ratios[:3] == [2.0, 4.0, 8.0] and not result.steps[1].passed and result.steps[2].passed
    assert result.steps[result.chosen].achieved_ratio >= 8.0
    assert all(s.used <= s.budget for s in result.steps)


def test_search_reuses_a_repeated_allocation_with_the_same_result() -> None:
    """Bisection down to 1 % asks for budgets that allocate the same ranks: each is fitted once, and the
    reused step carries what a fresh fit at its ratio measures."""
    model, _ = toy_model()
    dense = targeted_params(model)
    fits = []
    def measure(m: nn.Module) -> float:
        fits.append(targeted_params(m))
        return 1.0 if targeted_params(m) >= 0.3 * dense else 0.0
    prepared = prepare(model, searched())
    run = search_run(model, measure)
    fits.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = search_budget(run, prepared, Budget(0.0), searched(), tolerance=0.01, max_steps=9)
        reused = [s for s in result.steps if s.reused is not None]
        assert reused and len(fits) == len(result.steps) - len(reused)
        for step in reused:
            origin = result.steps[step.reused]
            assert origin.reused is None and (step.used, step.metric, step.passed) == (
                origin.used, origin.metric, origin.passed)
            allocation = prepared.allocate(ratio=step.ratio)
            fresh, _ = compress_model(model, searched().replace(budget=BudgetOptions(ratio=step.ratio,
                                                                                      allocate="auto")),
                                      prepared=prepared)
            assert allocation.used == step.used and measure(fresh) == step.metric
            assert step.used <= step.budget


def test_search_is_deterministic_and_recovers_only_failing_steps() -> None:
    """Distillation runs only on steps whose fitted model fails; the same seed gives the same trajectory."""
    model, calibration = toy_model()
    dense = targeted_params(model)
    measure = lambda m: 1.0 if targeted_params(m) >= 0.3 * dense else 0.0
    prepared = prepare(model, searched(calibrate_samples=40), calibration)
    trajectories = []
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = search_budget(search_run(model, measure), prepared, Budget(0.0),
                                   searched(calibrate_samples=40, distill_epochs=1, calibrate_options={"ridge": 0.01}),
                                   calibration=calibration, max_steps=3)
        trajectories.append([{k: v for k, v in vars(s).items() if k != "seconds"} for s in result.steps])
        assert all(s.recovery == ([] if s.fitted_metric == 1.0 else ["distill"]) for s in result.steps)
        assert any(s.recovery for s in result.steps) and any(not s.recovery for s in result.steps)
    assert trajectories[0] == trajectories[1]


# ---------------------------------------------------------------------- the command line
def cli(*args: object):
    from click.testing import CliRunner

    from kcompress.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_auto_allocation_writes_the_allocation(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("kcompress.runs.convert.measured_speedup", lambda matrix, *args, **kwargs: Speed(0.5, 0.0))
    model = save_tiny_model(tmp_path / "tiny.pt")
    report = tmp_path / "r.json"
    result = cli(model, "--formats", "svd,kcp", "--params", "150", "--targets", "ih,hh", "--report", report,
                 "--markdown", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    document = json.loads(report.read_text())
    assert document["allocation"]["used"] <= 150 and len(document["allocation"]["rows"]) == 2
    assert document["summary"]["compressed_params_after"] == document["allocation"]["used"]
    assert (tmp_path / "tiny.auto.safetensors").is_file() and "#### Allocation" in (tmp_path / "r.md").read_text()


@pytest.mark.parametrize("args", [["--params", "100", "--allocate", "uniform"], ["--formats", "svd", "--rank", "2"],
                                  ["--formats", "svd,kcp", "--allocate", "uniform", "--ratio", "2"],
                                  ["--formats", "svd", "--ratio", "2", "--params", "100"], ["--formats", "svd"]])
def test_cli_allocation_usage_errors(tmp_path, args) -> None:
    result = cli(save_tiny_model(tmp_path / "tiny.pt"), *args)
    assert result.exit_code == 2, result.output


def test_cli_search_without_a_passing_budget_exits_3_and_writes_the_closest(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("kcompress.runs.convert.measured_speedup", lambda matrix, *args, **kwargs: Speed(0.5, 0.0))
    model = save_tiny_model(tmp_path / "tiny.pt")
    evaluator = write_param_evaluator(tmp_path / "params_metric.py")
    report = tmp_path / "r.json"
    result = cli(model, "--formats", "svd", "--targets", "ih,hh", "--evaluator", f"{evaluator}:count",
                 "--max-drop", "0", "--report", report)
    assert result.exit_code == 3, result.output
    assert (tmp_path / "tiny.auto.safetensors").is_file()
    document = json.loads(report.read_text())
    search = document["search"]
    assert document["status"] == "failed" and search["passed"] is False and search["steps"]
    assert not any(step["passed"] for step in search["steps"])
    assert search["steps"][search["chosen"]]["drop"] == min(step["drop"] for step in search["steps"])
    assert "budget search" in result.stdout
