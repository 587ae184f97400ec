"""Train the character-level Shakespeare LSTM (hidden 256, one layer) briefly on CPU and save its state dict.

    python examples/shakespeare/train.py              # -> examples/shakespeare/char_lstm.pt (~2-3 min, 1 thread)
    python examples/shakespeare/train.py --quick --output /tmp/char_lstm.pt   # 30 steps, a smoke test
"""

from __future__ import annotations

import argparse
import pathlib
import time

import torch
import torch.nn.functional as F
from charlm import CHECKPOINT, CharLSTM, bits_per_char, splits, training_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1200, help="Adam steps (default 1200)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=128, help="characters per training window")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it slightly)")
    parser.add_argument("--quick", action="store_true", help="30 steps, validation on 20k characters")
    parser.add_argument("--output", type=pathlib.Path, default=CHECKPOINT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = 30 if args.quick else args.steps

    data = splits()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = CharLSTM(args.hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=args.lr / 10)
    start = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        inputs, targets = training_batch(data.train, args.batch_size, args.length, generator)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            print(f"step {step}/{steps}: train loss {loss.item() / 0.6931:.3f} bits/char "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    model.eval()
    val = data.val[:20000] if args.quick else data.val
    torch.save(model.state_dict(), args.output)
    print(f"validation {bits_per_char(model, val):.3f} bits/char; trained {steps} steps x {args.batch_size} x "
          f"{args.length} characters in {seconds:.0f} s; saved {args.output} "
          f"({args.output.stat().st_size / 1024:.0f} KiB, {sum(p.numel() for p in model.parameters()):,} parameters)")


if __name__ == "__main__":
    main()
