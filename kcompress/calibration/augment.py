"""Teacher-labelled augmentation for unlabeled distillation: new inputs made from the calibration inputs.

Distillation needs no labels (the teacher labels whatever it is shown), so with a few dozen calibration
sequences each epoch can also show perturbed copies of them. :class:`AugmentedCalls` is a re-iterable of
finetune batches ``(call, placeholder)``: every pass (one epoch) yields the calibration calls as they are,
then ``copies`` augmented copies of each, drawn from a generator seeded with ``(seed, pass number)``. Each
sequence of a copy is, in this order:

- cropped in time (with probability 1/2, when the call carries lengths): a random window keeping at least
  ``crop`` of its real steps, moved to step 0;
- mixed (``mixup``): ``λ x + (1 − λ) x'``, ``λ ~ U(0.5, 1)``, with another sequence of the batch resampled
  (linear interpolation) to the same length, so the result stays closest to its own sequence;
- jittered: Gaussian noise of ``jitter`` times each feature's standard deviation over the real steps of
  all calibration calls.

Only real steps are touched: padded steps (``t >= length``) stay zero and a crop's new length is passed
on. A call is ``(x (B, T, F) float, [lengths (B,) integer], ...)``; calls whose first input is not a float
``(B, T, F)`` tensor (e.g. token ids) are yielded as they are, never augmented. Targets are never read.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kcompress.calibration.moments import Inputs, batch_rows
from kcompress.config.calibration import Augmentation


class AugmentedCalls:
    """The finetune batches of one distillation: each pass is one epoch (see the module doc)."""

    def __init__(self, calls: Sequence[Inputs], augmentation: Augmentation, seed: int = 0) -> None:
        self.calls = list(calls)
        self.augmentation = augmentation
        self.seed = seed
        self.passes = 0
        usable = [call for call in self.calls if _augmentable(call)]
        self.std: Optional[Tensor] = _feature_std(usable) if usable else None

    @property
    def active(self) -> bool:
        """Whether any call is augmented at all."""
        return self.augmentation.copies > 0 and self.std is not None

    def __iter__(self) -> Iterator[tuple[Inputs, Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.passes)
        self.passes += 1
        for call in self.calls:
            yield call, _placeholder(call)
        if not self.active:
            return
        assert self.std is not None  # active implies a std
        for _ in range(self.augmentation.copies):
            for call in self.calls:
                if _augmentable(call):
                    augmented = augment_call(call, self.augmentation, self.std, generator)
                    yield augmented, _placeholder(augmented)


def augment_call(call: Inputs, augmentation: Augmentation, std: Tensor, generator: torch.Generator) -> Inputs:
    """One augmented copy of ``call`` (see the module doc); ``std (F,)`` the per-feature noise scale."""
    x, lengths = call[0], _lengths(call)
    batch, steps, _ = x.shape
    real = lengths if lengths is not None else torch.full((batch,), steps, dtype=torch.long)
    partners = torch.randperm(batch, generator=generator)
    out = torch.zeros_like(x)
    kept = real.clone()
    for row in range(batch):
        length = int(real[row])
        sequence = x[row, :length]
        if lengths is not None and augmentation.crop < 1 and float(torch.rand((), generator=generator)) < 0.5:
            fraction = augmentation.crop + (1 - augmentation.crop) * float(torch.rand((), generator=generator))
            window = min(length, max(2, round(length * fraction)))
            start = int(torch.randint(0, length - window + 1, (), generator=generator))
            sequence, length = sequence[start : start + window], window
        if augmentation.mixup:
            weight = 0.5 + 0.5 * float(torch.rand((), generator=generator))
            partner = x[partners[row], : int(real[partners[row]])]
            sequence = weight * sequence + (1 - weight) * _resampled(partner, length)
        if augmentation.jitter > 0:
            noise = torch.randn(sequence.shape, generator=generator, dtype=sequence.dtype).to(sequence.device)
            sequence = sequence + augmentation.jitter * std.to(sequence) * noise
        out[row, :length] = sequence
        kept[row] = length
    if lengths is None:
        return (out, *call[1:])
    return (out[:, : int(kept.max())], kept.to(lengths.dtype), *call[2:])


def _augmentable(call: Inputs) -> bool:
    """The first input is float ``(B, T, F)``."""
    return isinstance(call[0], Tensor) and call[0].dim() == 3 and call[0].is_floating_point()


def _lengths(call: Inputs) -> Optional[Tensor]:
    """The second positional input when it is an integer ``(B,)`` tensor of sequence lengths, else None."""
    if len(call) < 2 or not isinstance(call[1], Tensor):
        return None
    lengths = call[1]
    integer = not (lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool)
    return lengths.cpu().long() if integer and lengths.shape == (call[0].shape[0],) else None


def _real_steps(call: Inputs) -> Tensor:
    """``(rows, F)``: the call's features at its real steps."""
    x, lengths = call[0], _lengths(call)
    if lengths is None:
        return x.reshape(-1, x.shape[-1])
    return x[(torch.arange(x.shape[1]) < lengths[:, None]).to(x.device)]


def _feature_std(calls: Sequence[Inputs]) -> Tensor:
    """``(F,)`` each feature's standard deviation over the real steps of ``calls`` (0 for a single step)."""
    steps = torch.cat([_real_steps(call).double() for call in calls])
    return steps.std(0, unbiased=False).float().cpu() if len(steps) > 1 else torch.zeros(steps.shape[1])


def _resampled(sequence: Tensor, length: int) -> Tensor:
    """``(length, F)``: ``sequence (L, F)`` linearly interpolated over time."""
    if sequence.shape[0] == length:
        return sequence
    if sequence.shape[0] == 1:
        return sequence.expand(length, -1)
    return F.interpolate(sequence.T[None], size=length, mode="linear", align_corners=True)[0].T


def _placeholder(call: Inputs) -> Tensor:
    """Finetune's target slot: only counts the rows, never read by the distillation loss."""
    return torch.zeros(batch_rows(call))
