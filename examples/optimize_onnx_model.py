"""Optimize an existing ONNX file and check the result on ONNX Runtime.

    python examples/optimize_onnx_model.py model.onnx optimized.onnx [--target auto]

Without arguments it first exports the built-in TinyDecoder to tiny_decoder.onnx (dynamic
sequence length) so there is a model to work on.
"""

import argparse

import onnx
import torch

import rewriter
from rewriter.tools.demo import TinyDecoder
from rewriter.onnx_io import save_model
from rewriter.verify import verify_onnx


def export_tiny_decoder(path: str) -> None:
    model = TinyDecoder().eval()
    seq = torch.export.Dim("seq", min=2, max=65536)
    torch.onnx.export(model, (torch.randint(0, 256, (1, 32)),), path, dynamo=True,
                      dynamic_shapes=({1: seq},), opset_version=18)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("output", nargs="?", default="optimized.onnx")
    parser.add_argument("--target", default="auto", choices=["auto", "chunked", "ort", "onnx-attention"])
    args = parser.parse_args()
    if args.model is None:
        args.model = "tiny_decoder.onnx"
        export_tiny_decoder(args.model)

    optimized, report = rewriter.optimize_onnx(args.model, target=args.target)
    print(report.summary())
    result = verify_onnx(onnx.load(args.model), optimized, default_dim=256)
    print("verify:", result.message)
    save_model(optimized, args.output)
    print("wrote", args.output)


if __name__ == "__main__":
    main()
