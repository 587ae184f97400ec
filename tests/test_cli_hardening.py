"""What an attacker or an unlucky CI job tries on the command line: output paths checked before any work and
written all or none, bad inputs and options refused in one line, broken evaluation data refused, SIGTERM
cleaned up, stale temporary files removed, byte-identical artifacts from the same input, options and seed."""

from __future__ import annotations

import hashlib
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from kcompress import KCompressError, compress
from kcompress.cli.main import app
from kcompress.io import atomic_write, default_output_path, load, save_artifact

from .conftest import ROOT
from .test_sweep import save_tiny_data, save_tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::kcompress.errors.KCompressWarning")


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The single ``kcompress: error:`` line of a failed run (and no traceback)."""
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("kcompress: error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def tiny(tmp_path: pathlib.Path) -> pathlib.Path:
    return save_tiny_model(tmp_path / "tiny.pt")


def _names(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------- outputs: checked first, all or none
def test_every_output_path_is_checked_before_any_work(tiny: pathlib.Path) -> None:
    existing = tiny.with_name("old.json")
    existing.write_text("keep")
    cases = [(["--report", tiny.parent / "missing" / "r.json"], "--report", "does not exist"),
             (["--markdown", tiny / "r.md"], "--markdown", "is a file, not a directory"),
             (["--report", existing], "--report", "exists; pass --overwrite"),
             (["--report", tiny.with_name("r.txt"), "--markdown", tiny.with_name("r.txt")], "--markdown", "also"),
             (["-o", tiny.parent / "missing" / "a.safetensors"], "--output", "does not exist")]
    for options, option, needle in cases:
        result = run(tiny, "--format", "svd", "--rank", "2", *options)
        assert result.exit_code == 1, result.output
        line = error_line(result)
        assert option in line and needle in line, line
        assert _names(tiny.parent) == ["old.json", "tiny.pt"] and existing.read_text() == "keep"


def test_outputs_are_written_all_or_none(tiny: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(path: pathlib.Path, data: bytes, overwrite: bool) -> None:
        if path.suffix == ".md":
            raise KCompressError(f"cannot write {path} (No space left on device)")
        atomic_write(path, data, overwrite)

    monkeypatch.setattr("kcompress.cli.compress_cmd.atomic_write", failing)
    result = run(tiny, "--format", "svd", "--rank", "2", "--report", tiny.with_name("r.json"),
                 "--markdown", tiny.with_name("r.md"))
    assert result.exit_code == 1 and "No space left" in error_line(result)
    assert _names(tiny.parent) == ["tiny.pt"]


# ---------------------------------------------------------------------- inputs and options
def test_unusable_inputs_get_the_tools_own_line(tiny: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fifo = tiny.with_name("pipe")
    os.mkfifo(fifo)
    cases = [(tiny.parent, "is a directory"), (fifo, "is a FIFO"), (pathlib.Path("/dev/zero"), "character device")]
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if pathlib.Path(p) == tiny else real_access(p, mode))
    cases.append((tiny, "permission denied"))
    data = save_tiny_data(tiny.with_name("data.npz"))
    for command, options in ((["compress"], ["--rank", "2"]), (["inspect"], []), (["eval"], ["--eval", data])):
        for path, needle in cases:
            result = run(*command, path, *options)
            assert result.exit_code == 1, (command, path, result.output)
            line = error_line(result)
            assert needle in line and "not found" not in line, line


def test_integer_weights_get_a_helpful_message(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "quantized.pt"
    torch.save({"rnn.weight_ih_l0": torch.randint(-8, 8, (32, 4), dtype=torch.int8),
                "rnn.weight_hh_l0": torch.randint(-8, 8, (32, 8), dtype=torch.int8)}, path)
    result = run(path, "--rank", "2")
    assert result.exit_code == 1 and "int8" in error_line(result) and "dequantized" in error_line(result)


@pytest.mark.parametrize("options", [
    ["--seed", "-1"], ["--seed", str(2**32)], ["--order", "100"], ["--ratio", "nan"], ["--ratio", "inf"],
    ["--eval", "DATA", "--max-drop", "nan"], ["--eval", "DATA", "--max-drop", "inf"],
    ["--eval", "DATA", "--max-drop", "-0.1"], ["--eval", "DATA", "--finetune-epochs", "1", "--finetune-lr", "nan"],
], ids=lambda o: " ".join(o))
def test_out_of_range_options_are_usage_errors(tiny: pathlib.Path, options: list[str]) -> None:
    data = save_tiny_data(tiny.with_name("data.npz"))
    rank = [] if "--ratio" in options else ["--rank", "2"]
    result = run(tiny, *rank, *[str(data) if o == "DATA" else o for o in options])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "unexpected" not in result.output
    assert _names(tiny.parent) == ["data.npz", "tiny.pt"]


# ---------------------------------------------------------------------- evaluation data
def _data(path: pathlib.Path, **changes: np.ndarray) -> pathlib.Path:
    rng = np.random.default_rng(0)
    arrays = {"inputs": rng.standard_normal((12, 5, 4)).astype(np.float32), "targets": rng.integers(0, 3, 12)}
    np.savez(path, **{**arrays, **changes})
    return path


@pytest.mark.parametrize("changes, needle, task", [
    ({"targets": np.full(12, 7)}, "class targets must lie in 0..2", "classification"),
    ({"targets": np.full(12, -1)}, "class targets must lie in 0..2", "classification"),
    ({"targets": np.zeros(12, dtype=np.float32) + 0.5}, "integer class targets", "classification"),
    ({"inputs": np.full((12, 5, 4), np.nan, dtype=np.float32)}, "inputs hold NaN or Inf", "classification"),
    ({"inputs": np.zeros((12, 5), dtype=np.float32)}, "inputs must be", "classification"),
    ({"targets": np.full((12, 3), np.nan, dtype=np.float32)}, "regression targets hold NaN", "regression"),
], ids=["above", "negative", "float-targets", "nan-inputs", "shape", "nan-regression-targets"])
def test_broken_evaluation_data_fails_before_any_fit(tiny: pathlib.Path, changes: dict, needle: str,
                                                     task: str) -> None:
    data = _data(tiny.with_name("bad.npz"), **changes)
    result = run(tiny, "--format", "svd", "--rank", "2", "--eval", data, "--task", task, "--max-drop", "0.5")
    assert result.exit_code == 1, result.output
    assert needle in error_line(result)
    assert "fitting" not in result.stderr and _names(tiny.parent) == ["bad.npz", "tiny.pt"]


# ---------------------------------------------------------------------- signals and temporary files
_SIGTERM_MID_WRITE = """
import os, signal, sys
real_fsync = os.fsync
def fsync(fd):  # the artifact's bytes are in its temporary file: now the CI job is cancelled
    real_fsync(fd)
    os.kill(os.getpid(), signal.SIGTERM)
