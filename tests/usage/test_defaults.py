"""The defaults a user gets without flags (issue 23): a ratio allocated when there is calibration data,
recovery when a budget fails, ``lr="auto"``, the thread count, the plan's progress, the calibrated warning."""

from __future__ import annotations

import copy
import pathlib
import warnings

import numpy as np
import pytest
import torch

from kcompress import compress, finetune
from kcompress._threads import default_model_threads
from kcompress.cli.allocation import ALLOCATED_FORMATS, allocation_request
from kcompress.config import BudgetOptions, CompressConfig, FinetuneOptions, RecoveryOptions
from kcompress.errors import KCompressError
from kcompress.io.models import SequenceClassifier
from kcompress.names import RECOVERY_EPOCHS
from kcompress.report.checks import result_warnings
from kcompress.report.record import Report
from kcompress.report.rows import MatrixReport
from kcompress.runs.pipeline import compress_stages, load_input, prepare_evaluation
from kcompress.tuning.agreement import best_index, output_agreement
from kcompress.tuning.data import SequenceData
from kcompress.tuning.evaluate import Budget, EvalSpec, evaluate


def _classifier() -> tuple[SequenceClassifier, SequenceData]:
    torch.manual_seed(0)
    model = SequenceClassifier(6, 8, 3)
    lengths = torch.randint(2, 9, (40,))
    x = torch.randn(40, 8, 6) * (torch.arange(8)[None, :, None] < lengths[:, None, None])
    return model, SequenceData(x, torch.randint(0, 3, (40,)), lengths)


def test_a_ratio_is_allocated_with_calibration_data_and_uniform_without() -> None:
    assert BudgetOptions(ratio=4).resolved(calibrated=True).allocate == "auto"
    assert BudgetOptions(ratio=4).resolved(calibrated=False).allocate == "uniform"  # no data: uniform (measured)
    assert BudgetOptions(rank=4).resolved(calibrated=True).allocate == "uniform"
    assert BudgetOptions(params=100).resolved(calibrated=False).allocate == "auto"
    assert BudgetOptions(ratio=4, allocate="uniform").resolved(calibrated=True).allocate == "uniform"
    fixed = CompressConfig.from_keywords("kcp", ratio=4, overrides={"*ih*": {"rank": 2}})
    assert fixed.for_data(calibrated=True).budget.allocate == "uniform"  # overrides fix ranks: per matrix
    model, data = _classifier()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        allocated, report = compress(model, "svd", ratio=2, calibration=data, calibrate_samples=20, check_speed=False)
        uniform, plain = compress(model, "svd", ratio=2, check_speed=False)
    splits = report.calibration["splits"]  # the default fits both splits and keeps the closer one to dense
    assert [s["allocate"] for s in splits] == ["uniform", "auto"]
    kept = splits[best_index(splits)]["allocate"]
    assert report.options["budget"]["allocate"] == kept and bool(report.allocation) == (kept == "auto")
    assert (report.format == "auto(svd)") == (kept == "auto")
    assert sum(r.params_after for r in report.matrices) <= sum(r.params_before for r in report.matrices) / 2
    assert not plain.allocation and plain.options["budget"]["allocate"] == "uniform" and "splits" not in plain.calibration
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fixed, again = compress(model, "svd", ratio=2, calibration=data, calibrate_samples=20, check_speed=False,
                                allocate=kept)
    record = {key: value for key, value in next(s for s in splits if s["allocate"] == kept).items() if key != "allocate"}
    assert again.calibration["agreement_after_fit"] == record
    x = data.inputs[:4]
    assert torch.equal(fixed(x), allocated(x))  # the kept split, as fitted alone

    assert uniform(x).shape == allocated(x).shape


def test_cli_budget_defaults() -> None:
    calibrated = allocation_request(None, None, None, None, 4.0, None, "size", None, calibrated=True)
    assert calibrated.format == list(ALLOCATED_FORMATS) and calibrated.budget.allocate == "auto"
    only = allocation_request("tt", None, None, None, 4.0, None, "size", None, calibrated=True)
    assert (only.format, only.budget.allocate, only.output_tag) == ("tt", None, "tt")  # allocated over tt alone
    plain = allocation_request(None, None, None, None, 4.0, None, "size", None, calibrated=False)
    assert (plain.format, plain.budget.allocate) == ("kcp", None)
    search = allocation_request(None, None, None, None, None, None, "size", 0.01)
    assert search.search and search.format == list(ALLOCATED_FORMATS)
    rank = allocation_request(None, None, None, 8, None, None, "size", None, calibrated=True)
    assert rank.budget.resolved(calibrated=True).allocate == "uniform"


