"""Rewriting an exported causal Performer LM: ONNX Runtime (CPU) peak memory and time, before and after.

    python benchmarks/onnx_performer_rewrite.py [--lengths 1024,4096] [--threads 2] [--model performer|fast-transformers]

The model is `tests/performer_models.PerformerLM` (vocab 50, dim 64, 4 heads of 16, 2 layers,
FAVOR+ with 128 features, causal), exported with `torch.onnx.export(dynamo=True, opset_version=18)`
and a dynamic length, then measured by `rewriter.bench_onnx` against its `optimize_onnx` rewrite: a
fresh process per point, the session warmed up at a short length, one `session.run` measured
(extra peak RSS, wall time). The export itself does not load in ONNX Runtime (its `…id,…jd->…ij`
einsums have uneven ellipses), so "before" runs the same graph with those equations spelt out
(`einsum_ellipsis.spelt_out`, as `bench` does); the two are compared at the first length first.

`--model fast-transformers`: two fast-transformers causal layers instead (`tests/test_fast_transformers_linear`:
`AttentionLayer(CausalLinearAttention())`, d_model 256, 4 heads of 64, elu + 1, the causal product as its
pure-PyTorch prefix sum, which holds L × 64 × 64 per head), input (1, L, 256), same export and measurement.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _export(path: str) -> None:
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from performer_models import PerformerLM

    torch.manual_seed(0)
    model = PerformerLM(vocab=50, dim=64, depth=2, heads=4, max_len=8192, nb_features=128).eval()
    seq = torch.export.Dim("seq", min=2, max=8192)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randint(0, 50, (1, 64)),), path, dynamo=True, opset_version=18,
                          input_names=["tokens"], dynamic_shapes=({1: seq},), verbose=False)


def _export_fast_transformers(path: str) -> None:
    import torch

    sys.path.insert(0, ROOT)
    from tests.test_fast_transformers_linear import AttentionLayer, CausalLinearAttention

    torch.manual_seed(0)
    model = torch.nn.Sequential(*(AttentionLayer(CausalLinearAttention(), d_model=256, n_heads=4)
                                  for _ in range(2))).eval()
    seq = torch.export.Dim("seq", min=2, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 64, 256),), path, dynamo=True, opset_version=18,
                          input_names=["x"], dynamic_shapes=({1: seq},), verbose=False)


EXPORTS = {"performer": _export, "fast-transformers": _export_fast_transformers}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", choices=sorted(EXPORTS), default="performer")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    logging.basicConfig(level=logging.WARNING)
    import onnx

    import rewriter
    from passes.onnx.einsum_ellipsis import spelt_out
    from rewriter.verify import verify_onnx

    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, f"{args.model}.onnx")
        EXPORTS[args.model](path)
        exported = onnx.load(path)
        optimized, report = rewriter.optimize_onnx(exported)
        print(report.summary())
        check = verify_onnx(spelt_out(exported), optimized, {"seq": lengths[0]})
        print(f"before vs after at L={lengths[0]}: {check.message}")
        if not check.ok:
            return 1
        print(rewriter.bench_onnx(path, lengths, threads=args.threads).table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
