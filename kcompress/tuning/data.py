"""Sequence datasets: an in-memory padded batch container, the built-in datasets and user data files.

A :class:`SequenceData` holds ``inputs``, either float features ``(B, T, F)`` or integer token ids ``(B, T)``
(for models that start with an ``nn.Embedding``), zero-padded after each sequence's end, ``targets (B,)``
(class indices for classification, floats for regression) and optionally ``lengths (B,)``.
"""

from __future__ import annotations

import gzip
import math
import pathlib
import zipfile
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import numpy as np
import torch
from torch import Tensor

from kcompress.errors import KCompressError, error_line
from kcompress.io.files import check_memory

#: A batch as models take it: ``((inputs, lengths), targets)``, or ``(inputs, targets)`` without lengths.
Batch = tuple[Union[Tensor, tuple[Tensor, Tensor]], Tensor]

#: name -> one-line description (source and license)
BUILTIN_DATASETS: dict[str, str] = {
    "japanese-vowels": "UCI JapaneseVowels: 9 speakers' LPC cepstra, 12 channels x 7-29 steps, 270 train / "
    "370 test (CC BY 4.0; bundled with kcompress)",
}

_SPLITS = ("train", "test")

# Per-channel mean and (population) std of the JapaneseVowels TRAIN split over all time steps; both splits
# are standardised with these, so the test split never sees its own statistics.
_JAPANESE_VOWELS_MEAN = (
    0.869106, -0.554501, 0.246109, -0.267294, 0.218977, -0.210538,
    -0.174065, -0.051705, -0.204931, -0.181194, -0.023592, 0.086214,
)
_JAPANESE_VOWELS_STD = (
    0.487620, 0.391182, 0.300903, 0.305912, 0.269099, 0.168300,
    0.161225, 0.188340, 0.187724, 0.116917, 0.097637, 0.127547,
)


@dataclass
class SequenceData:
    """``inputs (B, T, F)`` float or ``(B, T)`` integer token ids, ``targets (B,)`` long or float (or ``(B, K)``
    float), ``lengths (B,)`` long.

    Padded steps (``t >= lengths[b]``) are zeros (token id 0). Shapes are checked on construction (KCompressError).
    """

    inputs: Tensor
    targets: Tensor
    lengths: Optional[Tensor] = None

    def __post_init__(self) -> None:
        _check_shapes(self.inputs, self.targets, self.lengths)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def num_features(self) -> Optional[int]:
        """F, the size of each time step (None for token ids)."""
        return None if self.is_tokens else self.inputs.shape[2]

    @property
    def is_tokens(self) -> bool:
        """True when the inputs are integer token ids ``(B, T)``."""
        return self.inputs.dim() == 2

    def subset(self, indices: Tensor) -> "SequenceData":
        """The samples at ``indices (K,)``, in that order."""
        lengths = None if self.lengths is None else self.lengths[indices]
        return SequenceData(self.inputs[indices], self.targets[indices], lengths)

    def split(self, fraction: float, seed: int = 0) -> tuple["SequenceData", "SequenceData"]:
        """``(rest, held_out)`` with a seeded random ``fraction`` of the samples held out (at least one each)."""
        if not 0.0 < fraction < 1.0:
            raise KCompressError(f"split fraction must be between 0 and 1, got {fraction}")
        if len(self) < 2:
            raise KCompressError(f"cannot split {len(self)} sample(s) into two parts")
        held = min(max(1, round(fraction * len(self))), len(self) - 1)
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self.subset(order[held:]), self.subset(order[:held])

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        """Yield ``((inputs (b, t, F), lengths (b,)), targets (b,))`` or ``(inputs, targets)`` without lengths.

        With lengths, each batch's time axis is cut to its longest sequence (``t <= T``). ``shuffle`` draws a
        seeded permutation (``seed``) without touching the global RNG.
        """
        if batch_size < 1:
            raise KCompressError(f"batch size must be at least 1, got {batch_size}")
        if shuffle:
            order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            yield self._batch(order[start : start + batch_size])

    def _batch(self, indices: Tensor) -> Batch:
        """One batch of the samples at ``indices``."""
        if self.lengths is None:
            return self.inputs[indices], self.targets[indices]
        lengths = self.lengths[indices]
        steps = int(lengths.max())
        return (self.inputs[indices, :steps], lengths), self.targets[indices]


