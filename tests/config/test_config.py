"""CompressConfig: checked on construction, round-trips through its dict, and is what compress runs."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

import kcompress
from kcompress import compress
from kcompress.config import BudgetOptions, CompressConfig, SelectionOptions
from kcompress.config.compress import KEYWORDS
from kcompress.errors import KCompressError
from kcompress.io.models import SequenceClassifier

pytestmark = pytest.mark.usefixtures("steady_speed")


def tiny() -> SequenceClassifier:
    torch.manual_seed(0)
    return SequenceClassifier(4, 8, 3)


def test_round_trip_through_json() -> None:
    config = CompressConfig.from_keywords(
        format="tt", rank=[2, 3], modes=((4, 8), (2, 2)), targets="ih",
        overrides={"rnn.weight_ih*": {"rank": 2, "fit_options": {"max_sweeps": 1}}},
        fit_options={"min_sweep_gain": 0.0}, seed=3, execution={"rnn": "materialized"})
    data = json.loads(json.dumps(config.to_dict()))
    assert data["version"] == 2 and data["budget"]["rank"] == [2, 3] and data["selection"]["targets"] == "ih"
    assert CompressConfig.from_dict(data) == config
    assert config.target_kinds == ("ih",) and config.base["rank"] == [2, 3]
    assert config.replace(seed=4).seed == 4
    nested = CompressConfig(format="tt", budget=BudgetOptions(rank=[2, 3]), selection=SelectionOptions(targets="ih"))
    assert nested.budget == config.budget and nested.selection == config.selection


def test_version_one_flat_dicts_still_load() -> None:
    """Reports and artifacts written before the tree stored compress's flat keywords (version 1)."""
    flat = {"version": 1, "format": "svd", "rank": 2, "ratio": None, "targets": "ih", "gates": "fused",
            "calibrate_samples": 64, "calibrate_options": {"ridge": 1.0}, "distill_epochs": 3, "execution": "auto",
            "check_speed": False, "allocate": "uniform", "objective": "size", "seed": 5}
    config = CompressConfig.from_dict(flat)
    assert config == CompressConfig.from_keywords("svd", rank=2, targets="ih", calibrate_samples=64,
                                                  calibrate_options={"ridge": 1.0}, distill_epochs=3,
                                                  check_speed=False, allocate="uniform", seed=5)
    assert config.calibration.samples == 64 and config.calibration.ridge == 1.0
    assert config.recovery.distill_epochs == 3 and not config.execution.check_speed


@pytest.mark.parametrize("settings, message", [
    ({}, "exactly one of rank and ratio"),
    ({"rank": 2, "ratio": 4}, "exactly one of rank and ratio"),
    ({"rank": 0}, "rank must be"),
    ({"rank": 2, "targets": "xy"}, "targets must be"),
    ({"rank": 2, "gates": "some"}, "gates must be"),
    ({"rank": 2, "seed": 1.5}, "seed must be an integer"),
    ({"rank": 2, "overrides": {"*": {"colour": 1}}}, "unknown key"),
    ({"rank": 2, "execution": "fastest"}, "execution must be"),
    ({"rank": 2, "distill_epochs": -1}, "distill_epochs must be an integer >= 0"),
    ({"rank": 2, "calibrate_options": {"nope": 1}}, "nope"),
    ({"format": ["kcp", "svd"], "allocate": "auto", "rank": 2}, "chooses the ranks"),
    ({"format": ["kcp", "dense"], "allocate": "auto", "ratio": 4}, "not a compression format"),
])
def test_every_setting_is_checked_on_construction(settings: dict, message: str) -> None:
    with pytest.raises(KCompressError, match=message) as error:
        CompressConfig.from_keywords(**settings)
    assert "\n" not in str(error.value)


def test_from_dict_refuses_unknown_keys_and_other_versions() -> None:
    with pytest.raises(KCompressError, match="unknown compress setting.*colour; allowed: "):
        CompressConfig.from_dict({"rank": 2, "colour": "red"})
    assert (CompressConfig.from_dict({"rank": 2, "threads": 1}, extra="ignore")
            == CompressConfig.from_keywords(rank=2))
    with pytest.raises(KCompressError, match="unknown compress setting.*colour; allowed: format, fit_options"):
        CompressConfig.from_dict({**CompressConfig().to_dict(), "colour": "red"})
    with pytest.raises(KCompressError, match="version 9"):
        CompressConfig.from_dict({"rank": 2, "version": 9})


def test_compress_keywords_are_the_config_fields_with_the_same_defaults() -> None:
    parameters = inspect.signature(compress).parameters
    settings = set(parameters) - {"model", "inplace", "progress", "calibration", "config"}
    assert settings == {*KEYWORDS, "format", "fit_options", "overrides", "seed", "calibrate_options"}
    defaults = CompressConfig.from_keywords(rank=8)
    for keyword, (group, name) in KEYWORDS.items():  # each keyword's default is its field's default
        if keyword != "rank":
            assert getattr(getattr(defaults, group), name) == parameters[keyword].default, keyword
    assert kcompress.CompressConfig is CompressConfig


def test_compress_with_a_config_equals_compress_with_keywords() -> None:
    config = CompressConfig.from_keywords(format="svd", rank=2, targets="ih", seed=1)
    by_config, report = compress(tiny(), config=config)
    by_keywords, _ = compress(tiny(), "svd", 2, targets="ih", seed=1)
    for (name, a), (_, b) in zip(by_config.state_dict().items(), by_keywords.state_dict().items()):
        assert torch.equal(a, b), name
    assert CompressConfig.from_dict(report.options, extra="ignore") == config.for_data(calibrated=False)
    assert compress(tiny(), config)[1].options == report.options  # the config may also come second
    with pytest.raises(KCompressError, match="either in config or as keywords.*rank"):
        compress(tiny(), config=config, rank=4)


def test_the_torch_free_names_match_the_library() -> None:
    """``kcompress.names`` lists choices for the CLI's --help without importing torch; each list is the
    library's own."""
    from kcompress import names
    from kcompress.formats import compression_formats

    assert list(names.COMPRESSION_FORMATS) == compression_formats()
    assert CompressConfig.from_keywords(rank=2).calibration.samples == names.DEFAULT_SAMPLES
