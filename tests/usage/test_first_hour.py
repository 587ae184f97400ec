"""The first hour with one's own model: token data files, threads, held-out scoring when fine-tuning on the
--eval file, defaults and warnings, progress and short reprs, tables that keep numbers whole, a quick --help."""

from __future__ import annotations

import copy
import io
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from rich.console import Console
from threadpoolctl import threadpool_info
from torch import nn

from kcompress import KCompressError, KCompressWarning, SequenceData, compress, finetune, load_data_file
from kcompress._threads import threads
from kcompress.cli.main import COMMANDS, app
from kcompress.cli.render import Display, PlainProgress
from kcompress.formats.svd import SVD
from kcompress.io import model_from_state_dict
from kcompress.progress import ProgressEvent
from tests.runs.test_sweep import save_tiny_data, save_tiny_model


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


pytestmark = pytest.mark.usefixtures("steady_speed")


@pytest.fixture
def tiny(tmp_path: pathlib.Path) -> pathlib.Path:
    return save_tiny_model(tmp_path / "tiny.pt")


@pytest.fixture
def data(tmp_path: pathlib.Path) -> pathlib.Path:
    return save_tiny_data(tmp_path / "data.npz", samples=30)


# ---------------------------------------------------------------------- token data
def test_data_files_hold_integer_token_ids(tmp_path: pathlib.Path) -> None:
    tokens = np.arange(30, dtype=np.int32).reshape(6, 5) % 7
    path = tmp_path / "tokens.npz"
    np.savez(path, inputs=tokens, targets=np.arange(6) % 2, lengths=np.array([5, 3, 1, 5, 2, 4]))
    data = load_data_file(path)
    assert data.inputs.dtype == torch.long and data.is_tokens and data.num_features is None
    assert torch.equal(data.inputs, torch.from_numpy(tokens).long())
    (inputs, lengths), _ = next(data.batches(3))
    assert inputs.shape == (3, 5) and lengths.tolist() == [5, 3, 1]


@pytest.mark.parametrize("inputs", [torch.zeros(3, 4), torch.zeros(3, 4, dtype=torch.bool),
                                    torch.zeros(3, 4, 2, dtype=torch.complex64)])
def test_other_inputs_are_refused_saying_what_is_accepted(inputs: torch.Tensor) -> None:
    with pytest.raises(KCompressError, match=r"inputs must be float features \(batch, time, features\) or integer "
                                             r"token ids \(batch, time\), got \w+ \(3, 4"):
        SequenceData(inputs, torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------------- threads
def _blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_threads_are_restored_after_the_block() -> None:
    torch_before, blas_before = torch.get_num_threads(), _blas_threads()
    with threads(1) as count:
        assert count == torch.get_num_threads() == 1 and all(n == 1 for n in _blas_threads())
    assert torch.get_num_threads() == torch_before and _blas_threads() == blas_before
    with pytest.raises(KCompressError, match="threads must be a positive integer"):
        with threads(0):
            pass


def test_a_fit_runs_on_one_thread_and_leaves_the_users_setting(monkeypatch) -> None:
    seen: list[int] = []
    original = SVD._fit

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SVD, "_fit", spy)
    user = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        SVD.fit(torch.randn(6, 5), SVD.default_tensorization(6, 5), 2)
        assert seen == [1] and torch.get_num_threads() == 2
        monkeypatch.setenv("KCOMPRESS_FIT_THREADS", "none")
        with pytest.raises(KCompressError, match="KCOMPRESS_FIT_THREADS must be a positive integer"):
            SVD.fit(torch.randn(6, 5), SVD.default_tensorization(6, 5), 2)
    finally:
        torch.set_num_threads(user)


def test_cli_threads_are_used_and_reported(tiny: pathlib.Path, tmp_path: pathlib.Path) -> None:
    report = tmp_path / "r.json"
    result = run(tiny, "--rank", "2", "--threads", "1", "--report", report)
    assert result.exit_code == 0, result.output
    assert "threads: 1 for fits, 1 for evaluation and fine-tuning" in result.stderr
    assert json.loads(report.read_text())["options"]["threads"] == {"fit": 1, "model": 1}
    assert run(tiny, "--rank", "2", "--threads", "0").exit_code == 2