def _check_shapes(inputs: Tensor, targets: Tensor, lengths: Optional[Tensor]) -> None:
    """Raise KCompressError unless inputs are (B, T, F) finite float or (B, T) integer (ids >= 0), targets
    (B, ...) (NaN allowed: unlabeled data for distillation; evaluation refuses them), lengths (B,) in 1..T."""
    if not _accepted_inputs(inputs):
        raise KCompressError(f"inputs must be float features (batch, time, features) or integer token ids "
                             f"(batch, time), got {_describe(inputs)}")
    if targets.dim() < 1 or targets.shape[0] != inputs.shape[0]:
        raise KCompressError(f"targets must have one entry per sample ({inputs.shape[0]}), got {_describe(targets)}")
    if targets.dim() > 1 and not targets.is_floating_point():
        raise KCompressError(f"class targets must be (batch,), got {_describe(targets)}")
    if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        sample = int((~torch.isfinite(inputs)).reshape(inputs.shape[0], -1).any(dim=1).nonzero()[0])
        raise KCompressError(f"inputs hold NaN or Inf values (first in sample {sample})")
    if not inputs.is_floating_point() and inputs.numel() and int(inputs.min()) < 0:
        raise KCompressError(f"token ids must be at least 0, got {int(inputs.min())}")
    if lengths is None:
        return
    if lengths.shape != (inputs.shape[0],) or lengths.is_floating_point() or lengths.is_complex():
        raise KCompressError(f"lengths must be integers of shape ({inputs.shape[0]},), got {_describe(lengths)}")
    if len(lengths) and (int(lengths.min()) < 1 or int(lengths.max()) > inputs.shape[1]):
        raise KCompressError(f"lengths must lie in 1..{inputs.shape[1]} (the padded length)")


def _accepted_inputs(inputs: Tensor) -> bool:
    """Float ``(B, T, F)`` features or integer (not bool) ``(B, T)`` token ids."""
    if inputs.dim() == 3:
        return inputs.is_floating_point()
    integer = not (inputs.is_floating_point() or inputs.is_complex() or inputs.dtype == torch.bool)
    return inputs.dim() == 2 and integer


def _describe(tensor: Tensor) -> str:
    """``"float32 (3, 4)"``."""
    return f"{str(tensor.dtype).replace('torch.', '')} {tuple(tensor.shape)}"


def load_builtin(name: str, split: str = "train") -> SequenceData:
    """A built-in dataset (see ``BUILTIN_DATASETS``) as standardised ``SequenceData``; ``split``: train|test."""
    if name not in _LOADERS:
        raise KCompressError(f"unknown dataset {name!r}; built-in datasets: {', '.join(BUILTIN_DATASETS)}")
    if split not in _SPLITS:
        raise KCompressError(f"unknown split {split!r}; use one of: {', '.join(_SPLITS)}")
    return _LOADERS[name](split)


def _japanese_vowels(split: str) -> SequenceData:
    """``inputs (B, 29 or 26, 12)`` standardised with the train statistics, ``targets`` speakers 0..8."""
    sequences, labels = read_bundled_ts("JapaneseVowels", split)
    mean, std = np.array(_JAPANESE_VOWELS_MEAN), np.array(_JAPANESE_VOWELS_STD)
    targets = torch.tensor([int(label) - 1 for label in labels], dtype=torch.long)
    return _padded([(seq.T - mean) / std for seq in sequences], targets)


def _padded(sequences: list[np.ndarray], targets: Tensor) -> SequenceData:
    """Zero-pad ``(T_b, F)`` arrays into ``SequenceData`` with lengths."""
    lengths = torch.tensor([len(seq) for seq in sequences], dtype=torch.long)
    inputs = torch.zeros(len(sequences), int(lengths.max()), sequences[0].shape[1])
    for row, seq in enumerate(sequences):
        inputs[row, : len(seq)] = torch.from_numpy(seq).float()
    return SequenceData(inputs, targets, lengths)


def read_bundled_ts(name: str, split: str) -> tuple[list[np.ndarray], list[str]]:
    """A .ts file bundled in ``kcompress/datasets`` (gzip): ``([(channels, T_b) arrays], [label strings])``."""
    path = pathlib.Path(__file__).resolve().parents[1] / "datasets" / f"{name}_{split.upper()}.ts.gz"
    if not path.is_file():
        raise KCompressError(f"{path} is missing: reinstall kcompress")
    with gzip.open(path, "rt", encoding="utf8") as handle:
        return _parse_ts(handle.read().splitlines())


def _parse_ts(lines: list[str]) -> tuple[list[np.ndarray], list[str]]:
    """Rows after ``@data``: ``channel:channel:...:label``, values comma-separated (``?`` -> NaN)."""
    sequences, labels, in_data = [], [], False
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.lower().startswith("@data"):
            in_data = True
        elif in_data:
            *channels, label = line.split(":")
            values = [[np.nan if v == "?" else float(v) for v in channel.split(",")] for channel in channels]
            sequences.append(np.array(values))
            labels.append(label)
    return sequences, labels


