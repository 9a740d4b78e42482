"""Run one fuzz `Case` eagerly and rewritten, and say how it went.

Outcomes: ``rewritten`` (every rewritten block agrees), ``left_alone`` (nothing rewritten, results
agree), ``wrong`` (a forward output, a gradient or the NaN pattern differs), ``crashed`` (the
rewrite or the rewritten program raised), ``invalid`` (eager PyTorch itself cannot run the program), ``eager_inexact``
(an fp32 rewrite that differs from eager but equals `_exact_reference`, which eager does not).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

import rewriter

from .programs import AttentionProgram, Case, case_inputs

__all__ = ["Outcome", "run_case", "run_onnx_case"]

logger = logging.getLogger(__name__)

# (atol, rtol) as a fraction of the largest expected magnitude, forward and gradients
_TOLERANCES = {"float32": (1e-4, 1e-3), "bfloat16": (5e-2, 5e-2), "float16": (1e-2, 1e-2)}


@dataclasses.dataclass(frozen=True)
class Outcome:
    kind: str
    detail: str = ""


def _run(fn, inputs, parameters):
    leaves = [x.detach().clone().requires_grad_(True) if x.is_floating_point() else x for x in inputs]
    out = fn(*leaves)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    differentiable = [x for x in leaves if x.requires_grad] + parameters
    grads = torch.autograd.grad((out * weights).nan_to_num().sum(), differentiable, allow_unused=True)
    return [out.detach()] + [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, differentiable)]


def _mismatch(expected, actual, dtype: str) -> str | None:
    atol, rtol = _TOLERANCES[dtype]
    for index, (want, got) in enumerate(zip(expected, actual)):
        want, got = want.double(), got.double()
        if want.shape != got.shape:
            return f"tensor {index}: shape {tuple(got.shape)} instead of {tuple(want.shape)}"
        if not torch.equal(want.isnan(), got.isnan()) or not torch.equal(want.isinf(), got.isinf()):
            return f"tensor {index}: NaN/inf pattern differs"
        finite = want.isfinite()
        if finite.any():
            error = (want[finite] - got[finite]).abs().max().item()
            allowed = atol + rtol * want[finite].abs().max().item()
            if error > allowed:
                return f"tensor {index} ({'output' if index == 0 else 'gradient'}): error {error:.3g} > {allowed:.3g}"
    return None


def _exact_reference(case: Case, inputs) -> list[torch.Tensor]:
    """The case run in fp32 through SDPA's math backend: the result the rewrite must reproduce.

    Eager is not always that result. PyTorch's fused CPU SDPA kernel stores a row's log-sum-exp as
    max + log(sum); on a row whose every key holds a fill at fp32's finfo.min the log(sum) rounds
    away, and its backward then scales that row's gradients by the number of keys (the math backend
    and a float64 run agree with each other, and with the rewrite, not with it).
    """
    reference_case = dataclasses.replace(case, dtype="float32")
    module = AttentionProgram(reference_case).eval()
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return _run(module, inputs, list(module.parameters()))


def _farther_from_reference_than_eager(case: Case, inputs, expected, actual) -> str | None:
    """Whether the rewrite strays from `_exact_reference` further than eager's result may.

    fp32: within the fp32 tolerance of the reference (eager's own distance from it excuses nothing).
    Half precision: half-precision reductions (the gradient of a learned temperature sums
    B·H·Lq·Lk products) and scores rounded at large fills leave eager itself far from the fp32
    result; the op, which forms scores in fp32 from half-precision operands (a bias rounded at a
    fill), must be no further from it than twice eager's own distance. The NaN/inf pattern must
    match eager's.
    """
    reference = _exact_reference(case, inputs)
    atol, rtol = _TOLERANCES[case.dtype]
    slack = 0.0 if case.dtype == "float32" else 2.0
    for index, (want, got, truth) in enumerate(zip(expected, actual, reference)):
        want, got, truth = want.double(), got.double(), truth.double()
        if not torch.equal(want.isnan(), got.isnan()) or not torch.equal(want.isinf(), got.isinf()):
            return f"tensor {index}: NaN/inf pattern differs"
        finite = want.isfinite() & truth.isfinite()
        if not finite.any():
            continue
        eager_error = (want[finite] - truth[finite]).abs().max().item()
        our_error = (got[finite] - truth[finite]).abs().max().item()
        if our_error > slack * eager_error + atol + rtol * truth[finite].abs().max().item():
            return f"tensor {index}: {our_error:.3g} from the exact result, eager {eager_error:.3g}"
    return None


def run_case(case: Case) -> Outcome:
    """Eager vs `optimize_module` forward and backward, with the case's small chunk sizes."""
    torch.manual_seed(case.seed)
    module = AttentionProgram(case).eval()
    inputs = case_inputs(case)
    parameters = list(module.parameters())
    try:
        expected = _run(module, inputs, parameters)
    except RuntimeError as error:
        return Outcome("invalid", str(error).splitlines()[0])
    try:
        gm, report = rewriter.optimize_module(module, tuple(inputs), chunk_size=case.chunks)
        actual = _run(gm, inputs, parameters)
    except Exception as error:  # noqa: BLE001 - a crash is an outcome to report, not to propagate
        logger.debug("crash", exc_info=True)
        return Outcome("crashed", f"{type(error).__name__}: {error}")
    problem = _mismatch(expected, actual, case.dtype)
    if problem is not None:
        exact = _farther_from_reference_than_eager(case, inputs, expected, actual)
        if exact is not None:
            return Outcome("wrong", f"{problem}; {exact}")
        if case.dtype == "float32":
            return Outcome("eager_inexact", problem)
    if report.rewritten_count:
        return Outcome("rewritten")
    return Outcome("left_alone", "; ".join(str(m.reason) for m in report.matches))


def run_onnx_case(case: Case) -> Outcome:
    """ORT on the exported original vs ORT on the `optimize_onnx` file (forward only)."""
    import onnxruntime as ort

    module = AttentionProgram(case).eval()
    inputs = case_inputs(case)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "case.onnx"
        try:
            torch.onnx.export(module, tuple(inputs), str(path), dynamo=True, verbose=False)
        except Exception as error:  # noqa: BLE001 - an exporter failure is not the product's
            return Outcome("invalid", f"export: {type(error).__name__}")
        try:
            optimized, report = rewriter.optimize_onnx(str(path))
        except Exception as error:  # noqa: BLE001
            return Outcome("crashed", f"{type(error).__name__}: {error}")
        feeds = [x.numpy() for x in inputs]
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1

        def run(model):
            session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            names = [i.name for i in session.get_inputs()]
            return session.run(None, dict(zip(names, feeds[: len(names)])))[0]

        try:
            results = [run(str(path))]
        except Exception as error:  # noqa: BLE001 - ORT cannot run the exporter's own file
            return Outcome("invalid", f"ort: {type(error).__name__}")
        try:
            results.append(run(optimized.SerializeToString()))
        except Exception as error:  # noqa: BLE001
            return Outcome("crashed", f"ort on the optimized file: {error}")
    problem = _mismatch([torch.from_numpy(np.asarray(results[0]))], [torch.from_numpy(np.asarray(results[1]))],
                        "float32" if case.dtype == "float32" else case.dtype)
    if problem is not None:
        return Outcome("wrong", "onnx " + problem)
    return Outcome("rewritten" if report.rewritten_count else "left_alone")
