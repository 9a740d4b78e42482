"""The ONNX Runtime rows of `performer_attention.py`: causal FAVOR+ attention as ONNX models on ORT (CPU).

Three models with inputs q, k, v (1, 2, L, 64) and the projection (256, 64), sequence length dynamic:

    naive    `performer_attention.naive_causal` (feature maps + cumsum form) exported by
             `torch.onnx.export(dynamo=True, opset_version=18)`: Einsum / CumSum over L × M × Dv
    op       `build_linear_attention` (what `export_onnx` lowers our op to): Loops over slices of
             SLICE positions carrying only the (M, Dv + 1) state
    op-ort   `build_linear_attention(target="ort")`: φ(Q), φ(K) whole, then
             `com.microsoft.LinearAttention` (update_rule "linear")

The rewritten models are checked against `naive` at L = CHECK_L before anything is measured. Each
point runs in a fresh interpreter (`rewriter.tools.bench_child.run_point`, as `rewriter bench` does), which
creates the session (2 intra-op threads, ORT's default arena), runs it once at L = 256, builds random
inputs and records one `session.run`: wall time and extra peak RSS.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings

import numpy as np

__all__ = ["ORT_IMPLS", "build_models", "measure_ort"]

ORT_IMPLS = ("naive", "op", "op-ort")
CHECK_L, CHECK_TOLERANCE = 1100, 1e-4
POINT_TIMEOUT_S = 600


def _feeds(length: int, batch: int, heads: int, head_dim: int, features: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {name: rng.standard_normal((batch, heads, length, head_dim), dtype=np.float32) for name in "qkv"}
    feeds["projection"] = rng.standard_normal((features, head_dim), dtype=np.float32)
    return feeds


def _session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def measure_ort(path: str, length: int, threads: int, warmup: int) -> tuple[float, float]:
    """(extra peak MiB, seconds) of one ORT run at `length`, in a fresh interpreter (`rewriter.tools.bench_child`)."""
    import onnx

    from rewriter.tools.bench import bind_dims
    from rewriter.tools.bench_child import run_point

    model = onnx.load(path, load_external_data=False)
    spec = {"kind": "onnx", "threads": threads, "path": path, "dims": bind_dims(model, length),
            "warmup_dims": bind_dims(model, warmup)}
    measured = run_point(spec, POINT_TIMEOUT_S)
    return measured["extra_peak_mib"], measured["seconds"]


def _export_naive(naive_causal, path: str, shape) -> None:
    import torch

    batch, heads, head_dim, features = shape

    class NaiveCausal(torch.nn.Module):
        def forward(self, q, k, v, projection):
            return naive_causal(q, k, v, projection)

    example = tuple(torch.randn(batch, heads, 256, head_dim) for _ in range(3)) + (torch.randn(features, head_dim),)
    seq = torch.export.Dim("seq", min=2, max=1 << 20)
    dynamic = {"q": {2: seq}, "k": {2: seq}, "v": {2: seq}, "projection": None}
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(NaiveCausal().eval(), example, dynamo=True, opset_version=18,
                                    dynamic_shapes=dynamic, input_names=["q", "k", "v", "projection"],
                                    output_names=["out"], verbose=False)
    program.save(path)


def build_models(directory: str, naive_causal, shape, *, epsilon: float, slice_size: int,
                 threads: int) -> dict[str, tuple[str | None, str]]:
    """impl → (path, "") or (None, why not measured); the rewritten models checked against naive."""
    import onnx

    from rewriter.kernels.onnx_linear_attention import make_linear_attention_model

    batch, heads, head_dim, features = shape
    models = {"naive": os.path.join(directory, "performer-naive.onnx")}
    _export_naive(naive_causal, models["naive"], shape)
    for impl, target in (("op", "chunked"), ("op-ort", "ort")):
        model = make_linear_attention_model(num_heads=heads, num_kv_heads=heads, head_dim=head_dim, features=features,
                                            feature_map="favor_softmax", causal=True, data_scale=head_dim**-0.25,
                                            epsilon=epsilon, normalizer_epsilon=0.0, slice_size=slice_size,
                                            target=target)
        models[impl] = os.path.join(directory, f"performer-{impl}.onnx")
        onnx.save(model, models[impl])
    feeds = _feeds(CHECK_L, *shape)
    reference = _session(models["naive"], threads).run(None, feeds)[0]
    results = {"naive": (models["naive"], "")}
    for impl in ("op", "op-ort"):
        error = float(np.max(np.abs(_session(models[impl], threads).run(None, feeds)[0] - reference)))
        ok = error <= CHECK_TOLERANCE * max(1.0, float(np.max(np.abs(reference))))
        results[impl] = (models[impl], "") if ok else (None, f"error: differs from naive by {error:.3g} at L={CHECK_L}")
    return results
