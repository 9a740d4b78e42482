"""Rewrite the attention of a PyTorch model and train it at a sequence length where naive
attention would need gigabytes for its n × n probabilities.

    python examples/optimize_pytorch_model.py --seq-len 8192
"""

import argparse

import torch

import rewriter
from rewriter.tools.demo import TinyDecoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    args = parser.parse_args()

    model = TinyDecoder()
    tokens = torch.randint(0, 256, (1, args.seq_len))
    # Trained at one length: captured at its shapes (the default keeps lengths dynamic, see README).
    optimized, report = rewriter.optimize_module(model, (tokens,), dynamic_shapes=None)
    print(report.summary())

    optimizer = torch.optim.AdamW(optimized.parameters(), lr=1e-3)
    for step in range(3):
        logits = optimized(tokens)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