os.fsync = fsync
from kcompress.cli.main import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_sigterm_mid_write_leaves_nothing(tiny: pathlib.Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", _SIGTERM_MID_WRITE, str(tiny), "--format", "svd", "--rank", "2"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if "SIGTERM" in line] == \
        ["kcompress: error: interrupted by SIGTERM"]
    assert _names(tiny.parent) == ["tiny.pt"]


@pytest.mark.slow
def test_sigint_while_starting_prints_one_line(tiny: pathlib.Path, delay: float = 0.5) -> None:
    """Ctrl-C while torch is still importing (or the command has just begun): one line, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "kcompress", str(tiny), "--format", "svd", "--rank", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        process.wait(timeout=delay)
        pytest.skip("the command finished before the signal")
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode in (130, -signal.SIGINT), stderr
    assert "Traceback" not in stderr
    assert [line for line in stderr.splitlines() if "SIGINT" in line] == ["kcompress: error: interrupted by SIGINT"]
    assert _names(tiny.parent) == ["tiny.pt"]


def test_a_later_write_removes_stale_temporary_files(tmp_path: pathlib.Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    target = tmp_path / "out.safetensors"
    stale = tmp_path / f".out.safetensors.{gone.pid}-0123abcd.kcompress-tmp"
    alive = tmp_path / f".out.safetensors.{os.getpid()}-89abcdef.kcompress-tmp"
    other = tmp_path / f".other.safetensors.{gone.pid}-0123abcd.kcompress-tmp"
    for path in (stale, alive, other):
        path.write_bytes(b"partial")
    compressed, report = compress(nn.Linear(4, 4), "svd", rank=1, include=["*"], check_speed=False)
    save_artifact(compressed, report, target)
    assert _names(tmp_path) == sorted([target.name, alive.name, other.name])


# ---------------------------------------------------------------------- reproducible artifacts
def test_same_input_options_and_seed_give_a_byte_identical_artifact(tiny: pathlib.Path) -> None:
    digests = []
    for name in ("a", "b"):
        out = tiny.with_name(f"{name}.safetensors")
        result = run(tiny, "--format", "kcp", "--rank", "2", "--targets", "ih,hh", "--seed", "5",
                     "--execution", "factorized", "-o", out, "-q")
        assert result.exit_code == 0, result.output
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_timings_stay_in_the_report_not_in_the_artifact(tmp_path: pathlib.Path) -> None:
    compressed, report = compress(nn.LSTM(4, 8), "kcp", rank=2, check_speed=False)
    first = save_artifact(compressed, report, tmp_path / "a.safetensors").read_bytes()
    for row in report.matrices:
        row.fit_seconds, row.measured_speedup, row.speed_spread = row.fit_seconds + 7.0, 0.01, 0.5
    report.warnings.append("weight_ih_l0: measured 100.0x slower than the dense product at batch 16")
    assert save_artifact(compressed, report, tmp_path / "b.safetensors").read_bytes() == first
    assert report.matrices[0].fit_seconds >= 7.0  # the report itself keeps them


def test_an_auto_plan_is_stored_as_asked_not_as_measured(tmp_path: pathlib.Path) -> None:
    """``execution="auto"`` decides by timing on this machine; the artifact records the request, so what a
    measurement chose never changes its bytes, and ``load`` decides again where it runs."""
    compressed, report = compress(nn.LSTM(4, 8), "svd", rank=2, execution="auto", check_speed=False)
    first = save_artifact(compressed, report, tmp_path / "a.safetensors").read_bytes()
    for mode in ("factorized", "materialized"):  # whatever the measurement had picked
        compressed.set_execution(dict.fromkeys(compressed.matrices, mode), dict.fromkeys(compressed.matrices, "auto"))
        for row in report.matrices:
            row.execution = mode
        assert save_artifact(compressed, report, tmp_path / f"{mode}.safetensors").read_bytes() == first
    loaded = load(tmp_path / "a.safetensors")
    assert set(loaded.requested.values()) == {"auto"}
    assert set(loaded.execution.values()) <= {"factorized", "materialized"}
    x = torch.randn(5, 3, 4)
    torch.testing.assert_close(loaded(x)[0], compressed(x)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["kcp", "tt", "svd", "ht"])
def test_an_all_zero_matrix_compresses_to_zero(fmt: str) -> None:
    lstm = nn.LSTM(12, 16)
    with torch.no_grad():
        lstm.weight_ih_l0.zero_()
    compressed, report = compress(lstm, fmt, rank=4, check_speed=False)
    assert torch.equal(compressed.matrices["weight_ih_l0"].reconstruct(), torch.zeros(64, 12))
    assert report.matrices[0].relative_error == 0.0