def test_finetune_auto_rate_keeps_the_better_of_two_runs() -> None:
    torch.manual_seed(1)
    teacher, data = _classifier()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    runs = {}
    for rate in (1e-3, 1e-2):
        runs[rate] = finetune(copy.deepcopy(student), data, teacher=teacher, epochs=3, lr=rate, patience=None)
    result = finetune(student, data, teacher=teacher, epochs=3, patience=None)
    assert [c["lr"] for c in result.lr_candidates] == [1e-3, 1e-2]
    _, held_out = data.split(0.2, seed=0)  # finetune's validation split
    for candidate in result.lr_candidates:  # each rate's outputs against the teacher's on it
        expected = output_agreement(runs[candidate["lr"]].model, teacher, [(held_out.inputs, held_out.lengths)])
        assert candidate["agreement"]["argmax_agreement"] == expected["argmax_agreement"]
        assert candidate["agreement"]["relative_error"] == pytest.approx(expected["relative_error"])
        assert candidate["best_val"] == runs[candidate["lr"]].best_val
    best = result.lr_candidates[best_index([c["agreement"] for c in result.lr_candidates])]["lr"]
    assert result.lr == best and result.best_val == runs[best].best_val
    for (name, value), expected in zip(student.state_dict().items(), runs[best].model.state_dict().values()):
        assert torch.equal(value, expected), name
    assert evaluate(student, data) == evaluate(runs[best].model, data)


def _row(weight_error: float, output_error: float | None) -> MatrixReport:
    return MatrixReport("rnn", "LSTM", "weight_ih_l0", (32, 6), "kcp", "", 2, 2, 192, 40, 192, 40, weight_error,
                        0.1, 5, False, output_error_after=output_error)


def test_fit_warning_after_calibration_is_about_the_output_error() -> None:
    assert result_warnings(Report(matrices=[_row(1.144, 0.12)])) == []  # calibrated: the weight may drift
    warned = result_warnings(Report(matrices=[_row(0.5, 0.97)]))
    assert len(warned) == 1 and "held-out output error 0.970" in warned[0]
    assert "relative error 0.990" in result_warnings(Report(matrices=[_row(0.99, None)]))[0]


def test_default_model_threads_leave_room() -> None:
    count = default_model_threads()
    assert 1 <= count <= torch.get_num_threads()


def test_a_failed_budget_is_recovered_by_distillation(tmp_path: pathlib.Path) -> None:
    """With calibration data and ``max_drop``, a model that misses the budget is distilled (no labels) by default."""
    model, data = _classifier()
    with torch.no_grad():  # labels: the dense model's decisions, so any disagreement misses a zero budget
        labels = model(data.inputs, data.lengths).argmax(-1)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    np.savez(tmp_path / "eval.npz", inputs=data.inputs.numpy(), targets=labels.numpy(), lengths=data.lengths.numpy())
    run = load_input(tmp_path / "model.pt")
    prepare_evaluation(run, EvalSpec(data=str(tmp_path / "eval.npz")))
    config = CompressConfig.from_keywords("svd", ratio=4, allocate="uniform", calibrate_samples=20,
                                          calibrate_options={"patience": 2}, check_speed=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compress_stages(run, config, calibration=data, budget=Budget(0.0))
    assert run.report is not None and run.compressed is not None and run.baseline == 1.0
    assert run.report.calibration["distill"]["epochs_run"] >= 1
    assert run.compressed_metric == evaluate(run.compressed, SequenceData(data.inputs, labels, data.lengths))


class _Tokens(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.rnn, self.head = torch.nn.Embedding(10, 6), torch.nn.GRU(6, 8, batch_first=True), torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.emb(x))[0][:, -1])


def test_calibration_data_that_does_not_fit_the_model_is_one_line() -> None:
    model = _Tokens()
    for data, message in ((torch.randint(0, 20, (30, 5)), "token ids go up to 19, but the model's Embedding has 10"),
                          (torch.randn(30, 5, 6), "holds float features .* it takes integer token ids")):
        with pytest.raises(KCompressError, match=message) as error:
            compress(model, "svd", ratio=2, calibration=data, calibrate_samples=20, check_speed=False)
        assert "\n" not in str(error.value) and str(error.value).startswith("the calibration data")


def test_recovery_epochs_run_only_where_a_budget_fails() -> None:
    recovery = RecoveryOptions()
    assert (recovery.distill_epochs, recovery.fit_epochs, recovery.recovery_epochs) == ("auto", 0, RECOVERY_EPOCHS)
    assert (recovery.finetune.fit_epochs, recovery.finetune.recovery_epochs) == (0, RECOVERY_EPOCHS)
    assert RecoveryOptions(distill_epochs=5).recovery_epochs == RecoveryOptions(distill_epochs=5).fit_epochs == 5
    assert RecoveryOptions(distill_epochs=0).recovery_epochs == 0  # 0: never
    for bad in ("some", -1, 1.5):
        with pytest.raises(KCompressError, match="distill_epochs must be an integer"):
            RecoveryOptions(distill_epochs=bad)  # type: ignore[arg-type]
    with pytest.raises(KCompressError, match="finetune lr must be a positive number or 'auto'"):
        FinetuneOptions(lr=0.0)


def test_cli_allocate_uniform_keeps_one_ratio_per_matrix() -> None:
    uniform = allocation_request("svd", None, "uniform", None, 4.0, None, "size", None, calibrated=True)
    assert uniform.budget.allocate == "uniform" and uniform.budget.resolved(calibrated=True).allocate == "uniform"