def load_data_file(path: Union[str, pathlib.Path]) -> SequenceData:
    """``SequenceData`` from a .pt/.pth (weights_only), .npz or .safetensors file holding ``inputs`` (float
    ``(B, T, F)`` features, or integer ``(B, T)`` token ids), ``targets`` and optionally ``lengths``. Float inputs
    become float32 and integer ones long; integer targets become long (classes), others float32."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise KCompressError(f"data file not found: {path}")
    tensors = _read_tensors(path)
    missing = [key for key in ("inputs", "targets") if key not in tensors]
    if missing:
        raise KCompressError(f"data file {path} lacks {' and '.join(map(repr, missing))} (found: {sorted(tensors)})")
    targets = tensors["targets"]
    targets = targets.long() if not (targets.is_floating_point() or targets.is_complex()) else targets.float()
    try:
        return SequenceData(_as_inputs(tensors["inputs"]), targets, _as_lengths(tensors.get("lengths")))
    except KCompressError as error:
        raise KCompressError(f"data file {path}: {error}") from None


def load_inputs_file(path: Union[str, pathlib.Path]) -> tuple[Tensor, Optional[Tensor]]:
    """``(inputs, lengths or None)`` of a data file as :func:`load_data_file` reads them; ``targets`` need not
    be there and are never read (unlabeled calibration data)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise KCompressError(f"data file not found: {path}")
    tensors = _read_tensors(path)
    if "inputs" not in tensors:
        raise KCompressError(f"data file {path} lacks 'inputs' (found: {sorted(tensors)})")
    inputs = _as_inputs(tensors["inputs"])
    placeholder = torch.zeros(inputs.shape[0]) if inputs.dim() > 0 else torch.zeros(0)
    try:
        lengths = _as_lengths(tensors.get("lengths"))
        _check_shapes(inputs, placeholder, lengths)
    except KCompressError as error:
        raise KCompressError(f"data file {path}: {error}") from None
    return inputs, lengths


def _as_inputs(inputs: Tensor) -> Tensor:
    """``(B, T, F)`` features as float32, integer ``(B, T)`` token ids as long; anything else unchanged (so the
    shape check names it)."""
    if inputs.dim() == 3 and not inputs.is_complex():
        return inputs.float()
    return inputs.long() if _accepted_inputs(inputs) else inputs


def _as_lengths(lengths: Optional[Tensor]) -> Optional[Tensor]:
    """Sequence lengths as long integers; floating point lengths must be whole numbers (7.0, never 7.5)."""
    if lengths is None:
        return None
    if lengths.is_complex():
        raise KCompressError("lengths must be whole numbers of time steps, got complex values")
    if lengths.is_floating_point():
        flat = lengths.reshape(-1)
        fractional = ~(torch.isfinite(flat) & (flat == torch.round(flat)))
        if bool(fractional.any()):
            sample = int(fractional.nonzero()[0, 0])
            raise KCompressError(f"lengths must be whole numbers of time steps, got {float(flat[sample]):g} "
                                 f"(sample {sample})")
    return lengths.long()


def _read_tensors(path: pathlib.Path) -> dict[str, Tensor]:
    """The named tensors stored in ``path`` (format chosen by suffix), after checking that what the file
    declares fits in memory (an ``.npz`` inflates: its arrays' declared sizes are checked before that)."""
    suffix = path.suffix.lower()
    if suffix not in (".pt", ".pth", ".npz", ".safetensors"):
        raise KCompressError(f"unsupported data file {path}: use .pt, .pth, .npz or .safetensors")
    check_memory(path, _npz_bytes(path) if suffix == ".npz" else path.stat().st_size, "the data", _WORKING_COPIES)
    try:
        tensors = _READERS[suffix](path)
    except Exception as error:  # any reader failure is the file's fault: report it in one line
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise KCompressError(f"cannot read data file {path}: {first_line}") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
        raise KCompressError(f"data file {path} must hold a dict of tensors (inputs, targets, lengths)")
    return tensors


def _npz_bytes(path: pathlib.Path) -> int:
    """The bytes an ``.npz``'s arrays declare (read from the zip directory and each ``.npy`` header, nothing
    inflated beyond the headers); a KCompressError when a header claims more than its member holds."""
    total = 0
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                with archive.open(member) as handle:
                    version = np.lib.format.read_magic(handle)
                    if version not in _NPY_HEADERS:
                        raise KCompressError(f"data file {path}: {member.filename} is .npy version {version}")
                    shape, _, dtype = _NPY_HEADERS[version](handle)
                if math.prod(shape) * dtype.itemsize > member.file_size:
                    raise KCompressError(f"data file {path}: {member.filename} declares {shape} {dtype} values, more "
                                         f"than its {member.file_size} bytes hold")
                total += member.file_size
    except KCompressError:
        raise
    except Exception as error:  # noqa: BLE001 - not a zip, a damaged member, an unknown .npy version
        raise KCompressError(f"cannot read data file {path}: {error_line(error)[:200]}") from None
    return total


def _read_pt(path: pathlib.Path) -> object:
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_npz(path: pathlib.Path) -> dict[str, Tensor]:
    with np.load(path, allow_pickle=False) as archive:
        return {key: torch.from_numpy(archive[key]) for key in archive.files}


def _read_safetensors(path: pathlib.Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


_LOADERS = {"japanese-vowels": _japanese_vowels}

_READERS = {".pt": _read_pt, ".pth": _read_pt, ".npz": _read_npz, ".safetensors": _read_safetensors}
#: the memory a data file's arrays take while loaded, checked (NaN test) and converted, in multiples of their size
_WORKING_COPIES = 3
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