def test_eval_takes_threads_and_restores_them(tiny: pathlib.Path, data: pathlib.Path) -> None:
    before = torch.get_num_threads()
    result = run("eval", tiny, "--eval", data, "--threads", "1", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["metric"] == "accuracy" and torch.get_num_threads() == before


# ---------------------------------------------------------------------- what scored what
def test_finetuning_on_the_eval_file_holds_part_out_and_says_so(tiny, data, tmp_path) -> None:
    report = tmp_path / "r.json"
    result = run(tiny, "--rank", "2", "--eval", data, "--finetune-epochs", "1", "--report", report)
    assert result.exit_code == 0, result.output
    assert (f"kcompress: --eval {data} is also the fine-tuning data: scoring on a seeded 20% held out, "
            "fine-tuning on the rest (--finetune-data FILE scores on all of it)") in result.stderr
    metrics = json.loads(report.read_text())["metrics"]
    assert metrics["scored_on"] == f"accuracy on {data} (the 20% held out, seeded: 6 samples)"
    assert metrics["finetuned_on"] == f"{data} (the other 24 samples)"
    assert "scored: accuracy on" in result.stdout  # the table's caption names both


def test_separate_finetune_data(tiny, data, tmp_path) -> None:
    other, report = save_tiny_data(tmp_path / "other.npz", seed=1), tmp_path / "r.json"
    result = run(tiny, "--rank", "2", "--eval", data, "--finetune-epochs", "1", "--finetune-data", other,
                 "--report", report)
    assert result.exit_code == 0, result.output
    assert "also the fine-tuning data" not in result.stderr
    metrics = json.loads(report.read_text())["metrics"]
    assert metrics["scored_on"] == f"accuracy on {data}" and metrics["finetuned_on"] == str(other)
    usage = run(tiny, "--rank", "2", "--eval", data, "--finetune-epochs", "0", "--finetune-data", other)
    assert usage.exit_code == 2 and "--finetune-data is the data to fine-tune on: give --finetune-epochs N" in \
        usage.stderr
    missing = run(tiny, "--rank", "2", "--eval", data, "--finetune-epochs", "1", "--finetune-data", tmp_path / "x.npz")
    assert missing.exit_code == 1 and "fine-tuning data file not found" in missing.stderr


# ---------------------------------------------------------------------- defaults and warnings
def test_cli_default_targets_everything_and_warns_about_growth_and_dense_matrices(tiny, tmp_path) -> None:
    report = tmp_path / "r.json"
    assert run(tiny, "--rank", "2", "--report", report).exit_code == 0
    formats = {row["matrix"]: row["format"] for row in json.loads(report.read_text())["matrices"]}
    assert formats == {"weight_ih_l0": "kcp", "weight_hh_l0": "kcp"}
    partial = run(tiny, "--rank", "2", "--targets", "ih", "-o", tmp_path / "ih.safetensors")
    assert "kcompress: warning: 1 recurrent matrices left dense by targets='ih'" in partial.stderr
    grown = run(tiny, "--format", "svd", "--rank", "8", "-o", tmp_path / "svd.safetensors")
    assert grown.exit_code == 0 and "kcompress: warning: compressed is larger than dense" in grown.stderr


def test_finetune_with_a_teacher_distills_says_when_it_stops_and_prints_briefly(capsys) -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(6, 3))
    student = copy.deepcopy(teacher)  # already matches: no epoch can improve on epoch 0
    data = SequenceData(torch.randn(40, 2, 3), torch.randint(0, 3, (40,)))
    events: list[ProgressEvent] = []
    result = finetune(student, data, teacher=teacher, epochs=50, lr=0.1, patience=2, progress=events.append)
    assert result.metric == "distill_loss"  # a teacher means distillation unless loss says otherwise
    stops = [event for event in events if event.stage == "stopped"]
    assert result.stopped_early and len(stops) == 1
    assert stops[0].message.startswith("early stopping after epoch ") and "restoring epoch" in stops[0].message
    lines: list[str] = []
    PlainProgress(lines.append)(stops[0])
    assert lines == [stops[0].message]  # the CLI shows it
    assert repr(result).startswith("FinetuneResult(best epoch ") and "Linear" not in repr(result)
    finetune(student, data, teacher=teacher, epochs=1, progress=True)
    assert "fine-tune epoch 1/1" in capsys.readouterr().err
    compress(nn.GRU(3, 4), "svd", rank=1, check_speed=False, progress=True)
    assert "[1/2] weight_ih_l0: relative error" in capsys.readouterr().err


def test_report_repr_is_one_line_and_tables_keep_numbers_whole() -> None:
    with pytest.warns(KCompressWarning, match="explains almost nothing"):  # random weights
        _, report = compress(nn.LSTM(40, 300), "svd", rank=2, check_speed=False)
    text = repr(report)
    assert text.startswith("Report(format='svd', 2 matrices, ratio ") and "\n" not in text
    output = io.StringIO()
    Console(file=output, width=100).print(report.rich_table())
    assert "…" not in output.getvalue()
    for row in report.matrices:
        assert f"{row.params_before:,}→{row.params_after:,}" in output.getvalue().replace(" ", "").replace("\n", "")


def test_warnings_go_above_the_progress_bar() -> None:
    display = Display()
    buffer = io.StringIO()
    display.err = Console(file=buffer, force_terminal=True, width=100)
    with display.progress() as progress:
        progress(ProgressEvent("layer", "rnn.weight_ih_l0", 1, 2))
        display.warning("something to know")
    lines = [line.split("\x1b[2K")[-1] for line in buffer.getvalue().split("\n")]  # what stays after erasing
    assert "kcompress: warning: something to know" in lines  # a line of its own, the bar redrawn below it


def test_state_dict_and_module_report_the_same_ratio() -> None:
    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding, self.gru, self.head = nn.Embedding(50, 8), nn.GRU(8, 16, batch_first=True), nn.Linear(16, 3)

    module = Tagger()
    _, from_module = compress(module, "svd", rank=2, check_speed=False)
    _, from_state = compress(model_from_state_dict(module.state_dict()), "svd", rank=2, check_speed=False)
    assert from_state.model_params_before == from_module.model_params_before == sum(
        p.numel() for p in module.parameters())
    assert from_state.model_compression_ratio == from_module.model_compression_ratio


# ---------------------------------------------------------------------- a quick --help
def test_help_imports_no_command_and_no_torch() -> None:
    code = ("import sys\nfrom kcompress.cli.main import app\ntry:\n    app.main(['--help'], prog_name='kcompress')\n"
            "except SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'kcompress --help imported torch'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert all(name in result.stdout for name in COMMANDS)


def test_the_command_list_matches_each_commands_help() -> None:
    import click

    context = click.Context(app)
    for name, (_, _, short) in COMMANDS.items():
        assert app.get_command(context, name).get_short_help_str(limit=200) == short
