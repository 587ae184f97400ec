"""Silero VAD (silero-vad 6.x, 16 kHz, MIT) ported from its TorchScript model to plain torch.

The shipped ``silero_vad.jit`` runs an ``LSTMCell(128, 128)`` once per 512-sample chunk. The port runs the same
weights as an ``nn.LSTM`` over the whole sequence of chunks, so ``SileroVAD.lstm`` is a standard recurrent
layer that kcompress can compress. The weights are taken from the ``.jit`` (what ``load_silero_vad()``
returns); the ``.safetensors`` in the same wheel holds different weights.
"""

from __future__ import annotations

import contextlib
import importlib.util
import pathlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SAMPLE_RATE = 16000
CHUNK = 512  # new samples per step
CONTEXT = 64  # samples of the previous chunk seen again


class SileroVAD(nn.Module):
    """``wav (T,)`` float at 16 kHz -> speech probability per 512-sample chunk ``(T // 512,)``.

    STFT conv (magnitudes of 129 bins) -> 4 Conv1d+ReLU -> ``lstm`` (128 -> 128, batch-first) -> ReLU ->
    Conv1d(128 -> 1) -> sigmoid. The recurrent state starts at zero, as after ``reset_states()``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.stft_conv = nn.Conv1d(1, 258, 256, stride=128, bias=False)
        self.conv1 = nn.Conv1d(129, 128, 3, padding=1)
        self.conv2 = nn.Conv1d(128, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, 3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, 128, 3, padding=1)
        self.lstm = nn.LSTM(128, 128, batch_first=True)
        self.final_conv = nn.Conv1d(128, 1, 1)

    @classmethod
    def from_jit(cls) -> "SileroVAD":
        """The port with the weights of the TorchScript model shipped in the silero-vad wheel, in eval mode."""
        scripted = torch.jit.load(str(jit_path()), map_location="cpu")
        state = {name: tensor.detach().clone() for name, tensor in _port_state(scripted).items()}
        model = cls()
        model.load_state_dict(state)
        return model.eval()

    def features(self, wav: Tensor) -> Tensor:
        """``wav (T,)`` -> the LSTM's inputs ``(1, T // 512, 128)``: each chunk with 64 samples of context."""
        steps = wav.shape[0] // CHUNK
        padded = F.pad(wav[: steps * CHUNK], (CONTEXT, 0))
        chunks = padded.unfold(0, CONTEXT + CHUNK, CHUNK)  # (steps, 576)
        return self.encode(chunks).unsqueeze(0)

    def encode(self, chunks: Tensor) -> Tensor:
        """``chunks (N, 576)`` -> ``(N, 128)`` encoder features, chunk by chunk (no recurrence)."""
        x = self.stft_conv(F.pad(chunks, (0, CONTEXT), mode="reflect").unsqueeze(1))
        x = torch.sqrt(x[:, :129] ** 2 + x[:, 129:] ** 2)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = F.relu(conv(x))
        return x.squeeze(-1)

    def decode(self, hidden: Tensor) -> Tensor:
        """LSTM outputs ``(1, N, 128)`` -> probabilities ``(N,)``."""
        return torch.sigmoid(self.final_conv(F.relu(hidden).transpose(1, 2)))[0, 0]

    def forward(self, wav: Tensor) -> Tensor:
        """``wav (T,)`` -> ``(T // 512,)`` speech probabilities."""
        hidden, _ = self.lstm(self.features(wav))
        return self.decode(hidden)

    def probabilities(self, wav: Tensor) -> Tensor:
        """``forward`` without gradients, in eval mode (the model's mode restored)."""
        training = self.training
        try:
            with torch.no_grad():
                return self.eval()(wav)
        finally:
            self.train(training)


def _port_state(scripted: torch.jit.ScriptModule) -> dict[str, Tensor]:
    """Map the TorchScript model's parameter and buffer names onto :class:`SileroVAD`'s state dict."""
    source = {**dict(scripted.named_parameters()), **dict(scripted.named_buffers())}
    state = {"stft_conv.weight": source["_model.stft.forward_basis_buffer"]}
    for index in range(4):
        for kind in ("weight", "bias"):
            state[f"conv{index + 1}.{kind}"] = source[f"_model.encoder.{index}.reparam_conv.{kind}"]
    for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        state[f"lstm.{kind}_l0"] = source[f"_model.decoder.rnn.{kind}"]
    for kind in ("weight", "bias"):
        state[f"final_conv.{kind}"] = source[f"_model.decoder.decoder.2.{kind}"]
    return state


def jit_path() -> pathlib.Path:
    """``silero_vad/data/silero_vad.jit`` inside the installed wheel, found without importing the package."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("silero-vad is not installed: pip install silero-vad (or kcompress[examples])")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "data" / "silero_vad.jit"


@contextlib.contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Restore ``torch.get_num_threads()`` after the block (``import silero_vad`` sets it to 1 globally)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def load_reference() -> torch.jit.ScriptModule:
    """The original TorchScript model, as ``silero_vad.load_silero_vad()`` returns it (thread count kept)."""
    with torch_threads_kept():
        from silero_vad import load_silero_vad

        return load_silero_vad()


def reference_probabilities(model: torch.jit.ScriptModule, wav: Tensor) -> Tensor:
    """The TorchScript model's per-chunk probabilities ``(T // 512,)``, its state reset first."""
    model.reset_states()
    starts = range(0, len(wav) - CHUNK + 1, CHUNK)
    with torch.no_grad():
        return torch.stack([model(wav[i : i + CHUNK].unsqueeze(0), SAMPLE_RATE)[0, 0] for i in starts])
