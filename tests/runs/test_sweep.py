"""kcompress.runs.sweep: drops and budgets in both metric directions, the trials log, trial keys, the Pareto front,
evaluations (data files, evaluators), the plot, and one trial run in-process."""

from __future__ import annotations

import json
import math
import os
import sys
import threading

import numpy as np
import pytest
import torch

from kcompress.cli.plot import plot_pareto
from kcompress.config import CompressConfig, FinetuneOptions
from kcompress.errors import KCompressError, KCompressWarning
from kcompress.io import file_sha256
from kcompress.io.models import SequenceClassifier
from kcompress.runs.pipeline import compress_checked
from kcompress.runs.sweep import best_within_budget, expand_grid, pareto_front
from kcompress.runs.trials import TrialJob, TrialSpec, append_record, read_records, run_trial
from kcompress.tuning.evaluate import Budget, EvalSpec, load_evaluation, metric_drop


# ---------------------------------------------------------------------- helpers shared with test_cli
def save_tiny_model(path, seed: int = 0):
    """A small LSTM SequenceClassifier (4 features, hidden 8, 3 classes) saved as a state dict."""
    torch.manual_seed(seed)
    torch.save(SequenceClassifier(4, 8, 3).state_dict(), path)
    return path


def save_tiny_data(path, samples: int = 24, seed: int = 0):
    """inputs (samples, 5, 4), class targets 0..2, lengths 2..5, as .npz."""
    rng = np.random.default_rng(seed)
    np.savez(path, inputs=rng.standard_normal((samples, 5, 4)).astype(np.float32),
             targets=rng.integers(0, 3, samples), lengths=rng.integers(2, 6, samples))
    return path


def write_param_evaluator(path):
    """An evaluator whose metric is the model's parameter count: any compression makes it worse."""
    path.write_text("def count(model):\n    return float(sum(p.numel() for p in model.parameters()))\n"
                    "def text(model):\n    return 'not a number'\n")
    return path


# ---------------------------------------------------------------------- drops and budgets
@pytest.mark.parametrize(
    ("baseline", "value", "higher", "kind", "expected"),
    [
        (0.90, 0.85, True, "absolute", 0.05),
        (0.90, 0.95, True, "absolute", -0.05),
        (0.90, 0.81, True, "relative", 0.1),
        (0.20, 0.23, False, "absolute", 0.03),
        (0.20, 0.23, False, "relative", 0.15),
        (0.20, 0.10, False, "relative", -0.5),
        (-2.0, -3.0, True, "relative", 0.5),  # log-likelihood got worse: positive drop
        (-2.0, -1.0, True, "relative", -0.5),
        (-2.0, -1.0, False, "relative", 0.5),  # negative loss got larger: worse
        (0.0, 0.0, True, "relative", 0.0),
    ],
)
def test_metric_drop(baseline: float, value: float, higher: bool, kind: str, expected: float) -> None:
    assert metric_drop(baseline, value, higher_is_better=higher, drop_type=kind) == pytest.approx(expected)


def test_metric_drop_edge_cases() -> None:
    assert metric_drop(0.0, -1.0, higher_is_better=True, drop_type="relative") == math.inf
    assert metric_drop(0.0, 1.0, higher_is_better=True, drop_type="relative") == -math.inf
    assert math.isnan(metric_drop(1.0, math.nan, higher_is_better=True, drop_type="relative"))
    with pytest.raises(KCompressError, match="drop type"):
        metric_drop(1.0, 1.0, higher_is_better=True, drop_type="percent")


def test_budget() -> None:
    assert Budget().passed(5.0) is None
    assert Budget(0.01).passed(0.01) is True
    assert Budget(0.01).passed(0.0100001) is False
    assert Budget(0.01).passed(math.nan) is False
    assert Budget(0.0).passed(-0.3) is True


# ---------------------------------------------------------------------- the trials log
def test_append_and_read_records(tmp_path) -> None:
    log = tmp_path / "trials.jsonl"
    append_record(log, {"key": "a", "status": "error", "metric": math.nan})
    append_record(log, {"key": "b", "status": "ok", "metric": 0.5})
    append_record(log, {"key": "a", "status": "ok", "metric": 0.7})
    with open(log, "a", encoding="utf8") as handle:
        handle.write('{"key": "c", "status": "o')  # a torn last line
    records = read_records(log)
    assert set(records) == {"a", "b"}
    assert records["a"]["metric"] == 0.7  # the latest record of a key wins
    assert json.loads(log.read_text().splitlines()[0])["metric"] is None  # NaN stored as null
    assert read_records(tmp_path / "missing.jsonl") == {}


