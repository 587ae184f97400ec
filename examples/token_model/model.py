"""A token classifier whose embedding holds most of its parameters, and the synthetic data it is trained on.

``TokenClassifier``: ``Embedding(2000, 64, padding_idx=0)`` (128,000 of its 140,676 parameters), a batch-first
``LSTM(64, 32)`` and a ``Linear(32, 4)`` head on the last step: ``tokens (B, T) -> logits (B, 4)``.

:func:`make_data`: every token ``1..V-1`` belongs to one of 4 topics; a sequence of topic ``y`` draws each of
its ``T`` tokens from topic ``y`` with probability ``signal`` and from the whole vocabulary otherwise, always
Zipf-distributed (so a few hundred tokens make up most of the text and many are rare, as in real text).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

VOCAB, DIM, HIDDEN, TOPICS = 2000, 64, 32, 4


class TokenClassifier(nn.Module):
    def __init__(self, vocab: int = VOCAB, dim: int = DIM, hidden: int = HIDDEN, classes: int = TOPICS) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim, padding_idx=0)
        self.rnn = nn.LSTM(dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        output, _ = self.rnn(self.embedding(tokens))
        return self.head(output[:, -1])


def make_data(samples: int, seed: int, steps: int = 20, signal: float = 0.35,
              vocab: int = VOCAB, topics: int = TOPICS) -> dict[str, Tensor]:
    """``{"inputs": (samples, steps) int64 token ids, "targets": (samples,) topics}``, seeded (the topic of
    each token and the Zipf ranks are fixed by seed 0, so every split shares them)."""
    fixed = torch.Generator().manual_seed(0)
    token_topic = torch.randint(0, topics, (vocab,), generator=fixed)
    token_topic[0] = -1  # padding belongs to no topic
    zipf = 1.0 / torch.arange(1, vocab, dtype=torch.float64)[torch.randperm(vocab - 1, generator=fixed)]
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, topics, (samples,), generator=generator)
    inputs = torch.empty(samples, steps, dtype=torch.int64)
    everything = torch.multinomial(zipf, samples * steps, replacement=True, generator=generator) + 1
    for topic in range(topics):
        rows = (targets == topic).nonzero().flatten()
        members = (token_topic[1:] == topic).nonzero().flatten()
        weights = zipf[members]
        drawn = torch.multinomial(weights, len(rows) * steps, replacement=True, generator=generator)
        inputs[rows] = (members[drawn] + 1).reshape(len(rows), steps)
    mixed = torch.rand(samples, steps, generator=generator) >= signal
    inputs[mixed] = everything.reshape(samples, steps)[mixed]
    return {"inputs": inputs, "targets": targets}
