"""The user's path with their own model, end to end: a module class of their own (Embedding, a 2-layer
bidirectional batch_first GRU, a Linear head) in their own .py file, saved as a state dict -> the CLI
compresses it and evaluates it through their class on integer-token data -> ``load(path, model=...)``
into a fresh instance of their class -> the same outputs as compressing in-process -> fine-tuning with
progress."""

from __future__ import annotations

import importlib.util
import json
import pathlib
from typing import Any

import numpy as np
import torch
from click.testing import CliRunner

import kcompress
from kcompress.cli.main import app

TAGGER = '''
import torch
from torch import nn


class TokenTagger(nn.Module):
    """Token ids (B, T) -> class logits (B, 3) from the last step of a bidirectional batch_first GRU."""

    def __init__(self, vocab=30, dim=8, hidden=12, classes=3):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.gru = nn.GRU(dim, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, tokens):
        output, _ = self.gru(self.embedding(tokens))
        return self.head(output[:, -1])
'''


def _user_class(path: pathlib.Path) -> Any:
    spec = importlib.util.spec_from_file_location("user_tagger", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TokenTagger


def test_own_model_from_state_dict_to_fine_tuning(tmp_path: pathlib.Path, capsys, monkeypatch) -> None:
    code, checkpoint, tokens = tmp_path / "tagger.py", tmp_path / "tagger.pt", tmp_path / "tokens.npz"
    code.write_text(TAGGER)
    TokenTagger = _user_class(code)
    torch.manual_seed(0)
    dense = TokenTagger()
    torch.save(dense.state_dict(), checkpoint)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30, (48, 6))
    np.savez(tokens, inputs=ids.astype(np.int64), targets=ids[:, -1] % 3)

    # 1. the CLI, evaluating through the user's class on token data
    monkeypatch.setattr("kcompress.runs.convert.measured_speedup",
                        lambda matrix, *args, **kwargs: kcompress.nn.speed.Speed(2.0, 0.0))  # tiny: timing is noise
    artifact, report = tmp_path / "tagger.svd.safetensors", tmp_path / "report.json"
    result = CliRunner().invoke(app, [str(checkpoint), "--model", f"{code}:TokenTagger", "--format", "svd",
                                      "--rank", "3", "--eval", str(tokens), "-o", str(artifact),
                                      "--report", str(report), "--threads", "1"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(report.read_text())["metrics"]
    data = kcompress.load_data_file(tokens)
    assert metrics["baseline"] == kcompress.evaluate(dense, data)  # the user's forward on the user's module

    # 2. load into the user's own (batch_first) model, 3. same outputs as compressing in-process
    loaded = kcompress.load(artifact, model=TokenTagger())
    assert loaded.gru.batch_first and loaded.gru.bidirectional and loaded.gru.num_layers == 2
    in_process, in_report = kcompress.compress(dense, format="svd", rank=3, check_speed=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(data.inputs), in_process(data.inputs), rtol=1e-5, atol=1e-6)
    assert metrics["compressed"] == kcompress.evaluate(loaded, data)
    assert json.loads(report.read_text())["summary"]["model_compression_ratio"] == in_report.model_compression_ratio

    # 4. fine-tune by distillation from the dense model, with progress on stderr
    capsys.readouterr()
    tuned = kcompress.finetune(loaded, data, teacher=dense, epochs=2, lr=1e-2, progress=True)
    assert tuned.metric == "distill_loss" and "fine-tune epoch 2/2" in capsys.readouterr().err