def test_appends_from_many_threads_stay_whole_lines(tmp_path) -> None:
    log = tmp_path / "trials.jsonl"

    def write(worker: int) -> None:
        for i in range(50):
            append_record(log, {"key": f"{worker}-{i}", "status": "ok", "pad": "x" * 3000})

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = log.read_text().splitlines()
    assert len(lines) == 200 and all(json.loads(line)["pad"] == "x" * 3000 for line in lines)


# ---------------------------------------------------------------------- trials and grid
def test_expand_grid_and_keys() -> None:
    trials = expand_grid(["kcp", "svd", "kcp"], [2, 4, 2], finetune=FinetuneOptions(epochs=1))
    assert trials[0] == TrialSpec("dense")
    assert [(t.format, t.rank) for t in trials[1:]] == [("kcp", 2), ("kcp", 4), ("svd", 2), ("svd", 4)]
    spec = EvalSpec(data="japanese-vowels").fingerprint()
    keys = {t.key("sha", spec) for t in trials}
    assert len(keys) == len(trials)
    assert trials[1].key("sha", spec) == TrialSpec("kcp", 2, finetune=FinetuneOptions(epochs=1)).key("sha", spec)
    assert trials[1].key("other", spec) != trials[1].key("sha", spec)
    assert trials[0].key("sha", spec) == expand_grid(["tt"], [8])[0].key("sha", spec)  # baseline shared
    with pytest.raises(KCompressError, match="dense"):
        expand_grid(["dense"], [2])
    with pytest.raises(KCompressError):
        expand_grid([], [2])


def test_data_file_fingerprint_follows_its_content(tmp_path) -> None:
    data = save_tiny_data(tmp_path / "d.npz")
    first = EvalSpec(data=str(data)).fingerprint()
    save_tiny_data(data, seed=1)
    assert EvalSpec(data=str(data)).fingerprint() != first


# ---------------------------------------------------------------------- Pareto front
def _row(fmt: str, ratio: float, metric, rank: int = 1) -> dict:
    return {"trial": {"format": fmt, "rank": rank}, "compression_ratio": ratio, "metric": metric, "status": "ok"}


def test_pareto_front_higher_is_better() -> None:
    rows = [_row("dense", 1.0, 0.95), _row("kcp", 4.0, 0.94), _row("kcp", 8.0, 0.90), _row("svd", 3.0, 0.93),
            _row("svd", 8.0, 0.80), _row("tt", 6.0, None), _row("tt", 9.0, math.nan), _row("ht", 2.0, 0.95)]
    front = pareto_front(rows, higher_is_better=True)
    assert [(r["trial"]["format"], r["compression_ratio"]) for r in front] == [("ht", 2.0), ("kcp", 4.0), ("kcp", 8.0)]


def test_pareto_front_lower_is_better() -> None:
    rows = [_row("dense", 1.0, 0.10), _row("kcp", 4.0, 0.12), _row("svd", 4.0, 0.11), _row("svd", 8.0, 0.30)]
    front = pareto_front(rows, higher_is_better=False)
    assert [(r["trial"]["format"], r["metric"]) for r in front] == [("dense", 0.10), ("svd", 0.11), ("svd", 0.30)]


def test_best_within_budget() -> None:
    rows = [dict(_row("dense", 1.0, 0.95), passed=True), dict(_row("kcp", 4.0, 0.94), passed=True),
            dict(_row("kcp", 8.0, 0.90), passed=False)]
    assert best_within_budget(rows, True)["compression_ratio"] == 4.0
    assert best_within_budget(rows[:1], True) is None


def test_plot_pareto(tmp_path, monkeypatch) -> None:
    rows = [_row("dense", 1.0, 0.95), _row("kcp", 4.0, 0.94), _row("kcp", 8.0, 0.90), _row("svd", 3.0, 0.93)]
    front = pareto_front(rows, True)
    assert plot_pareto(rows, front, tmp_path / "p.png", "accuracy")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot_pareto(rows, front, tmp_path / "q.png", "accuracy") is False
    assert not (tmp_path / "q.png").exists()


