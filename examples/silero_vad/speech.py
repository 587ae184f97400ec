"""Real speech recordings installed by Debian packages, read as 16 kHz float tensors.

- ``asterisk-core-sounds-en-wav``: 568 prompts by one speaker (Allison), 8 kHz mono, ~25 min, CC-BY-SA-3.0,
  under /usr/share/asterisk/sounds/en_US_f_Allison/.
- ``alsa-utils``: 9 short voice wavs ("front left", ...), 48 kHz, under /usr/share/sounds/alsa/.
"""

from __future__ import annotations

import pathlib
import wave
from math import gcd

import numpy as np
import torch
from scipy.signal import resample_poly
from torch import Tensor

SPEECH_DIRS = (
    pathlib.Path("/usr/share/asterisk/sounds/en_US_f_Allison"),
    pathlib.Path("/usr/share/sounds/alsa"),
)
INSTALL_HINT = "apt-get install asterisk-core-sounds-en-wav alsa-utils"


def speech_files(limit: int | None = None) -> list[pathlib.Path]:
    """Up to ``limit`` speech wavs, sorted by path within each directory (asterisk first)."""
    files = [path for root in SPEECH_DIRS for path in sorted(root.rglob("*.wav"))]
    if not files:
        raise FileNotFoundError(f"no speech recordings found in {', '.join(map(str, SPEECH_DIRS))}: {INSTALL_HINT}")
    return files[:limit]


def read_16k(path: pathlib.Path, rate: int = 16000) -> Tensor:
    """A 16-bit PCM wav as float32 ``(T,)`` in [-1, 1) at ``rate`` Hz (channels averaged)."""
    with wave.open(str(path)) as handle:
        if handle.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM wavs are supported")
        source_rate, channels = handle.getframerate(), handle.getnchannels()
        samples = np.frombuffer(handle.readframes(handle.getnframes()), dtype=np.int16)
    audio = samples.reshape(-1, channels).mean(axis=1).astype(np.float32) / 32768.0
    divisor = gcd(rate, source_rate)
    return torch.from_numpy(resample_poly(audio, rate // divisor, source_rate // divisor).astype(np.float32))
