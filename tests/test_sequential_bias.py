"""Several biases added to the scores one after another: the kernels add them in the model's order.

``s + B₁ + B₂`` rounds as fl(fl(s + B₁) + B₂); their sum added at once, fl(s + fl(B₁ + B₂)), differs
where finite fills meet (GPT-2's padding bias next to an additive mask, both −1e4: at |x| ≈ 2e4 fp32's
spacing is 0.002, and a row whose every key is at both fills differs by ~4e-3 in its output; fuzzer
seed 303). A bias the model sums itself before adding it (T5's bias + mask) stays one addend.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import onnxruntime
import pytest
import torch

import rewriter
from parity import ATTENTION_OP, assert_gradients_close
from passes.core.program_terms import sum_steps
from passes.core.score_programs import ProgramBuilder
from rewriter.kernels import fused_rows
from rewriter.kernels.score_program import parse
from tests.fuzz.check import run_case, run_onnx_case
from tests.fuzz.programs import Case

pytestmark = pytest.mark.usefixtures("one_thread")

# Fuzzer seed 303: GPT-2's (1 − m)·fill padding bias and an additive mask, both −1e4, on a row that
# keeps no key (the model adds them left to right; the op added their sum).
SUMMED_FINITE_FILLS = Case(
    product="matmul", batch=3, heads=4, kv_heads=4, kv_order="expand", kv_batch=3, query_len=3, key_len=3,
    head_dim=8, value_dim=8, scale="split", bias="padding", mask="all_masked_row", mask_form="additive",
    fill=-10000.0, softcap=True, chunks=(4, 5), seed=0)


@pytest.mark.parametrize("case", [
    SUMMED_FINITE_FILLS,
    dataclasses.replace(SUMMED_FINITE_FILLS, fill=-1e9),
    dataclasses.replace(SUMMED_FINITE_FILLS, softcap=False, query_len=11, key_len=13, chunks=(4, 3)),
    dataclasses.replace(SUMMED_FINITE_FILLS, mask_then_bias=True),  # the mask's term first, then the padding's
    # where(keep, s, F) + B: the fill program folds F + B as the model does
    dataclasses.replace(SUMMED_FINITE_FILLS, mask_then_bias=True, mask_form="where"),
    dataclasses.replace(SUMMED_FINITE_FILLS, dtype="bfloat16"),
    dataclasses.replace(SUMMED_FINITE_FILLS, dtype="float16", fill=-1000.0),
])
def test_fuzzer_counterexample_and_neighbours(case):
    assert run_case(case).kind == "rewritten"


@pytest.mark.parametrize("case", [SUMMED_FINITE_FILLS, dataclasses.replace(SUMMED_FINITE_FILLS, fill=-1e9)])
def test_fuzzer_counterexample_in_onnx(case):
    assert run_onnx_case(case).kind == "rewritten"


class _Addends(torch.nn.Module):
    """softmax(q·kᵀ/√d + slope·−|k − q| + Σᵢ (1 − padᵢ)·fill) @ v: each term added to the scores in turn,
    or (`summed`, T5's way) the padding terms summed first and added as one."""

    def __init__(self, fill: float, summed: bool = False):
        super().__init__()
        self.fill, self.summed = fill, summed
        self.slopes = torch.nn.Parameter(torch.tensor([0.5, 0.25]).view(1, 2, 1, 1))

    def forward(self, q, k, v, *pads):
        length = q.size(-2)
        positions = torch.arange(length)
        distance = (positions[None, :] - positions[:, None]).abs().float()
        scores = q @ k.transpose(-1, -2) / 8 - self.slopes * distance
        terms = [(1.0 - pad)[:, None, None, :] * self.fill for pad in pads]
        if self.summed:
            total = terms[0]
            for term in terms[1:]:
                total = total + term
            scores = scores + total
        else:
            for term in terms:
                scores = scores + term
        return torch.softmax(scores, -1) @ v


def _inputs(length: int, pads: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, length, 8, generator=generator, requires_grad=True) for _ in range(3))
    masks = []
    for number in range(pads):
        pad = (torch.rand(2, length, generator=generator) > 0.3).float()
        pad[0] = 0.0  # batch 0 keeps no key: every key at every fill decides its rows
        pad[1, number] = 1.0  # batch 1 keeps one
        masks.append(pad)
    return (q, k, v, *masks)