# ---------------------------------------------------------------------- evaluations
def test_eval_spec_checks(tmp_path) -> None:
    with pytest.raises(KCompressError, match="neither a built-in dataset"):
        EvalSpec(data="no-such-data").check()
    with pytest.raises(KCompressError, match="module:function"):
        EvalSpec(evaluator="just_a_name").check()
    with pytest.raises(KCompressError, match="nothing to evaluate"):
        EvalSpec().check()
    assert EvalSpec(data="x.npz", task="regression").higher_is_better is False
    assert EvalSpec(evaluator="m:f", lower_is_better=True).higher_is_better is False
    assert EvalSpec(evaluator="m:f").metric_name == "m:f"


def test_evaluator_from_file(tmp_path) -> None:
    evaluator = write_param_evaluator(tmp_path / "metrics.py")
    model = SequenceClassifier(4, 8, 3)
    evaluation = load_evaluation(EvalSpec(evaluator=f"{evaluator}:count"))
    assert evaluation.measure(model) == float(sum(p.numel() for p in model.parameters()))
    assert evaluation.train_data is None
    with pytest.raises(KCompressError, match="must return a number"):
        load_evaluation(EvalSpec(evaluator=f"{evaluator}:text")).measure(model)
    with pytest.raises(KCompressError, match="has no function"):
        load_evaluation(EvalSpec(evaluator=f"{evaluator}:missing"))


def test_data_file_evaluation(tmp_path) -> None:
    data = save_tiny_data(tmp_path / "d.npz")
    evaluation = load_evaluation(EvalSpec(data=str(data)))
    value = evaluation.measure(SequenceClassifier(4, 8, 3))
    assert 0.0 <= value <= 1.0 and evaluation.name == "accuracy" and len(evaluation.train_data) == 24


def test_compress_checked_refuses_a_model_without_layers() -> None:
    with pytest.raises(KCompressError, match="nothing to compress"):
        compress_checked(torch.nn.Sequential(torch.nn.ReLU()), CompressConfig.from_keywords("kcp", rank=2))
    with pytest.raises(KCompressError, match="not matched by include"), pytest.warns(KCompressWarning, match="include"):
        compress_checked(SequenceClassifier(4, 8, 3), CompressConfig.from_keywords("kcp", rank=2, include=["nothing*"]))


# ---------------------------------------------------------------------- one trial in-process
def test_run_trial_appends_its_record(tmp_path) -> None:
    model = save_tiny_model(tmp_path / "tiny.pt")
    data = save_tiny_data(tmp_path / "d.npz")
    spec = EvalSpec(data=str(data))
    log = tmp_path / "trials.jsonl"
    sha = file_sha256(model)
    records = []
    for trial in (TrialSpec("dense"), TrialSpec("svd", 2, finetune=FinetuneOptions(epochs=1))):
        job = TrialJob(trial, trial.key(sha, spec.fingerprint()), str(model), sha, False, spec, str(log))
        records.append(run_trial(job))
    dense, svd = records
    assert dense["status"] == "ok" and dense["compression_ratio"] == 1.0 and dense["finetuned"] is None
    assert svd["status"] == "ok", svd.get("error")
    assert svd["compression_ratio"] > 1.0 and svd["finetuned"] is not None and svd["metric"] == svd["finetuned"]
    assert set(read_records(log)) == {dense["key"], svd["key"]}
    broken = TrialJob(TrialSpec("kcp", 2), "k", str(tmp_path / "missing.pt"), sha, False, spec, str(log))
    record = run_trial(broken)
    assert record["status"] == "error" and "\n" not in record["error"]
    assert read_records(log)["k"]["status"] == "error"
    assert os.path.getsize(log) == sum(len(line) + 1 for line in log.read_text().splitlines())


def test_a_sweep_without_the_baseline_is_refused_before_any_work(tmp_path) -> None:
    from kcompress.runs.sweep import run_sweep

    save_tiny_model(tmp_path / "m.pt")
    with pytest.raises(KCompressError, match="dense baseline"):
        run_sweep(tmp_path / "m.pt", [TrialSpec("svd", 2)], EvalSpec(evaluator="x:y"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_worker_trial_restores_the_workers_threads(tmp_path, monkeypatch) -> None:
    from kcompress.runs import trials

    seen = []
    monkeypatch.setattr(trials, "execute_trial", lambda job, files=None: seen.append(torch.get_num_threads()) or {})
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        trials.worker_trial(None)
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
