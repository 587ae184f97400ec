"""Typed format options through ``compress``: global, per override, from the CLI, and from old artifacts."""

from __future__ import annotations

import hashlib
import json
import pathlib
import warnings
from dataclasses import asdict

import pytest
import torch
from click.testing import CliRunner

from kcompress import compress
from kcompress.cli.main import app
from kcompress.config.compress import CompressConfig
from kcompress.errors import KCompressError, KCompressWarning
from kcompress.formats import KCPOptions, TreeOptions, build, get_format
from kcompress.io import file_sha256
from kcompress.io.models import SequenceClassifier
from kcompress.runs.sweep import expand_grid
from kcompress.runs.trials import TrialJob, TrialSpec, run_trial
from kcompress.tuning.evaluate import EvalSpec
from tests.runs.test_sweep import save_tiny_data, save_tiny_model

pytestmark = pytest.mark.usefixtures("steady_speed")


def tiny() -> SequenceClassifier:
    torch.manual_seed(0)
    return SequenceClassifier(4, 8, 3)


def matrices(model: torch.nn.Module) -> dict:
    return dict(model.rnn.matrices)


def test_fit_options_reach_the_fit_as_typed_options() -> None:
    model, report = compress(tiny(), "kcp", rank=2, order=2, targets="ih,hh",
                             fit_options={"max_iterations": 3, "init": "random"})
    for matrix in matrices(model).values():
        assert matrix.options == KCPOptions(max_iterations=3, init="random")


def test_unknown_and_bad_options_are_one_line_errors_naming_the_matrix_and_the_allowed_keys() -> None:
    with pytest.raises(KCompressError, match=r"rnn\.weight_ih_l0: unknown kcp options 'tol2'; allowed: algorithm, ") as error:
        compress(tiny(), "kcp", rank=2, fit_options={"tol2": 1})
    assert "\n" not in str(error.value)
    with pytest.raises(KCompressError, match="kcp option max_iterations must be at least 1, got 0"):
        compress(tiny(), "kcp", rank=2, fit_options={"max_iterations": 0})
    with pytest.raises(KCompressError, match="given twice"):
        compress(tiny(), "tt", rank=2, fit_options={"tol": 0.1, "min_sweep_gain": 0.2})


def test_overrides_set_options_per_matrix_and_a_new_format_drops_the_old_ones() -> None:
    overrides = {
        "rnn.weight_hh*": {"fit_options": {"max_iterations": 7}},
        "rnn.weight_ih*": {"format": "tt", "fit_options": {"max_sweeps": 1}},
    }
    model, _ = compress(tiny(), "kcp", rank=2, order=2, targets="ih,hh", overrides=overrides,
                        fit_options={"max_iterations": 3, "init": "random"})
    found = matrices(model)
    assert found["weight_hh_l0"].options == KCPOptions(max_iterations=7, init="random")
    assert found["weight_ih_l0"].options == TreeOptions(max_sweeps=1)
    with pytest.raises(KCompressError, match="override 'x': fit_options must be a dict"):
        compress(tiny(), "kcp", rank=2, overrides={"x": {"fit_options": 3}})


def test_old_keys_load_and_unknown_stored_keys_are_dropped_with_a_warning() -> None:
    config = {"format": "tt", "rank": 2, "options": {"n_sweeps": 2, "tol": 0.5},
              "tensorization": get_format("tt").default_tensorization(8, 6, 2).to_dict()}
    assert build(config).options == TreeOptions(max_sweeps=2, min_sweep_gain=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rebuilt = build({**config, "options": {"n_sweeps": 2, "steps": 10}})
    assert rebuilt.options == TreeOptions(max_sweeps=2)
    assert any(issubclass(w.category, KCompressWarning) and "'steps'" in str(w.message) for w in caught)


def test_cli_fit_option(tmp_path: pathlib.Path) -> None:
    model = save_tiny_model(tmp_path / "tiny.pt")
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(app, [str(model), "--format", "kcp", "--rank", "2", "--order", "2", "-q",
                                      "--fit-option", "max_iterations=4", "--fit-option", "init=random",
                                      "--fit-option", "mode_order=[1,0]", "-o", str(out), "--report",
                                      str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    options = json.loads((tmp_path / "r.json").read_text())["options"]["fit_options"]
    assert options == {"max_iterations": 4, "init": "random", "mode_order": [1, 0]}
    bad = CliRunner().invoke(app, [str(model), "--rank", "2", "--fit-option", "bogus=1", "-o",
                                   str(tmp_path / "bad.safetensors")])
    assert bad.exit_code == 1 and "unknown kcp options 'bogus'; allowed:" in bad.output
    assert not (tmp_path / "bad.safetensors").exists()
    usage = CliRunner().invoke(app, [str(model), "--rank", "2", "--fit-option", "bogus"])
    assert usage.exit_code == 2 and "KEY=VALUE" in usage.output


def test_sweep_trials_carry_fit_options_and_log_their_config(tmp_path: pathlib.Path) -> None:
    model = save_tiny_model(tmp_path / "tiny.pt")
    spec = EvalSpec(data=str(save_tiny_data(tmp_path / "d.npz")))
    log, sha = tmp_path / "trials.jsonl", file_sha256(model)
    _, kcp = expand_grid(["kcp"], [2], order=2, fit_options={"max_iterations": 3, "init": "random"})
    assert kcp.fit_options == (("init", "random"), ("max_iterations", 3)) and not kcp.baseline
    plain = TrialSpec("kcp", 2)  # a trial without options keeps the key it had before trials had options
    payload = {"trial": {k: v for k, v in asdict(plain).items() if k != "fit_options"}, "eval": {}, "input_sha256": "s"}
    assert plain.key("s", {}) == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]
    records = [run_trial(TrialJob(trial, trial.key(sha, spec.fingerprint()), str(model), sha, False, spec, str(log)))
               for trial in (kcp, TrialSpec("kcp", 2, fit_options=(("bogus", 1),)))]
    assert records[0]["status"] == "ok", records[0].get("error")
    assert CompressConfig.from_dict(records[0]["config"]) == kcp.config()
    assert records[0]["config"]["fit_options"] == {"init": "random", "max_iterations": 3}
    assert records[1]["status"] == "error" and "unknown kcp options 'bogus'" in records[1]["error"]
