"""Run an original and a rewritten ONNX model on ONNX Runtime with the same random inputs.

Symbolic input dims are bound from `dims` (by name) or to `default_dim`; integer inputs whose
name mentions a mask are all ones (a random mask could hide every key of a row), other integer
inputs are small random ids, floats are standard normal.

The rewritten model is compared against `reference` outputs when given (say, eager PyTorch on the
same feeds), otherwise against the original on ONNX Runtime. An original that ONNX Runtime cannot
run (TorchScript's export of performer-pytorch's chunked causal attention writes negative split
sizes) is reported as such: what failed, whether the rewrite runs, and that nothing was compared.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx

__all__ = ["VerifyResult", "ort_failure", "ort_session", "random_inputs", "verify_onnx"]


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    ok: bool
    max_abs_difference: float
    max_rel_difference: float
    message: str
    compared_against: str = "the original on ONNX Runtime"  # or "reference outputs", or "nothing"
    original_error: str | None = None  # why ONNX Runtime could not run the original


def _concrete_shape(value_info: onnx.ValueInfoProto, dims: dict[str, int], default_dim: int) -> list[int]:
    shape = []
    for dim in value_info.type.tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            shape.append(dim.dim_value)
        else:
            shape.append(dims.get(dim.dim_param, default_dim))
    return shape


_MASK_KEEP = 0.8  # the share of ones in a random boolean or integer mask input


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
        if dtype == np.bool_ or (np.issubdtype(dtype, np.integer) and "mask" in value_info.name.lower()):
            # Partial masks, so that a check exercises masking whichever value means "keep".
            feeds[value_info.name] = (rng.random(shape) < _MASK_KEEP).astype(dtype)
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


def ort_failure(error: Exception) -> str:
    """ONNX Runtime's failure in one line: the node and the check that failed."""
    text = " ".join(str(error).split())
    node = re.search(r"running (\w+) node\. Name:'([^']*)'", text)
    detail = text.rsplit("was false. ", 1)[-1] if "was false. " in text else text[-200:]
    return f"{node.group(1)} node '{node.group(2)}': {detail}" if node else detail


def _unverifiable(original_error: str, rewritten: onnx.ModelProto, feeds) -> VerifyResult:
    try:
        outputs = ort_session(rewritten).run(None, feeds)
    except Exception as error:  # noqa: BLE001 - ORT raises its own exception types
        runs = f"the rewritten model does not run either ({ort_failure(error)})"
    else:
        finite = all(np.isfinite(np.asarray(out, dtype=np.float64)).all() for out in outputs
                     if np.issubdtype(np.asarray(out).dtype, np.number))
        runs = f"the rewritten model runs ({len(outputs)} outputs, {'all finite' if finite else 'not all finite'})"
    message = (f"the original does not run on ONNX Runtime ({original_error}); {runs}; not compared: "
               "no reference outputs (compare against PyTorch with verify_onnx(..., reference=outputs))")
    return VerifyResult(False, float("nan"), float("nan"), message, "nothing", original_error)


def verify_onnx(original: onnx.ModelProto, rewritten: onnx.ModelProto, dims: dict[str, int] | None = None,
                default_dim: int = 8, rtol: float = 1e-4, atol: float = 1e-5, seed: int = 0,
                feeds: dict[str, np.ndarray] | None = None, reference: list | None = None) -> VerifyResult:
    """Whether every output of `rewritten` equals the expected one within rtol/atol (NaN equals NaN).

    Expected are `reference` (arrays, one per output) when given, else `original`'s outputs on ONNX
    Runtime. `feeds` replaces the random inputs. When the original cannot run, the result is not ok
    and its message says what failed and whether the rewrite runs.
    """
    feeds = random_inputs(original, dims, default_dim, seed) if feeds is None else feeds
    compared_against = "reference outputs" if reference is not None else "the original on ONNX Runtime"
    if reference is not None:
        expected = [np.asarray(x) for x in reference]
    else:
        try:
            expected = ort_session(original, log_severity=4).run(None, feeds)
        except ImportError:
            raise
        except Exception as error:  # noqa: BLE001 - ORT raises its own exception types
            return _unverifiable(ort_failure(error), rewritten, feeds)
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
    if reference is not None:
        message += ", against the reference outputs"
    return VerifyResult(not failures, worst_abs, worst_rel, message, compared_against)
