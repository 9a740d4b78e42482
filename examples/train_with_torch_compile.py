"""Train a small causal language model with torch.compile(backend="rewriter") at a sequence length
whose naive attention would not fit a memory budget.

Naive attention keeps the n × n softmax probabilities of every layer for the backward pass, at
least layers × heads × n² × 4 bytes in fp32; the rewriter backend replaces it with an exact
attention op that recomputes blocks in the backward instead. The data are counting sequences
(each token is the previous one plus one, mod 256, from a random start), so the loss has
something to learn and goes down within a few steps.

    python examples/train_with_torch_compile.py                       # n = 4096, budget 256MiB
    python examples/train_with_torch_compile.py --seq-len 16384 --memory-budget 1GiB --steps 3
"""

import argparse
import logging

import torch
import torch.nn.functional as F

from rewriter.tools.demo import VOCAB, TinyDecoder
from rewriter.tools.measure import measure_call
from rewriter.tools.memory_estimate import format_bytes
from passes.core.planner import parse_size


def naive_attention_bytes(model: TinyDecoder, seq_len: int) -> int:
    """What naive attention keeps for the backward: each layer's (heads, n, n) fp32 probabilities."""
    heads = sum(block["attn"].heads for block in model.blocks)
    return heads * seq_len * seq_len * 4


def counting_batch(seq_len: int) -> torch.Tensor:
    start = torch.randint(0, VOCAB, (1, 1))
    return (start + torch.arange(seq_len)) % VOCAB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--memory-budget", default="256MiB", help="memory the training steps may use, e.g. 1GiB")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--compiler", choices=["inductor", "aot_eager", "eager"], default="inductor",
                        help="what compiles the rewritten graph (default inductor)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.seq_len < 2 or args.steps < 2:
        parser.error("--seq-len and --steps must be at least 2")
    try:
        budget = parse_size(args.memory_budget)
    except ValueError as error:
        parser.error(f"--memory-budget: {error}")
    logging.basicConfig(format="%(message)s")
    logging.getLogger("rewriter.compile_backend").setLevel(logging.INFO)  # what the backend rewrote

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = TinyDecoder().train()
    naive = naive_attention_bytes(model, args.seq_len)
    verdict = "does not fit" if naive > budget else "fits"
    print(f"sequence length {args.seq_len}: naive attention keeps at least {format_bytes(naive)} of probabilities "
          f"for the backward; budget {format_bytes(budget)}: naive {verdict}")

    compiled = torch.compile(model, backend="rewriter", options={"compiler": args.compiler})
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []

    def step() -> None:
        tokens = counting_batch(args.seq_len)
        logits = compiled(tokens)
        loss = F.cross_entropy(logits[0, :-1], tokens[0, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        print(f"step {len(losses) - 1}: loss {losses[-1]:.4f}", flush=True)

    step()  # compiles forward and backward; memory is measured from the next step on

    def remaining_steps() -> None:
        for _ in range(args.steps - 1):
            step()

    measured = measure_call(remaining_steps)
    used = measured.extra_peak_bytes
    print(f"peak memory of steps 1-{args.steps - 1} above what was allocated before them: {format_bytes(used)} "
          f"({'within' if used <= budget else 'OVER'} the {format_bytes(budget)} budget), "
          f"{measured.seconds / (args.steps - 1):.2f} s per step")
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return 0 if used <= budget else 1


if __name__ == "__main__":
    raise SystemExit(main())
