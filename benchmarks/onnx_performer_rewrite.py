"""Rewriting an exported causal Performer LM: ONNX Runtime (CPU) peak memory and time, before and after.

    python benchmarks/onnx_performer_rewrite.py [--lengths 1024,4096] [--threads 2]

The model is `tests/performer_models.PerformerLM` (vocab 50, dim 64, 4 heads of 16, 2 layers,
FAVOR+ with 128 features, causal), exported with `torch.onnx.export(dynamo=True, opset_version=18)`
and a dynamic length, then rewritten by `rewriter.optimize_onnx`. The export itself does not load in
ONNX Runtime (its `…id,…jd->…ij` einsums have uneven ellipses), so "before" runs the same graph with
those equations spelt out (`einsum_ellipsis.spelt_out`, nothing else changed). The outputs are compared
at the first length before anything is measured. Each point runs in a fresh process
(`rewriter.measure.measure_in_fresh_process`): session created and warmed up at length 64, inputs
built, one `session.run` measured (extra peak RSS, wall and CPU time). Also printed: the static
estimate of `rewriter.memory_estimate` for both files.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tokens(length: int) -> dict[str, np.ndarray]:
    return {"tokens": np.random.default_rng(length).integers(0, 50, (1, length), dtype=np.int64)}


def prepare_call(path: str, length: int, threads: int):
    """Module-level (the spawned child imports it): the warmed-up session and the call to measure."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    session.run(None, _tokens(64))
    feeds = _tokens(length)
    return lambda: session.run(None, feeds)


def _build(directory: str) -> tuple[str, str]:
    import onnx
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from performer_models import PerformerLM

    import rewriter
    from passes.onnx.einsum_ellipsis import spelt_out

    torch.manual_seed(0)
    model = PerformerLM(vocab=50, dim=64, depth=2, heads=4, max_len=8192, nb_features=128).eval()
    seq = torch.export.Dim("seq", min=2, max=8192)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.onnx.export(model, (torch.randint(0, 50, (1, 64)),), dynamo=True, opset_version=18,
                                     input_names=["tokens"], dynamic_shapes=({1: seq},), verbose=False).model_proto
    optimized, report = rewriter.optimize_onnx(exported)
    print(report.summary())
    paths = os.path.join(directory, "before.onnx"), os.path.join(directory, "after.onnx")
    onnx.save(spelt_out(exported), paths[0])
    onnx.save(optimized, paths[1])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="1024,4096")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    logging.basicConfig(level=logging.WARNING)
    import onnx
    import onnxruntime as ort

    from rewriter.measure import measure_in_fresh_process
    from rewriter.memory_estimate import estimate_peak_activation_bytes, format_bytes

    with tempfile.TemporaryDirectory() as directory:
        before, after = _build(directory)
        feeds = _tokens(lengths[0])
        outputs = [ort.InferenceSession(path).run(None, feeds)[0] for path in (before, after)]
        print(f"max |before - after| at L={lengths[0]}: {np.abs(outputs[0] - outputs[1]).max():.2e}")
        print(f"{'L':>6} {'model':>7} {'extra peak':>11} {'wall':>8} {'cpu':>8} {'estimate':>10}")
        for length in lengths:
            for name, path in (("before", before), ("after", after)):
                result = measure_in_fresh_process(prepare_call, path, length, args.threads)
                estimate = estimate_peak_activation_bytes(onnx.load(path), {"seq": length}).peak_bytes
                print(f"{length:>6} {name:>7} {result.extra_peak_mib:>7.1f} MiB {result.seconds:>7.3f}s "
                      f"{result.cpu_seconds:>7.3f}s {format_bytes(estimate):>10}")


if __name__ == "__main__":
    main()
