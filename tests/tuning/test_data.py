"""SequenceData, the built-in JapaneseVowels dataset and user data files."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kcompress.errors import KCompressError
from kcompress.tuning import data as data_module
from kcompress.tuning.data import BUILTIN_DATASETS, SequenceData, load_builtin, load_data_file, read_bundled_ts


@pytest.fixture(scope="module")
def vowels() -> dict[str, SequenceData]:
    return {split: load_builtin("japanese-vowels", split) for split in ("train", "test")}


def small_data(with_lengths: bool = True) -> SequenceData:
    """5 sequences, T=4, F=3; lengths 1..4 with zero padding."""
    lengths = torch.tensor([4, 2, 3, 1, 4])
    inputs = torch.randn(5, 4, 3) * (torch.arange(4)[None, :, None] < lengths[:, None, None])
    return SequenceData(inputs, torch.tensor([0, 1, 2, 1, 0]), lengths if with_lengths else None)


def test_japanese_vowels_shapes(vowels: dict[str, SequenceData]) -> None:
    train, test = vowels["train"], vowels["test"]
    assert (len(train), len(test)) == (270, 370)
    assert train.num_features == test.num_features == 12
    for split in (train, test):
        assert split.targets.dtype == torch.long
        assert sorted(split.targets.unique().tolist()) == list(range(9))
    lengths = torch.cat([train.lengths, test.lengths])
    assert (int(lengths.min()), int(lengths.max())) == (7, 29)
    assert train.targets.bincount().tolist() == [30] * 9
    steps = torch.arange(test.inputs.shape[1])[None, :] >= test.lengths[:, None]
    assert test.inputs[steps].abs().max() == 0, "padding must be zeros"


def test_japanese_vowels_standardised_with_train_statistics(vowels: dict[str, SequenceData]) -> None:
    raw_train, _ = read_bundled_ts("JapaneseVowels", "train")
    frames = np.concatenate([seq.T for seq in raw_train])
    mean, std = np.array(data_module._JAPANESE_VOWELS_MEAN), np.array(data_module._JAPANESE_VOWELS_STD)
    np.testing.assert_allclose(mean, frames.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(std, frames.std(axis=0), atol=1e-6)

    train = vowels["train"]
    valid = train.inputs[torch.arange(train.inputs.shape[1])[None, :] < train.lengths[:, None]]
    torch.testing.assert_close(valid.mean(0), torch.zeros(12), atol=1e-4, rtol=0)
    torch.testing.assert_close(valid.std(0, unbiased=False), torch.ones(12), atol=1e-4, rtol=0)

    raw_test, labels = read_bundled_ts("JapaneseVowels", "test")
    test = vowels["test"]
    for row in (0, 123, 369):
        expected = (raw_test[row].T - mean) / std
        length = int(test.lengths[row])
        assert length == len(expected)
        np.testing.assert_allclose(test.inputs[row, :length].numpy(), expected, atol=1e-5)
        assert int(test.targets[row]) == int(labels[row]) - 1


def test_builtin_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "CC BY 4.0" in BUILTIN_DATASETS["japanese-vowels"]
    with pytest.raises(KCompressError, match="built-in datasets: japanese-vowels"):
        load_builtin("mnist", "train")
    with pytest.raises(KCompressError, match="unknown split"):
        load_builtin("japanese-vowels", "validation")
    monkeypatch.setattr(data_module, "__file__", "/nonexistent/kcompress/data.py")
    with pytest.raises(KCompressError, match="is missing"):
        load_builtin("japanese-vowels", "train")


def test_batches_with_lengths_trim_padding_and_cover_everything() -> None:
    data = small_data()
    batches = list(data.batches(2))
    assert len(batches) == 3
    (inputs, lengths), targets = batches[1]
    assert inputs.shape == (2, 3, 3) and lengths.tolist() == [3, 1] and targets.tolist() == [2, 1]
    torch.testing.assert_close(inputs, data.inputs[2:4, :3])
    shuffled = [b[1] for b in data.batches(2, shuffle=True, seed=7)]
    again = [b[1] for b in data.batches(2, shuffle=True, seed=7)]
    assert all(torch.equal(a, b) for a, b in zip(shuffled, again))
    assert sorted(torch.cat(shuffled).tolist()) == sorted(data.targets.tolist())


def test_batches_without_lengths() -> None:
    data = small_data(with_lengths=False)
    inputs, targets = next(data.batches(4))
    assert isinstance(inputs, torch.Tensor) and inputs.shape == (4, 4, 3) and targets.shape == (4,)


def test_split_is_seeded_and_disjoint() -> None:
    data = SequenceData(torch.arange(20.0).reshape(10, 1, 2), torch.arange(10))
    rest, held = data.split(0.3, seed=1)
    assert (len(rest), len(held)) == (7, 3)
    assert sorted(rest.targets.tolist() + held.targets.tolist()) == list(range(10))
    assert torch.equal(held.targets, data.split(0.3, seed=1)[1].targets)
    assert not torch.equal(held.targets, data.split(0.3, seed=2)[1].targets)
    with pytest.raises(KCompressError):
        data.split(1.0)


@pytest.mark.parametrize(
    "inputs, targets, lengths",
    [
        (torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), None),
        (torch.zeros(4, 3, 2), torch.zeros(5, dtype=torch.long), None),
        (torch.zeros(4, 3, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long), None),
        (torch.zeros(4, 3, 2), torch.zeros(4, dtype=torch.long), torch.tensor([1, 2, 3, 4])),
        (torch.zeros(4, 3, 2), torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 2, 3])),
    ],
)
def test_bad_shapes_raise(inputs: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor) -> None:
    with pytest.raises(KCompressError):
        SequenceData(inputs, targets, lengths)


def _save(path: pathlib.Path, tensors: dict[str, torch.Tensor]) -> None:
    if path.suffix == ".npz":
        np.savez(path, **{key: value.numpy() for key, value in tensors.items()})
    elif path.suffix == ".safetensors":
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)


@pytest.mark.parametrize("suffix", [".pt", ".npz", ".safetensors"])
@pytest.mark.parametrize("with_lengths", [True, False])
def test_data_file_round_trip(tmp_path: pathlib.Path, suffix: str, with_lengths: bool) -> None:
    data = small_data(with_lengths)
    tensors = {"inputs": data.inputs.double(), "targets": data.targets.int()}
    if with_lengths:
        tensors["lengths"] = data.lengths.int()
    path = tmp_path / f"data{suffix}"
    _save(path, tensors)
    loaded = load_data_file(path)
    assert loaded.inputs.dtype == torch.float32 and loaded.targets.dtype == torch.long
    torch.testing.assert_close(loaded.inputs, data.inputs)
    assert torch.equal(loaded.targets, data.targets)
    assert (loaded.lengths is None) == (not with_lengths)
    if with_lengths:
        assert torch.equal(loaded.lengths, data.lengths)


def test_regression_targets_stay_float(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "regression.npz"
    _save(path, {"inputs": torch.zeros(3, 2, 1), "targets": torch.tensor([0.5, 1.5, 2.5], dtype=torch.float64)})
    assert load_data_file(path).targets.dtype == torch.float32


class _NotATensor:
    pass


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.pt", None, "not found"),
        ("data.csv", b"1,2,3", "unsupported"),
        ("garbage.pt", b"not a checkpoint", "cannot read"),
        ("garbage.npz", b"PK\x03\x04 broken", "cannot read"),
        ("garbage.safetensors", b"\x00" * 20, "cannot read"),
        ("pickled.pt", {"inputs": torch.zeros(2, 3, 1), "targets": torch.zeros(2), "x": _NotATensor()}, "cannot read"),
        ("list.pt", [torch.zeros(2, 3, 1)], "dict of tensors"),
        ("nokeys.npz", {"x": torch.zeros(2, 3, 1)}, "lacks 'inputs' and 'targets'"),
        ("notargets.safetensors", {"inputs": torch.zeros(2, 3, 1)}, "lacks 'targets'"),
        ("flat.pt", {"inputs": torch.zeros(2, 3), "targets": torch.zeros(2)}, r"\(batch, time, features\)"),
        ("count.npz", {"inputs": torch.zeros(2, 3, 1), "targets": torch.zeros(3)}, "one entry per sample"),
        ("long.pt", {"inputs": torch.zeros(2, 3, 1), "targets": torch.zeros(2), "lengths": torch.tensor([3, 4])},
         r"1\.\.3"),
    ],
)
def test_bad_data_files_raise_one_line_errors(
    tmp_path: pathlib.Path, name: str, content: object, message: str
) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict) and path.suffix != ".pt":
        _save(path, content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(KCompressError, match=message) as error:
        load_data_file(path)
    assert "\n" not in str(error.value)