def _bias_program(gm):
    (call,) = [node for node in gm.graph.nodes if node.target is ATTENTION_OP]
    assert call.args[3] is None, "the biases became one dense tensor"
    return parse(call.args[14])


@pytest.mark.parametrize("fill", [-1e4, -1e9])
@pytest.mark.parametrize("pads,summed", [(2, False), (3, False), (2, True)])
def test_biases_are_added_in_the_models_order(fill, pads, summed):
    model = _Addends(fill, summed)
    inputs = _inputs(11, pads)
    gm, report = rewriter.optimize_module(model, inputs, chunk_size=(4, 3))
    assert report.rewritten_count == 1, report.summary()
    # the distance term and each padding term; T5's way: the distance term and the padding terms' sum
    assert len(_bias_program(gm).addends) == (2 if summed else pads + 1)
    for seed in (1, 2):
        inputs = _inputs(11, pads, seed=seed)
        want, got = model(*inputs), gm(*inputs)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, equal_nan=True)
        wrt = [*inputs[:3], model.slopes]
        assert_gradients_close(torch.autograd.grad(got.sum(), wrt), torch.autograd.grad(want.sum(), wrt))


def test_three_biases_in_onnx():
    model = _Addends(-1e4)
    inputs = _inputs(9, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = torch.onnx.export(model, inputs, dynamo=True, verbose=False).model_proto
    optimized, report = rewriter.optimize_onnx(original)
    assert report.rewritten_count == 1, report.summary()

    def run(proto, feeds):
        session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {i.name: x for i, x in zip(session.get_inputs(), feeds)})[0]

    for seed in (1, 2):
        feeds = [x.detach().numpy() for x in _inputs(9, 2, seed=seed)]
        np.testing.assert_allclose(run(optimized, feeds), run(original, feeds), rtol=1e-5, atol=1e-6)


def _op_inputs(length: int, fill: float, overlap: bool):
    """q, k, v (2, 2, length, 8) and two padding biases (2, length): where `overlap`, moderate values
    that both reach many entries (their order may round differently); else GPT-2-style fills, at most
    one nonzero per entry except where both are `fill`."""
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, length, 8, generator=generator) for _ in range(3))
    if overlap:
        first, second = (torch.randn(2, length, generator=generator) * 30 for _ in range(2))
    else:
        first = torch.where(torch.arange(length) % 3 == 0, fill, 0.0).expand(2, length).clone()
        second = torch.where(torch.arange(length) % 2 == 0, fill, 0.0).expand(2, length).clone()
    return q, k, v, first, second


def _op_program() -> str:
    builder = ProgramBuilder()
    batch, key = builder.index("batch"), builder.index("key")
    terms = [(builder.load(name, [batch, key], "float32"), 1.0) for name in ("first", "second")]
    return builder.program(sum_steps(builder, terms)).to_json()


@pytest.mark.parametrize("fill,overlap,fused", [
    (torch.finfo(torch.float32).min, False, True),  # an entry with both nonzero is at −3.4e38 + −3.4e38: exp() 0 either way
    (-1e4, False, False),  # both at −1e4: s − 1e4 − 1e4 is not s + (−2e4); those chunks run blockwise
    (0.0, True, False),
])
def test_fused_rows_take_a_chunk_only_where_the_order_cannot_matter(monkeypatch, fill, overlap, fused):
    q, k, v, first, second = _op_inputs(600, fill, overlap)
    taken = []
    original = fused_rows.FusedRows._parts

    def parts(self, q0, q1):
        found = original(self, q0, q1)
        taken.append(found is not None)
        return found

    monkeypatch.setattr(fused_rows.FusedRows, "_parts", parts)
    with torch.no_grad():
        got, _ = torch.ops.rewriter.attention(q, k, v, None, None, [first, second], 0.3, 0.0, float("-inf"), False, 0,
                                              256, 256, False, _op_program(), "", "")
        scores = q @ k.transpose(-1, -2) * 0.3
        scores = scores + first[:, None, None, :]
        scores = scores + second[:, None, None, :]
        want = torch.softmax(scores, -1) @ v
    assert taken and all(taken) == fused and any(taken) == fused, taken
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
