"""Unlabeled distillation: teacher-labelled augmentation of the calibration inputs and intermediate matching."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from kcompress import compress
from kcompress.calibration.augment import AugmentedCalls, augment_call
from kcompress.calibration.moments import calibration_set
from kcompress.config.calibration import Augmentation
from kcompress.errors import KCompressError
from kcompress.io.models import SequenceClassifier
from kcompress.nn.paths import compressed_layers, trained
from kcompress.tuning.agreement import best_index
from kcompress.tuning.data import SequenceData
from kcompress.tuning.evaluate import run_model
from kcompress.tuning.finetune import finetune
from kcompress.tuning.layer_match import captured, matching_loss


def _data(rows: int = 40) -> SequenceData:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 9, (rows,), generator=generator)
    real = torch.arange(8)[None, :, None] < lengths[:, None, None]
    x = (torch.randn(rows, 8, 6, generator=generator) * torch.linspace(0.5, 3, 6) + 1) * real
    return SequenceData(x, torch.randint(0, 3, (rows,), generator=generator), lengths)


def _calls(data: SequenceData) -> list[tuple]:
    return calibration_set(data, 32, 0.25, 0).fit


def _epochs(calls: list[tuple], seed: int, augmentation: Augmentation = Augmentation(), passes: int = 2) -> list:
    source = AugmentedCalls(calls, augmentation, seed)
    return [[batch for batch, _placeholder in source] for _ in range(passes)]


def _same(first: list, second: list) -> bool:
    return all(torch.equal(a, b) for x, y in zip(first, second) for a, b in zip(x, y))


def test_augmentation_is_seeded_and_new_each_epoch() -> None:
    calls = _calls(_data())
    first, second = _epochs(calls, 3), _epochs(calls, 3)
    assert len(first[0]) == len(calls) * (1 + Augmentation().copies)
    assert all(_same(a, b) for a, b in zip(first, second))  # same seed: the same inputs, epoch by epoch
    assert _same(first[0][: len(calls)], calls)  # each epoch starts with the calibration calls as they are
    augmented = slice(len(calls), None)
    assert not _same(first[0][augmented], first[1][augmented])  # new copies each epoch
    assert not _same(first[0][augmented], _epochs(calls, 4)[0][augmented])


def test_augmentation_keeps_padding_zero_and_lengths_real() -> None:
    calls = _calls(_data())
    for call in (batch for epoch in _epochs(calls, 0) for batch in epoch[len(calls):]):
        x, lengths = call
        assert x.shape[1] == int(lengths.max()) and bool((lengths >= 2).all())
        padded = torch.arange(x.shape[1])[None, :] >= lengths[:, None]
        assert bool((x[padded] == 0).all())  # nothing leaks into padded steps
        assert bool((x[~padded] != 0).all())  # real steps are real data (jittered)
    original = calls[0]
    kept = augment_call(original, Augmentation(crop=1.0), torch.ones(6), torch.Generator().manual_seed(0))
    assert torch.equal(kept[1], original[1])  # no cropping: the lengths stay


def test_augmentation_parts() -> None:
    """Nothing but jitter: noise of ``jitter`` times each feature's std, on real steps only; nothing at all:
    the call itself; the calibration inputs themselves are never changed."""
    calls = _calls(_data(400))
    before = [tuple(t.clone() for t in call) for call in calls]
    jitter = AugmentedCalls(calls, Augmentation(copies=1, mixup=False, jitter=0.5, crop=1.0), 0)
    features = torch.cat([x[torch.arange(x.shape[1])[None] < lengths[:, None]] for x, lengths in calls])
    assert torch.allclose(jitter.std, features.std(0, unbiased=False), rtol=1e-5)
    noise = torch.cat([(b[0] - a[0])[torch.arange(a[0].shape[1])[None] < a[1][:, None]]
                       for (a, _), (b, _) in zip(list(jitter)[: len(calls)], list(jitter)[len(calls):])])
    assert torch.allclose(noise.std(0) / jitter.std, torch.full((6,), 0.5), rtol=0.1)
    plain = augment_call(calls[0], Augmentation(mixup=False, jitter=0.0, crop=1.0), jitter.std, torch.Generator())
    assert _same([plain], [calls[0]])
    mixed = augment_call(calls[0], Augmentation(jitter=0.0, crop=1.0), jitter.std, torch.Generator())
    assert not torch.equal(mixed[0], calls[0][0])
    assert _same(before, calls)


def test_token_and_unbatched_lengths_inputs_are_not_augmented() -> None:
    tokens = [(torch.randint(0, 5, (4, 7)),)]
    assert not AugmentedCalls(tokens, Augmentation(), 0).active
    assert len(list(AugmentedCalls(tokens, Augmentation(), 0))) == 1
    full = [(torch.randn(4, 7, 3),)]  # no lengths: every step real, no crop, same length
    (x,), _ = list(AugmentedCalls(full, Augmentation(copies=1), 0))[1]
    assert x.shape == (4, 7, 3) and bool((x != 0).all())


@pytest.mark.parametrize("bad", [{"augment_copies": -1}, {"jitter": -0.1}, {"crop": 0.0}, {"crop": 1.5},
                                 {"mixup": "yes"}, {"match_weight": -1.0}])
def test_bad_distillation_options_are_one_line_errors(bad: dict) -> None:
    model = SequenceClassifier(6, 8, 3)
    with pytest.raises(KCompressError, match=next(iter(bad))):
        compress(model, "svd", ratio=2, targets="ih,hh", check_speed=False, calibration=_data(),
                 calibrate_samples=32, distill_epochs=1, calibrate_options=bad)


def _compressed(fmt: str = "tt") -> tuple[SequenceClassifier, torch.nn.Module]:
    torch.manual_seed(0)
    model = SequenceClassifier(6, 8, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compressed, _ = compress(model, fmt, ratio=2, targets="ih,hh", check_speed=False)
    return model, compressed


def test_intermediate_loss_is_zero_for_the_teacher_itself_and_reaches_the_factors() -> None:
    teacher, student = _compressed()
    call = _calls(_data())[0]
    for model in (copy.deepcopy(teacher), student):
        with captured(model, ["rnn"]) as mine, captured(teacher, ["rnn"]) as reference:
            run_model(model, call)
            with torch.no_grad():
                run_model(teacher, call)
        assert mine["rnn"].shape == (int(call[1].sum()), 8)  # packed: the real steps only
        loss = matching_loss(mine, reference)
        if model is not student:
            assert float(loss.detach()) == 0.0
    assert float(loss.detach()) > 0
    with trained(student):
        with captured(student, ["rnn"]) as mine, captured(teacher, ["rnn"]) as reference:
            run_model(student, call)
            run_model(teacher, call)
        matching_loss(mine, reference).backward()
    factors = [p for layer in compressed_layers(student).values() for p in layer.parameters() if p.dim() > 1]
    assert factors and all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in factors)
    with pytest.raises(KCompressError, match="no layer named nope"):
        with captured(student, ["nope"]):
            pass
    with pytest.raises(KCompressError, match="needs a teacher"):
        finetune(student, _data(), epochs=1, match_layers=["rnn"])


def test_distillation_reads_no_labels_and_is_seeded() -> None:
    """The same factors with real labels, NaN labels and again with the same seed; matching every compressed
    layer is recorded in the report."""
    model = SequenceClassifier(6, 8, 3)
    labelled = _data()
    unlabelled = SequenceData(labelled.inputs, torch.full((len(labelled),), float("nan")), labelled.lengths)
    states, reports = [], []
    for data in (labelled, unlabelled, labelled):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compressed, report = compress(model, "tt", ratio=2, targets="ih,hh", check_speed=False, calibration=data,
                                          calibrate_samples=32, distill_epochs=3, seed=1,
                                          calibrate_options={"iterations": 10, "ridge": 1.0, "patience": 5})
        states.append(compressed.state_dict())
        reports.append(report)
    for state in states[1:]:
        assert all(torch.equal(state[name], value) for name, value in states[0].items())
    assert reports[0].calibration["distill"]["matched_layers"] == ["rnn"]
    assert reports[0].calibration["options"]["augment_copies"] == Augmentation().copies


def test_distill_lr_auto_keeps_the_rate_closest_to_the_teacher() -> None:
    """Each candidate rate distils from the same calibrated start (the fixed-rate runs reproduce it) and the
    model kept is the one whose held-out outputs are closest to the dense model's."""
    model = SequenceClassifier(6, 8, 3)
    options = {"iterations": 10, "ridge": 1.0, "gate_weights": False, "patience": 5}

    def run(rate: object) -> tuple:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return compress(model, "svd", ratio=2, targets="ih,hh", check_speed=False, calibration=_data(),
                            calibrate_samples=32, distill_epochs=3, calibrate_options={**options, "distill_lr": rate})

    compressed, report = run("auto")
    record = report.calibration["distill"]
    tried = {candidate["lr"]: candidate for candidate in record["lr_candidates"]}
    assert sorted(tried) == [1e-3, 1e-2]
    assert record["lr"] == list(tried)[best_index([tried[rate]["agreement"] for rate in tried])]
    for rate, candidate in tried.items():
        fixed, fixed_report = run(rate)
        assert fixed_report.calibration["distill"]["lr_candidates"] == []
        assert fixed_report.calibration["distill"]["agreement"] == pytest.approx(candidate["agreement"])
        if rate == record["lr"]:
            state = fixed.state_dict()
            assert all(torch.equal(state[name], value) for name, value in compressed.state_dict().items())


@pytest.mark.parametrize("bad", [0.0, -1e-3, float("nan"), "fast", True])
def test_bad_distillation_rates_are_one_line_errors(bad: object) -> None:
    with pytest.raises(KCompressError, match="distill_lr must be a positive number or 'auto'"):
        compress(SequenceClassifier(6, 8, 3), "svd", ratio=2, targets="ih,hh", check_speed=False,
                 calibration=_data(), calibrate_samples=32, distill_epochs=1, calibrate_options={"distill_lr": bad})
