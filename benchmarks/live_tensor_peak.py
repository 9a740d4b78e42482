"""Peak of live tensor storage during one forward + backward of performer-pytorch's causal PerformerLM.

Unlike extra peak RSS (`performer_package.py`), this counts only storages alive at once, so glibc's
resident freed heap does not enter: every aten op's outputs are recorded by a `TorchDispatchMode`
and dropped when their storage is freed; the rewritten model's `rewriter::linear_attention` ops run
their Python implementation under the mode, so the op's slice temporaries count too. Storages first
seen as views of buffers that existed before the call (the position embeddings) are counted as
well; the model is `performer_package`'s.

    PYTHONPATH=. python benchmarks/live_tensor_peak.py --impl rewritten --length 16384
"""

from __future__ import annotations

import argparse
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import performer_package
import rewriter.kernels.linear_attention_op as linear_attention_op

__all__ = ["LivePeak"]

_INNER = {"rewriter.linear_attention.default": linear_attention_op.linear_attention._init_fn,
          "rewriter.linear_attention_backward.default": linear_attention_op.linear_attention_backward._init_fn}


class LivePeak(TorchDispatchMode):
    """Tracks the bytes of live storages produced inside the mode; `peak` in bytes."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _forget(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in _INNER:
            with self:
                out = _INNER[str(func)](*args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key not in self.live and storage.nbytes():
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    weakref.finalize(storage, self._forget, key)
        self.peak = max(self.peak, self.current)
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=performer_package.IMPLS, default="rewritten")
    parser.add_argument("--length", type=int, default=16384)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    model, tokens = performer_package._model(args.length, args.impl == "rewritten")
    with LivePeak() as tracker:
        model(tokens).sum().backward()
    print(f"{args.impl} training L={args.length}: live-tensor peak {tracker.peak / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
