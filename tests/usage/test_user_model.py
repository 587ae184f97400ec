"""``--model FILE.py:CLASS``: the user's own module (Embedding + batch_first GRU + Linear) evaluated from the
CLI by the user's own evaluator, every problem found before any fit, and imports that leave sys.path alone."""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from kcompress.cli.main import app
from kcompress.formats import Factorization
from kcompress.io import default_output_path

TAGGER = '''
import torch
from torch import nn


class TokenTagger(nn.Module):
    """Token ids (B, T) -> class logits (B, 3) from the last step of a batch_first GRU."""

    def __init__(self, vocab=20, dim=8, hidden=16, classes=3):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.gru = nn.GRU(dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens):
        output, _ = self.gru(self.embedding(tokens))
        return self.head(output[:, -1])


class NeedsArguments(TokenTagger):
    def __init__(self, vocab):
        super().__init__(vocab)


class Wider(TokenTagger):
    def __init__(self):
        super().__init__(hidden=12)


def accuracy(model):
    """Agreement with a fixed rule on fixed random tokens (the user's own metric)."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 20, (64, 7), generator=generator)
    with torch.no_grad():
        return (model(tokens).argmax(1) == tokens[:, -1] % 3).float().mean().item()


def broken(model):
    raise RuntimeError("the metric is broken")
'''


def run(*args: Any) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def tagger(tmp_path: pathlib.Path) -> pathlib.Path:
    """tagger.py (the user's code) and tagger.pt (its trained-looking state dict) in tmp_path."""
    source = tmp_path / "tagger.py"
    source.write_text(TAGGER)
    namespace: dict[str, Any] = {}
    exec(compile(TAGGER, str(source), "exec"), namespace)
    torch.manual_seed(0)
    torch.save(namespace["TokenTagger"]().state_dict(), tmp_path / "tagger.pt")
    return tmp_path


def _user_module(folder: pathlib.Path) -> dict[str, Any]:
    namespace: dict[str, Any] = {}
    exec(compile(TAGGER, str(folder / "tagger.py"), "exec"), namespace)
    return namespace


def test_compress_and_evaluate_the_users_own_model(tagger: pathlib.Path) -> None:
    checkpoint, code, report = tagger / "tagger.pt", tagger / "tagger.py", tagger / "r.json"
    result = run(checkpoint, "--model", f"{code}:TokenTagger", "--evaluator", f"{code}:accuracy", "--format", "svd",
                 "--rank", "2", "--targets", "ih,hh", "--report", report)
    assert result.exit_code == 0, result.output
    user = _user_module(tagger)
    dense = user["TokenTagger"]()
    dense.load_state_dict(torch.load(checkpoint, weights_only=True))
    metrics = json.loads(report.read_text())["metrics"]
    assert metrics["baseline"] == user["accuracy"](dense)  # the user's forward ran on the user's module
    assert 0.0 <= metrics["compressed"] <= 1.0 and "accuracy of the compressed model" in result.stderr
    artifact = default_output_path(checkpoint, "svd", rank=2)
    evaluated = run("eval", artifact, "--model", f"{code}:TokenTagger", "--evaluator", f"{code}:accuracy", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["value"] == metrics["compressed"]  # the artifact restored into the class


def test_weights_only_without_model_fails_before_any_fit(tagger: pathlib.Path, monkeypatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a fit started before the error was found")

    monkeypatch.setattr(Factorization, "fit", classmethod(refuse))
    code = tagger / "tagger.py"
    cases = [
        ([], "weights only"),  # no --model: the standalone model cannot run the user's forward
        (["--model", f"{code}:TokenTagger", "--evaluator", f"{code}:broken"], "the metric is broken"),
        (["--model", f"{code}:NeedsArguments"], "without arguments"),
        (["--model", f"{code}:Wider"], "does not fit model"),
        (["--model", f"{code}:accuracy"], "not a torch nn.Module class"),
        (["--model", f"{code}:Missing"], "has no class 'Missing'"),
        (["--model", "TokenTagger"], "module:class"),
    ]
    for extra, needle in cases:
        args = ["--evaluator", f"{code}:accuracy", *extra] if "--evaluator" not in extra else extra
        result = run(tagger / "tagger.pt", "--rank", "2", *args)
        assert result.exit_code in (1, 2), (extra, result.output)
        errors = [line for line in result.stderr.splitlines() if line.startswith("kcompress: error:")]
        assert len(errors) == 1 and needle in errors[0], (extra, result.stderr)
    assert sorted(p.name for p in tagger.iterdir()) == ["tagger.pt", "tagger.py"]


def test_a_failed_import_names_the_folder_searched(tagger: pathlib.Path, monkeypatch) -> None:
    monkeypatch.chdir(tagger)
    result = run("tagger.pt", "--rank", "2", "--model", "no_such_module_xyz:TokenTagger", "--evaluator",
                 "tagger.py:accuracy")
    assert result.exit_code == 1
    assert f"searched {tagger}" in result.stderr and "no_such_module_xyz" in result.stderr
    missing = run("tagger.pt", "--rank", "2", "--model", "gone.py:TokenTagger", "--evaluator", "tagger.py:accuracy")
    assert missing.exit_code == 1 and f"looked in {tagger}" in missing.stderr


def test_importing_user_code_leaves_sys_path_alone(tagger: pathlib.Path, monkeypatch) -> None:
    monkeypatch.chdir(tagger)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "tagger", raising=False)
    before = list(sys.path)
    result = run("eval", "tagger.pt", "--model", "tagger:TokenTagger", "--evaluator", "tagger:accuracy", "--json")
    assert result.exit_code == 0, result.output
    assert sys.path == before
    assert json.loads(result.stdout)["metric"] == "tagger:accuracy"


def test_a_sweep_trial_builds_the_users_model_from_shipped_files(tagger: pathlib.Path) -> None:
    """A trial on a worker without the user's disk: the checkpoint and tagger.py arrive as bytes."""
    from kcompress.io import file_sha256
    from kcompress.runs.trials import TrialJob, TrialSpec, execute_trial
    from kcompress.tuning.evaluate import EvalSpec

    checkpoint, code = tagger / "tagger.pt", tagger / "tagger.py"
    spec = EvalSpec(evaluator=f"{code}:accuracy")
    job = TrialJob(TrialSpec("svd", 2), "k", str(checkpoint), file_sha256(checkpoint), False, spec,
                   str(tagger / "trials.jsonl"), model_class=f"{code}:TokenTagger")
    assert job.files() == [str(checkpoint), str(code)]
    here = execute_trial(job)
    shipped = execute_trial(job, {path: pathlib.Path(path).read_bytes() for path in job.files()})
    assert here["status"] == "ok" and shipped["status"] == "ok", (here, shipped)
    assert {k: v for k, v in here.items() if k not in ("seconds", "finished")} == \
        {k: v for k, v in shipped.items() if k not in ("seconds", "finished")}
    assert not (tagger / "trials.jsonl").exists()  # a worker never writes the log
