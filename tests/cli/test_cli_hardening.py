"""What an attacker or an unlucky CI job tries on the command line: output paths checked before any work and
written all or none, bad inputs and options refused in one line, broken evaluation data refused, SIGTERM
cleaned up, stale temporary files removed, byte-identical artifacts from the same input, options and seed."""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import hashlib
import importlib
import json
import multiprocessing
import os
import pathlib
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from typing import Iterator

import numpy as np
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from torch import nn

from kcompress import KCompressError, compress
from kcompress.cli.main import app
from kcompress.io import atomic_write, load, save_artifact
from kcompress.io.models import SequenceClassifier
from kcompress.runs.executors import TrialExecutor, open_executor, scheduler_address
from tests.conftest import EXAMPLE_LSTM, ROOT
from tests.runs.test_sweep import save_tiny_data, save_tiny_model

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

    monkeypatch.setattr("kcompress.io.files.atomic_write", failing)
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


# ---------------------------------------------------------------------- hardening round 2 (issue 29)
def test_a_legacy_pickled_model_is_refused_naming_its_globals(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save({"state_dict": nn.LSTM(4, 8)}, path, _use_new_zipfile_serialization=False, pickle_protocol=4)
    result = run(path, "--rank", "2")
    line = error_line(result)
    assert result.exit_code == 1 and "needs the Python globals torch.nn.modules.rnn.LSTM" in line, line
    assert "UnpicklingError" not in result.stderr and "Weights only" not in result.stderr


def test_a_fifo_output_is_refused_even_with_overwrite(tiny: pathlib.Path) -> None:
    fifo = tiny.with_name("out.safetensors")
    os.mkfifo(fifo)
    for option in ("-o", "--report"):
        result = run(tiny, "--format", "svd", "--rank", "2", option, fifo, "--overwrite")
        assert result.exit_code == 1 and "is a FIFO, not a regular file" in error_line(result)
        assert stat.S_ISFIFO(fifo.lstat().st_mode) and _names(tiny.parent) == ["out.safetensors", "tiny.pt"]


def test_an_empty_layer_is_one_line(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "empty.pt"
    torch.save({"rnn.weight_ih_l0": torch.zeros(256, 0), "rnn.weight_hh_l0": torch.zeros(256, 64)}, path)
    for command in (["compress", path, "--rank", "2"], ["inspect", path]):
        result = run(*command)
        assert result.exit_code == 1 and "rnn.weight_ih_l0 has shape (256, 0)" in error_line(result)
        assert "unexpected" not in result.stderr


def test_eval_refuses_an_artifact_with_nan_in_an_untouched_tensor(tiny: pathlib.Path) -> None:
    artifact = tiny.with_name("a.safetensors")
    assert run(tiny, "--format", "svd", "--rank", "2", "-o", artifact, "-q").exit_code == 0
    data = artifact.read_bytes()
    size = int.from_bytes(data[:8], "little")
    tensors = safetensors.torch.load(data)
    tensors["head.bias"] = torch.full_like(tensors["head.bias"], float("nan"))
    metadata = json.loads(data[8:8 + size])["__metadata__"]
    artifact.write_bytes(safetensors.torch.save(tensors, metadata=metadata))
    result = run("eval", artifact, "--eval", save_tiny_data(tiny.with_name("d.npz")))
    assert result.exit_code == 1 and "head.bias contains NaN or Inf values" in error_line(result)


@pytest.mark.parametrize("inputs, needle", [
    (np.ones((12, 5), np.int64), "holds integer token ids (batch, time), but the model takes float features"),
    (np.zeros((12, 5, 6), np.float32), "holds float features (batch, time, 6), but the model takes float features "
                                       "(batch, time, 4)"),
], ids=["token-ids", "width"])
def test_data_that_does_not_fit_the_model_names_the_file(tiny: pathlib.Path, inputs: np.ndarray, needle: str) -> None:
    data = _data(tiny.with_name("bad.npz"), inputs=inputs)
    for command in (["eval", tiny, "--eval", data], [tiny, "--format", "svd", "--rank", "2", "--eval", data]):
        result = run(*command)
        line = error_line(result)
        assert result.exit_code == 1 and f"{data} {needle}" in line and "unexpected" not in line, line
    assert _names(tiny.parent) == ["bad.npz", "tiny.pt"]


def test_kcp_with_min_error_change_0(tiny: pathlib.Path) -> None:
    result = run(tiny, "--format", "kcp", "--rank", "2", "--order", "3", "--fit-option", "min_error_change=0",
                 "--fit-option", "max_iterations=5", "-q")
    assert result.exit_code == 0, result.output


def test_finetune_data_with_a_builtin_dataset_is_used(tmp_path: pathlib.Path) -> None:
    """A 13-feature --finetune-data next to --eval japanese-vowels: the file is read (it was silently ignored),
    and refused before any fit since it does not fit the 12-feature model."""
    data = _data(tmp_path / "thirteen.npz", inputs=np.zeros((12, 5, 13), np.float32))
    result = run(EXAMPLE_LSTM, "--format", "svd", "--rank", "2", "--eval", "japanese-vowels", "--finetune-epochs", "1",
                 "--finetune-data", data, "-o", tmp_path / "out.safetensors")
    line = error_line(result)
    assert result.exit_code == 1 and f"{data} holds float features (batch, time, 13)" in line, line
    assert "fitting" not in result.stderr and _names(tmp_path) == ["thirteen.npz"]


def test_machine_settings_stay_out_of_the_artifact(tiny: pathlib.Path) -> None:
    """The same command with one thread and with two writes the same bytes; the report keeps the counts."""
    digests = []
    for threads in ("1", "2"):
        out, report = tiny.with_name(f"t{threads}.safetensors"), tiny.with_name(f"t{threads}.json")
        result = run(tiny, "--format", "svd", "--rank", "2", "--execution", "factorized", "--threads", threads,
                     "-o", out, "--report", report, "-q")
        assert result.exit_code == 0, result.output
        assert json.loads(report.read_text())["options"]["threads"]["model"] == int(threads)
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


# ---------------------------------------------------------------------- sweeps: a failed baseline, signals
@pytest.fixture
def in_process_trials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Sweep trials on a thread of this process (no worker processes to start: fast)."""
    monkeypatch.setattr("kcompress.runs.sweep.open_executor",
                        lambda jobs, scheduler, timeout: TrialExecutor(futures.ThreadPoolExecutor(1), "a thread"))


@pytest.mark.parametrize("case", ["refused-checkpoint", "labels-out-of-range"])
def test_a_sweep_whose_baseline_fails_creates_nothing(tmp_path: pathlib.Path, in_process_trials: None,
                                                      case: str) -> None:
    model = save_tiny_model(tmp_path / "m.pt")
    data = save_tiny_data(tmp_path / "d.npz")
    if case == "refused-checkpoint":
        torch.save({"state_dict": nn.LSTM(4, 8)}, model, _use_new_zipfile_serialization=False)
    else:
        data = _data(tmp_path / "d.npz", targets=np.full(12, 7))
    before = _names(tmp_path)
    result = run("sweep", model, "--formats", "svd", "--ranks", "1", "--eval", data)
    assert result.exit_code == 1 and "the dense baseline could not be measured" in error_line(result)
    assert _names(tmp_path) == before  # no m.pt.sweep/, no trials.jsonl


def _busy_worker_pool() -> tuple[TrialExecutor, multiprocessing.Process]:
    """A one-process local pool whose worker is in the middle of a minute-long task."""
    executor = open_executor(1)
    executor.executor.submit(time.sleep, 60)
    deadline = time.monotonic() + 20
    while not getattr(executor.executor, "_processes", None) and time.monotonic() < deadline:
        time.sleep(0.05)
    (process,) = executor.executor._processes.values()
    return executor, process


def test_an_interrupted_sweep_terminates_its_busy_workers() -> None:
    """What SIGTERM (or Ctrl-C) to a sweep driver does on its way out: the pool is closed with cancel, and
    a worker in the middle of a long fit is terminated instead of finished (the driver hung on it)."""
    executor, process = _busy_worker_pool()
    start = time.monotonic()
    executor.close(cancel=True)
    while _alive(process.pid) and time.monotonic() - start < 5:  # the pool reaps it: Process.join may not see it
        time.sleep(0.05)
    assert not _alive(process.pid) and time.monotonic() - start < 5


_DRIVER = """
import sys, time
from kcompress.runs.executors import open_executor
executor = open_executor(1)
executor.executor.submit(time.sleep, 60)
while not executor.executor._processes:
    time.sleep(0.05)
print(*executor.executor._processes, flush=True)
time.sleep(60)
"""


def test_workers_of_a_killed_driver_exit() -> None:
    """SIGKILL to a sweep driver: its worker notices (its parent's sentinel) and exits within seconds instead
    of living on as an orphan."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen([sys.executable, "-c", _DRIVER], stdout=subprocess.PIPE, text=True, env=env) as driver:
        try:
            worker = int(driver.stdout.readline())
        finally:
            driver.kill()
    deadline = time.monotonic() + 5
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped by init, counts as gone)."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------------- Dask scheduler addresses
@pytest.mark.parametrize("address, source", [("notaurl", "--scheduler notaurl"), ("tcp://host", "--scheduler"),
                                             ("http://127.0.0.1:8786", "--scheduler"), ("tcp://h:99999", "--scheduler")])
def test_a_bad_scheduler_address_is_one_line(address: str, source: str) -> None:
    with pytest.raises(KCompressError, match=f"^{re.escape(source)}.*not a Dask scheduler address"):
        scheduler_address(address)


def test_a_bad_scheduler_address_from_the_environment_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "notaurl")
    with pytest.raises(KCompressError, match=r"^\$DASK_SCHEDULER_ADDRESS=notaurl: not a Dask scheduler address"):
        scheduler_address(None)
    assert scheduler_address("127.0.0.1:8786") == "tcp://127.0.0.1:8786"


@contextlib.contextmanager
def _server(kind: str) -> Iterator[str]:
    """``tcp://127.0.0.1:PORT`` of a server that is no Dask scheduler: ``silent`` accepts and never answers,
    ``http`` is a web server, ``closed`` listens nowhere."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    if kind == "closed":
        listener.close()
        yield f"tcp://127.0.0.1:{port}"
        return
    listener.listen(8)
    accepted: list[socket.socket] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = listener.accept()
                accepted.append(connection)
                if kind == "http":
                    connection.recv(4096)
                    connection.sendall(b"HTTP/1.0 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"tcp://127.0.0.1:{port}"
    finally:
        listener.close()
        for connection in accepted:
            connection.close()


@pytest.mark.parametrize("kind", ["closed", "silent", "http"])
def test_a_scheduler_that_does_not_answer_fails_within_the_timeout(kind: str) -> None:
    pytest.importorskip("distributed")
    with _server(kind) as address:
        start = time.monotonic()
        with pytest.raises(KCompressError, match=f"^cannot connect to the Dask scheduler at {re.escape(address)}: "):
            open_executor(1, address, timeout=0.5)
        assert time.monotonic() - start < 3


def test_tls_without_certificates_is_one_line() -> None:
    pytest.importorskip("distributed")
    with pytest.raises(KCompressError, match=r"tls:// needs certificates"):
        open_executor(1, "tls://127.0.0.1:1", timeout=0.5)


_MYMODEL = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])
"""


def test_a_trusted_pickled_model_finds_its_class_in_the_users_file(tmp_path: pathlib.Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole model pickled from ``mymodel.py``: with --trust-checkpoint it loads from any working directory
    (the checkpoint's folder and --model's file's folder are importable while it is unpickled)."""
    code, models = tmp_path / "code", tmp_path / "models"
    code.mkdir()
    models.mkdir()
    (code / "mymodel.py").write_text(_MYMODEL)
    sys.path.insert(0, str(code))
    try:
        torch.save(importlib.import_module("mymodel").Net(), models / "m.pt")
    finally:
        sys.path.remove(str(code))
        del sys.modules["mymodel"]
    monkeypatch.chdir(tmp_path)
    result = run(models / "m.pt", "--format", "svd", "--rank", "2", "--trust-checkpoint", "--model",
                 code / "mymodel.py:Net", "-o", tmp_path / "out.safetensors", "-q")
    assert result.exit_code == 0, result.output
    monkeypatch.delitem(sys.modules, "mymodel", raising=False)
    result = run("inspect", models / "m.pt", "--trust-checkpoint")
    line = error_line(result)
    assert "No module named 'mymodel'" in line and "run kcompress from the folder that holds it" in line, line


def test_inspect_summarises_and_details_on_request(tmp_path: pathlib.Path) -> None:
    """A 2-layer bidirectional GRU: a summary of a few dozen lines (it printed 270), every matrix with --details;
    and a model of thousands of layers is inspected in about the time it takes to load."""
    path = tmp_path / "bigru.pt"
    torch.save(SequenceClassifier(12, 64, 9, num_layers=2, cell="gru", bidirectional=True).state_dict(), path)
    summary = run("inspect", path)
    assert summary.exit_code == 0, summary.output
    assert "8 matrices (compressed by default; 102,912 params dense)" in summary.stdout
    assert "rnn.weight_hh_l1_reverse (192x64" not in summary.stdout and "--details" in summary.stdout
    assert len(summary.stdout.splitlines()) < 60
    details = run("inspect", path, "--details")
    assert "rnn.weight_hh_l1_reverse (192x64" in details.stdout and len(details.stdout.splitlines()) > 200
    many = tmp_path / "many.pt"
    torch.save({f"l{i}.weight": torch.zeros(2, 3) for i in range(3000)}, many)
    start = time.monotonic()
    result = run("inspect", many, "--formats", "kcp,svd", "--ranks", "2")
    assert result.exit_code == 0 and "... and 2,988 more layers" in result.stdout
    assert time.monotonic() - start < 10
