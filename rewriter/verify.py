"""Run an original and a rewritten ONNX model on ONNX Runtime with the same random inputs.

Symbolic input dims are bound from `dims` (by name) or to `default_dim`; integer inputs whose
name mentions a mask are all ones (a random mask could hide every key of a row), other integer
inputs are small random ids, floats are standard normal.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

__all__ = ["VerifyResult", "ort_session", "random_inputs", "verify_onnx"]


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    ok: bool
    max_abs_difference: float
    max_rel_difference: float
    message: str


def _concrete_shape(value_info: onnx.ValueInfoProto, dims: dict[str, int], default_dim: int) -> list[int]:
    shape = []
    for dim in value_info.type.tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            shape.append(dim.dim_value)
        else:
            shape.append(dims.get(dim.dim_param, default_dim))
    return shape


def random_inputs(model: onnx.ModelProto, dims: dict[str, int] | None = None, default_dim: int = 8,
                  seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    initializers = {init.name for init in model.graph.initializer}
    feeds = {}
    for value_info in model.graph.input:
        if value_info.name in initializers:
            continue
        shape = _concrete_shape(value_info, dims or {}, default_dim)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type)
        if dtype == np.bool_:
            feeds[value_info.name] = np.ones(shape, dtype=bool)
        elif np.issubdtype(dtype, np.integer) and "mask" in value_info.name.lower():
            feeds[value_info.name] = np.ones(shape, dtype=dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[value_info.name] = rng.integers(0, 10, shape).astype(dtype)
        else:
            feeds[value_info.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def ort_session(model: onnx.ModelProto, log_severity: int = 3):
    """An ONNX Runtime CPU session of `model`; ORT logs at `log_severity` or worse (3 errors, 4 fatal only)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = log_severity
    return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def verify_onnx(original: onnx.ModelProto, rewritten: onnx.ModelProto, dims: dict[str, int] | None = None,
                default_dim: int = 8, rtol: float = 1e-4, atol: float = 1e-5, seed: int = 0) -> VerifyResult:
    """Whether every output of `rewritten` equals `original`'s within rtol/atol (NaN equals NaN)."""
    feeds = random_inputs(original, dims, default_dim, seed)
    expected = ort_session(original).run(None, feeds)
    actual = ort_session(rewritten).run(None, feeds)
    worst_abs = worst_rel = 0.0
    failures = []
    for output, want, got in zip(original.graph.output, expected, actual):
        want, got = np.asarray(want, dtype=np.float64), np.asarray(got, dtype=np.float64)
        if want.shape != got.shape:
            failures.append(f"{output.name}: shape {got.shape} instead of {want.shape}")
            continue
        finite = np.isfinite(want) & np.isfinite(got)
        difference = np.abs(want - got)[finite]
        worst_abs = max(worst_abs, float(difference.max(initial=0.0)))
        worst_rel = max(worst_rel, float((difference / np.maximum(np.abs(want[finite]), 1e-30)).max(initial=0.0)))
        if not np.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
            failures.append(f"{output.name}: max |difference| {float(difference.max(initial=0)):.3g}")
    message = "; ".join(failures) if failures else f"outputs equal (max |difference| {worst_abs:.3g})"
    return VerifyResult(not failures, worst_abs, worst_rel, message)
