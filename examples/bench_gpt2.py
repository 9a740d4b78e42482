"""A GPT-2-style model for `rewriter bench`: the factory, and its naive ONNX export.

The model is tests/model_families.py's GPT2Model (2 layers, 4 heads, hidden 64, Hugging Face's
eager attention with the causal mask sliced from a buffer), random weights, no downloads.

    python examples/bench_gpt2.py gpt2.onnx         # write the naive ONNX file (sequence length dynamic)
    rewriter bench gpt2.onnx --lengths 1024,2048,4096,8192 --out-dir bench-onnx
    rewriter bench examples.bench_gpt2:make_gpt2 --lengths 1024,2048,4096,8192 --out-dir bench-torch

Run from the repository root, so that `examples.bench_gpt2` can be imported.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))
from model_families import GPT2Model  # noqa: E402

MAX_LENGTH = 8192


def make_gpt2(seq_len: int):
    """The bench factory: (model, example_inputs) at `seq_len`."""
    if not 1 <= seq_len <= MAX_LENGTH:
        raise ValueError(f"seq_len must be 1 to {MAX_LENGTH}, got {seq_len}")
    torch.manual_seed(0)
    return GPT2Model(max_positions=MAX_LENGTH).eval(), GPT2Model.example_inputs(1, seq_len)


def export_naive(path: str) -> None:
    """torch's dynamo exporter, attention as written (it materialises the n x n scores)."""
    model, inputs = make_gpt2(256)
    seq = torch.export.Dim("seq", max=MAX_LENGTH)
    torch.onnx.export(model, inputs, dynamo=True, dynamic_shapes=({1: seq},), input_names=["input_ids"]).save(path)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {sys.argv[0]} OUT.onnx")
    export_naive(sys.argv[1])
    print(f"wrote {sys.argv[1]}")
