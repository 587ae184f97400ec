"""Smoke tests of the example scripts at reduced size (the real-model examples are in test_examples_real.py)."""

import subprocess
import sys

import pytest
import torch

from kcompress.io.models import SequenceClassifier
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # examples, subprocesses or exports: seconds each


def run(*args: str, timeout: int = 240) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_training_script_writes_a_loadable_classifier(tmp_path) -> None:
    output = tmp_path / "gru.pt"
    text = run("examples/japanese_vowels/train.py", "--cell", "gru", "--epochs", "2", "--output", str(output))
    assert "accuracy" in text.lower()
    model = SequenceClassifier.from_state_dict(torch.load(output, weights_only=True))
    assert model is not None and isinstance(model.rnn, torch.nn.GRU)


def test_adtn_digits_example_runs_quickly() -> None:
    pytest.importorskip("sklearn")
    text = run("examples/adtn_digits.py", "--quick", "--threads", "1")
    assert "adtn" in text and "dense" in text
