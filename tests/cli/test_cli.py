"""The command line, in-process through click's CliRunner and as subprocesses through the installed entry
point and ``python -m kcompress``: exit codes, files written or not, the report, errors, progress, sweeps."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kcompress.cli.main import app
from kcompress.cli.options import COMPRESSION_FORMATS
from kcompress.io import default_output_path
from kcompress.progress import PlainProgress, ProgressEvent
from kcompress.report.record import validate_report_dict
from tests.conftest import EXAMPLE_LSTM, ROOT
from tests.runs.test_sweep import save_tiny_data, save_tiny_model, write_param_evaluator

COLOR = re.compile(r"\x1b\[(?:\d+;)*(?:3[0-79]|9[0-7]|38;[25];[\d;]+)m")


def run(*args: object, env: dict | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error_line(stderr: str) -> str:
    """The single ``kcompress: error:`` line of a failed run (and no traceback)."""
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("kcompress: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


pytestmark = pytest.mark.usefixtures("steady_speed")


@pytest.fixture
def tiny(tmp_path: pathlib.Path) -> pathlib.Path:
    return save_tiny_model(tmp_path / "tiny.pt")


@pytest.fixture
def data(tmp_path: pathlib.Path) -> pathlib.Path:
    return save_tiny_data(tmp_path / "data.npz")


@pytest.fixture
def lstm(tmp_path: pathlib.Path) -> pathlib.Path:
    """The example JapaneseVowels LSTM copied into tmp_path (outputs land beside the input)."""
    if not EXAMPLE_LSTM.exists():
        pytest.skip("examples/japanese_vowels/lstm.pt is missing")
    return pathlib.Path(shutil.copy(EXAMPLE_LSTM, tmp_path / "lstm.pt"))


# ---------------------------------------------------------------------- help, version, routing
@pytest.mark.parametrize("command", [[], ["compress"], ["inspect"], ["eval"], ["sweep"]])
def test_help_everywhere_with_examples(command: list[str]) -> None:
    for flag in ("--help", "-h"):
        result = run(*command, flag)
        assert result.exit_code == 0, result.output
        assert "Usage: kcompress" in result.output and "Examples:" in result.output


def test_version_and_bare_group() -> None:
    result = run("--version")
    assert result.exit_code == 0 and re.match(r"kcompress \d+\.\d+", result.output)
    assert run().exit_code in (0, 2)  # no arguments: the group's help


def test_compress_is_the_default_command(tiny: pathlib.Path) -> None:
    before = sha256(tiny)
    result = run(tiny, "--format", "kcp", "--rank", "2")
    assert result.exit_code == 0, result.output
    expected = default_output_path(tiny, "kcp", rank=2)
    assert expected.is_file() and expected != tiny and sha256(tiny) == before
    assert f"wrote {expected}" in result.stdout and "kcompress: kcp" in result.stdout
    routed_option_first = run("--rank", "2", "--format", "svd", tiny, "-q")
    assert routed_option_first.exit_code == 0, routed_option_first.output
    assert default_output_path(tiny, "svd", rank=2).is_file()
    assert routed_option_first.stdout == ""  # --quiet


def test_existing_output_needs_overwrite(tiny: pathlib.Path) -> None:
    out = tiny.with_name("out.safetensors")
    assert run("compress", tiny, "--rank", "2", "-o", out).exit_code == 0
    written = sha256(out)
    again = run("compress", tiny, "--rank", "2", "-o", out)
    assert again.exit_code == 1 and "--overwrite" in one_error_line(again.stderr)
    assert sha256(out) == written
    assert run("compress", tiny, "--rank", "3", "-o", out, "--overwrite").exit_code == 0
    assert sha256(out) != written


def test_output_never_the_input(tiny: pathlib.Path) -> None:
    before = sha256(tiny)
    for option in (["-o", tiny], ["--report", tiny], ["--markdown", tiny], ["--overwrite", "-o", tiny]):
        result = run(tiny, "--rank", "2", *option)
        assert result.exit_code == 1 and "input file" in one_error_line(result.stderr)
    assert sha256(tiny) == before and sorted(p.name for p in tiny.parent.iterdir()) == ["tiny.pt"]


# ---------------------------------------------------------------------- report, evaluation, budget
def test_report_json_and_markdown_with_finetuning(tiny: pathlib.Path, data: pathlib.Path) -> None:
    report, markdown = tiny.with_name("r.json"), tiny.parent / "sub" / "r.md"
    markdown.parent.mkdir()
    result = run(tiny, "--format", "kcp", "--rank", "2", "--targets", "ih,hh", "--eval", data,
                 "--finetune-epochs", "1", "--finetune-loss", "both", "--report", report, "--markdown", markdown)
    assert result.exit_code == 0, result.output
    document = json.loads(report.read_text())
    validate_report_dict(document)
    assert document["schema_version"] == 1 and document["status"] == "ok"
    assert {m["matrix"] for m in document["matrices"]} == {"weight_ih_l0", "weight_hh_l0"}
    metrics = document["metrics"]
    assert metrics["name"] == "accuracy" and metrics["higher_is_better"] is True and metrics["passed"] is None
    for key in ("baseline", "compressed", "finetuned"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["drop"] == pytest.approx(metrics["baseline"] - metrics["finetuned"])
    assert "| weight_ih_l0 |" in markdown.read_text() and "accuracy: baseline" in markdown.read_text()
    assert "accuracy: baseline" in result.stdout
    assert re.search(r"^fine-tune epoch 1/1: ", result.stderr, re.M)


def test_budget_not_met_exits_3_and_still_writes(tiny: pathlib.Path, tmp_path: pathlib.Path) -> None:
    evaluator = write_param_evaluator(tmp_path / "params_metric.py")
    report = tmp_path / "r.json"
    result = run(tiny, "--rank", "2", "--evaluator", f"{evaluator}:count", "--max-drop", "0", "--report", report)
    assert result.exit_code == 3, result.output
    assert default_output_path(tiny, "kcp", rank=2).is_file()
    document = json.loads(report.read_text())
    assert document["status"] == "failed" and document["metrics"]["passed"] is False
    assert document["metrics"]["drop"] > 0 and document["metrics"]["task"] is None
    assert "budget not met" in result.stderr and "Traceback" not in result.stderr
    # the same metric declared lower-is-better: fewer parameters is an improvement, the budget holds
    relative = run(tiny, "--rank", "2", "--evaluator", f"{evaluator}:count", "--lower-is-better", "--max-drop",
                   "0", "--drop-type", "relative", "--report", report, "--overwrite")
    assert relative.exit_code == 0, relative.output
    metrics = json.loads(report.read_text())["metrics"]
    assert metrics["drop"] < 0 and metrics["passed"] is True
    assert metrics["drop"] == pytest.approx((metrics["compressed"] - metrics["baseline"]) / metrics["baseline"])


def test_evaluator_as_importable_module(tiny: pathlib.Path, tmp_path: pathlib.Path, monkeypatch) -> None:
    write_param_evaluator(tmp_path / "cli_params_metric.py")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    result = run("eval", tiny, "--evaluator", "cli_params_metric:count", "--json")
    assert result.exit_code == 0, result.output
    params = float(sum(t.numel() for t in torch.load(tiny, weights_only=True).values()))
    assert json.loads(result.stdout) == {"metric": "cli_params_metric:count", "value": params,
                                         "higher_is_better": True, "model": str(tiny)}


def test_builtin_dataset_on_the_example_model(lstm: pathlib.Path) -> None:
    report = lstm.with_name("r.json")
    result = run(lstm, "--format", "svd", "--rank", "4", "--eval", "japanese-vowels", "--report", report)
    assert result.exit_code == 0, result.output
    metrics = json.loads(report.read_text())["metrics"]
    assert metrics["baseline"] == pytest.approx(0.9757, abs=1e-3) and metrics["finetuned"] is None
    evaluated = run("eval", default_output_path(lstm, "svd", rank=4), "--eval", "japanese-vowels")
    assert evaluated.exit_code == 0, evaluated.output
    assert f"{metrics['compressed']:.6g}" in evaluated.stdout


# ---------------------------------------------------------------------- errors and warnings
def test_bad_inputs_are_one_line_errors(tiny: pathlib.Path, tmp_path: pathlib.Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    bad_data = tmp_path / "bad.npz"
    np.savez(bad_data, inputs=np.zeros((3, 4), dtype=np.float32), targets=np.zeros(3))
    cases = [
        [tmp_path / "missing.pt", "--rank", "2"],
        [garbage, "--rank", "2"],
        [tiny, "--rank", "2", "--eval", "no-such-dataset"],
        [tiny, "--rank", "2", "--eval", bad_data],
        [tiny, "--rank", "2", "--modes", "4,4x3"],
        [tiny, "--rank", "2", "--evaluator", "no_such_module_xyz:f"],
        ["inspect", tmp_path / "missing.pt"],
    ]
    for args in cases:
        result = run(*args)
        assert result.exit_code == 1, (args, result.output)
        one_error_line(result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz", "garbage.pt", "tiny.pt"]
    debug = run(garbage, "--rank", "2", "--debug")
    assert debug.exit_code == 1 and "Traceback" in debug.stderr and "kcompress: error:" in debug.stderr


def test_nothing_to_compress_is_an_error(tmp_path: pathlib.Path) -> None:
    linear = tmp_path / "linear.pt"  # one Linear layer: compressed only when --include names it
    torch.save({"weight": torch.randn(6, 4), "bias": torch.randn(6)}, linear)
    embedding = tmp_path / "embedding.pt"  # no layer kcompress knows
    torch.save({"embed.weight": torch.randn(10, 4)}, embedding)
    for path in (linear, embedding):
        result = run(path, "--rank", "2")
        assert result.exit_code == 1
        assert re.search(r"nothing to compress|no LSTM, GRU", one_error_line(result.stderr))
        assert not default_output_path(path, "kcp", rank=2).exists()
    assert run(linear, "--rank", "2", "--include", "*").exit_code == 0


@pytest.mark.parametrize(
    "args",
    [["--rank", "2", "--ratio", "3"], [], ["--rank", "0"], ["--format", "dense", "--rank", "2"],
     ["--rank", "2", "--no-such-option"], ["--rank", "2", "--max-drop", "0.1"],
     ["--rank", "2", "--finetune-epochs", "1"], ["--rank", "2", "--modes", "4,4"],
     ["--rank", "2", "--eval", "japanese-vowels", "--lower-is-better"]],
)
def test_usage_errors_exit_2(tiny: pathlib.Path, args: list[str]) -> None:
    result = run(tiny, *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tiny.parent.iterdir()) == ["tiny.pt"]


def test_warnings_are_single_lines(tiny: pathlib.Path) -> None:
    result = run(tiny, "--format", "svd", "--rank", "999")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("kcompress: warning:")]
    assert any("rank 999" in line for line in warnings), result.stderr


# ---------------------------------------------------------------------- progress and colour
def test_plain_progress_lines_when_not_a_terminal(tiny: pathlib.Path) -> None:
    result = run(tiny, "--format", "kcp", "--rank", "2", "--targets", "ih,hh")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert any(re.fullmatch(r"\[1/2\] rnn\.weight_ih_l0: relative error [\d.e-]+ \(\d+\.\d\d s\)", l) for l in lines)
    assert any(l.startswith("[2/2] rnn.weight_hh_l0: relative error") for l in lines)
    assert not COLOR.search(result.stderr + result.stdout) and "\r" not in result.stderr


def test_plain_progress_heartbeat_for_long_fits() -> None:
    lines: list[str] = []
    now = [0.0]
    progress = PlainProgress(lines.append, clock=lambda: now[0])
    progress(ProgressEvent("layer", "rnn.weight_ih_l0", 1, 1))
    for second, iteration in ((1.0, 1), (3.0, 2), (6.0, 3), (7.0, 4), (12.0, 5)):
        now[0] = second
        progress(ProgressEvent("iteration", "rnn.weight_ih_l0", iteration, 50, error=0.5 / iteration))
    progress(ProgressEvent("done", "rnn.weight_ih_l0", 1, 1, error=0.1))
    progress(ProgressEvent("resume", "sweep", message="0 of 3 trials already in x"))
    assert lines == ["      rnn.weight_ih_l0: iteration 3/50, error 0.1667",
                     "      rnn.weight_ih_l0: iteration 5/50, error 0.1",
                     "[1/1] rnn.weight_ih_l0: relative error 0.1 (12.00 s)", "0 of 3 trials already in x"]


def test_no_color_is_honoured(tiny: pathlib.Path, data: pathlib.Path) -> None:
    args = [tiny, "--rank", "2", "--eval", data, "--finetune-epochs", "1", "--overwrite"]
    coloured = run(*args, env={"FORCE_COLOR": "1", "NO_COLOR": None, "TERM": "xterm-256color"})
    assert coloured.exit_code == 0, coloured.output
    assert COLOR.search(coloured.stderr)  # rich bars on a (forced) terminal
    plain = run(*args, env={"FORCE_COLOR": "1", "NO_COLOR": "1", "TERM": "xterm-256color"})
    assert plain.exit_code == 0, plain.output
    assert not COLOR.search(plain.stderr + plain.stdout)


# ---------------------------------------------------------------------- inspect
def test_inspect(tiny: pathlib.Path) -> None:
    before = sha256(tiny)
    result = run("inspect", tiny, "--ranks", "2,4")
    assert result.exit_code == 0, result.output
    for text in ("layers found", "rnn", "LSTM", "head", "weight_ih_l0", "32x4", "MACs ratio", *COMPRESSION_FORMATS):
        assert text in result.stdout
    as_json = json.loads(run("inspect", tiny, "--ranks", "2", "--formats", "kcp,svd", "--json").stdout)
    assert [layer["name"] for layer in as_json["layers"]] == ["rnn", "head"]
    ih = next(m for m in as_json["matrices"] if m["name"] == "rnn.weight_ih_l0")
    svd = next(o for o in ih["options"] if o["format"] == "svd")
    assert svd["params"] == 2 * (32 + 4) and svd["macs_ratio"] == pytest.approx(32 * 4 / svd["macs"])
    assert sha256(tiny) == before and sorted(p.name for p in tiny.parent.iterdir()) == ["tiny.pt"]


# ---------------------------------------------------------------------- sweep
@pytest.mark.slow
def test_sweep_resumes_and_reports_the_front(tiny: pathlib.Path, tmp_path: pathlib.Path, monkeypatch) -> None:
    evaluator = write_param_evaluator(tmp_path / "sweep_metric.py")
    out = tmp_path / "sweep"
    args = ["sweep", tiny, "--formats", "kcp,svd", "--ranks", "1,2", "--evaluator", f"{evaluator}:count",
            "--jobs", "2", "--out", out]
    first = run(*args)
    assert first.exit_code == 0, first.output
    lines = (out / "trials.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 5 and all(r["status"] == "ok" for r in records), records
    assert records[0]["trial"]["format"] == "dense"  # the baseline runs first
    assert "Pareto front" in first.stdout and "5 trials (0 resumed)" in first.stdout
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert re.search(r"^\[5/5\] ", first.stderr, re.M)

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    (out / "pareto.png").unlink()
    second = run(*args, "--max-drop", "0")
    assert second.exit_code == 3, second.output  # every trial has fewer parameters: none within the budget
    assert "5 trials (5 resumed)" in second.stdout
    assert (out / "trials.jsonl").read_text().splitlines() == lines  # nothing rerun
    assert "matplotlib is not installed" in second.stderr and not (out / "pareto.png").exists()
    assert "budget not met" in second.stderr


def test_sweep_usage(tiny: pathlib.Path) -> None:
    assert run("sweep", tiny, "--ranks", "2").exit_code == 2  # no metric
    assert run("sweep", tiny, "--formats", "kcp,nope", "--eval", "japanese-vowels").exit_code == 2
    assert run("sweep", tiny, "--formats", "dense", "--eval", "japanese-vowels").exit_code == 2


# ---------------------------------------------------------------------- as subprocesses
def _entry_point() -> pathlib.Path:
    script = pathlib.Path(sys.executable).parent / ("kcompress.exe" if os.name == "nt" else "kcompress")
    if not script.exists():
        pytest.skip("the kcompress entry point is not installed in this environment")
    return script


@pytest.mark.slow
def test_installed_entry_point(tiny: pathlib.Path) -> None:
    report = tiny.with_name("r.json")
    env = {**os.environ, "NO_COLOR": "1"}
    # svd: its speed check on a 32x4 matrix is not slow enough to trip convert's rounding to 0
    result = subprocess.run([str(_entry_point()), str(tiny), "--format", "svd", "--rank", "2", "--report",
                             str(report)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^\[1/2\] rnn\.weight_ih_l0: relative error", result.stderr, re.M)  # ih and hh
    assert "kcompress: svd" in result.stdout and default_output_path(tiny, "svd", rank=2).is_file()
    validate_report_dict(json.loads(report.read_text()))
    failed = subprocess.run([str(_entry_point()), str(tiny.with_name("missing.pt")), "--rank", "2"],
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.strip().splitlines() == [one_error_line(failed.stderr)]


@pytest.mark.slow
def test_python_dash_m(tiny: pathlib.Path) -> None:
    version = subprocess.run([sys.executable, "-m", "kcompress", "--version"], capture_output=True, text=True,
                             timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("kcompress ")
    usage = subprocess.run([sys.executable, "-m", "kcompress", str(tiny), "--rank", "2", "--ratio", "2"],
                           capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and "Usage: kcompress" in usage.stderr


# ---------------------------------------------------------------------- docs
def test_cli_reference_is_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    current = (ROOT / "docs" / "cli.md").read_text(encoding="utf8")
    assert module.render() == current, "docs/cli.md is out of date: run python docs/gen_cli.py"


def test_the_commands_load_without_torch_so_help_is_fast() -> None:
    """``kcompress COMMAND --help`` imports the command's module only: none of them may load torch (it took
    seconds per --help); the library loads when a command runs."""
    code = ("import importlib, sys; from kcompress.cli.main import COMMANDS; "
            "[importlib.import_module('kcompress.cli.' + module) for module, _, _ in COMMANDS.values()]; "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False", result.stderr
