"""One causal head at a very long length, optimised once at a short one (issue 11's last target).

The module writes its causal mask as many hand-written models do, ``triu(full((n, n), −∞), 1)``
added to the scores, so eager PyTorch allocates the n × n mask and scores. It is optimised once with
`rewriter.optimize_module` at a short example length with the sequence axis dynamic, and the
optimised module is then called at each length given, one forward in a fresh process (extra peak
RSS above the state after building inputs, and wall time). Eager runs at the lengths where its
scores fit the allocation cap; beyond, its row says how much the scores alone would need.

    PYTHONPATH=. python benchmarks/long_causal_head.py --lengths 16384 131072
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from torch import nn

from rewriter.tools.measure import is_out_of_memory, limit_extra_memory, measure_in_fresh_process

HEAD_DIM = 64
EXAMPLE_LENGTH = 256


class CausalHead(nn.Module):
    """``softmax(q @ kᵀ / 8 + triu(full(−∞), 1)) @ v`` for q, k, v of shape (1, 1, n, 64)."""

    def forward(self, q, k, v):
        length = q.size(-2)
        causal = torch.triu(torch.full((length, length), float("-inf"), device=q.device), 1)
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.size(-1)) + causal, -1) @ v


def _inputs(length: int):
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 1, length, HEAD_DIM, generator=generator) for _ in range(3))


def _setup(length: int, optimised: bool, cap_bytes: int):
    """Runs in the fresh process: the call to measure."""
    torch.set_num_threads(2)
    module = CausalHead()
    if optimised:
        import rewriter

        module, report = rewriter.optimize_module(module, _inputs(EXAMPLE_LENGTH))
        if not report.matches or not all(match.rewritten for match in report.matches):
            raise RuntimeError(f"the block was not rewritten: {report.summary()}")
    inputs = _inputs(length)
    limit_extra_memory(cap_bytes)

    def forward():
        with torch.no_grad():
            module(*inputs)

    return forward


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 131072], help="sequence lengths (default: %(default)s)")
    parser.add_argument("--memory-limit", type=float, default=8.0,
                        help="GiB a measuring process may allocate beyond its inputs (default: %(default)s)")
    args = parser.parse_args(argv)
    cap = int(args.memory_limit * 2**30)
    print(f"one causal head, d = {HEAD_DIM}, optimised once at n = {EXAMPLE_LENGTH} (dynamic length); "
          f"one forward in a fresh process each, allocation cap {args.memory_limit:g} GiB")
    print(f"{'n':>8}  {'mode':<10} {'extra peak':>12} {'time':>9}")
    for length in args.lengths:
        for optimised in (False, True):
            mode = "optimised" if optimised else "eager"
            try:
                measured = measure_in_fresh_process(_setup, length, optimised, cap)
            except Exception as error:  # noqa: BLE001 — a row says what failed, the run goes on
                if not is_out_of_memory(error):
                    raise
                scores_gib = length * length * 4 / 2**30
                print(f"{length:>8}  {mode:<10} {'out of memory':>12}  (the scores alone: {scores_gib:.0f} GiB)")
                continue
            print(f"{length:>8}  {mode:<10} {measured.extra_peak_mib:>8.1f} MiB {measured.seconds:>8.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
