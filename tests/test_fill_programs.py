"""Score steps in the model's order: a bias added after a mask, a constant added before one (issue 10 item 5).

``where(c, s, F) + B == where(c, s + B, F + B)`` elementwise, so the op applies the bias before the
mask and fills each masked entry with ``F + B`` (a fill program, `passes.core.fill_programs`).

- GPT-2 as transformers 4.x wrote it (`_LegacyGpt2`: ``where(tril slice, s, finfo.min)`` then
  ``+ (1 − m)·finfo.min``) with right, left and full padding (rows whose every key is masked, which the
  fills decide): rewritten in FX (forward with NaN pattern, gradients, nothing n×n) and in ONNX (ORT
  on the exported original vs the optimised file, at two lengths; ORT's own kernels refuse the block;
  `export_onnx` keeps the fill program, verified against eager);
- HF GPT-2 of the installed transformers (eager) with the same padding, in FX and ONNX;
- the op with a fill program against the dense formula, forward and gradients (a float leaf of the
  fill program included), blockwise and through the fused rows;
- a constant added before a finite-fill mask becomes a constant bias (added to a dense bias where
  the block has one);
- near-miss: a bias after a finite-fill mask that is no program (data per query-key pair from a
  reduction) is left alone, with the reason.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import transformers

import rewriter
from parity import ATTENTION_OP, assert_gradients_close
from passes.core.score_programs import ProgramBuilder
from rewriter.kernels.score_program import parse
from test_fx_score_programs import n_by_n_nodes

LENGTH, OTHER_LENGTH, HIDDEN, HEADS = 12, 17, 64, 4
FILL_PROGRAM = 16  # the op's argument


def _padding(length: int) -> torch.Tensor:
    """(3, length) attention mask: right padding, left padding (its first rows see no key), all padded."""
    mask = torch.ones(3, length, dtype=torch.long)
    mask[0, length - 4:] = 0
    mask[1, :5] = 0
    mask[2] = 0
    return mask


def _ids(length: int) -> torch.Tensor:
    return torch.randint(0, 100, (3, length), generator=torch.Generator().manual_seed(length))


class _LegacyGpt2(torch.nn.Module):
    """Two GPT-2 blocks' attention as transformers 4.x computed it (`GPT2Attention._attn`, eager)."""

    def __init__(self, max_positions: int = 64):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(100, HIDDEN)
        self.c_attn = torch.nn.ModuleList(torch.nn.Linear(HIDDEN, 3 * HIDDEN) for _ in range(2))
        self.c_proj = torch.nn.ModuleList(torch.nn.Linear(HIDDEN, HIDDEN) for _ in range(2))
        tril = torch.tril(torch.ones(max_positions, max_positions, dtype=torch.bool))
        self.register_buffer("bias", tril.view(1, 1, max_positions, max_positions), persistent=False)

    def _attn(self, query, key, value, attention_mask):
        attn_weights = torch.matmul(query, key.transpose(-1, -2))
        attn_weights = attn_weights / torch.full([], value.size(-1) ** 0.5, dtype=attn_weights.dtype)
        query_length, key_length = query.size(-2), key.size(-2)
        causal_mask = self.bias[:, :, key_length - query_length: key_length, :key_length]
        mask_value = torch.full([], torch.finfo(attn_weights.dtype).min, dtype=attn_weights.dtype)
        attn_weights = torch.where(causal_mask, attn_weights.to(attn_weights.dtype), mask_value)
        attn_weights = attn_weights + attention_mask
        attn_weights = torch.softmax(attn_weights, dim=-1).type(value.dtype)
        return torch.matmul(attn_weights, value)

    def forward(self, ids, attention_mask):
        mask = attention_mask[:, None, None, :].to(torch.float32)
        mask = (1.0 - mask) * torch.finfo(torch.float32).min
        x = self.embed(ids)
        for c_attn, c_proj in zip(self.c_attn, self.c_proj):
            q, k, v = (t.unflatten(-1, (HEADS, -1)).transpose(1, 2) for t in c_attn(x).split(HIDDEN, -1))
            x = x + c_proj(self._attn(q, k, v, mask).transpose(1, 2).flatten(2))
        return x


class _HfGpt2(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = transformers.GPT2Model(transformers.GPT2Config(
            n_embd=HIDDEN, n_head=HEADS, n_layer=2, vocab_size=100, use_cache=False,
            attn_implementation="eager")).eval()

    def forward(self, ids, attention_mask):
        return self.model(input_ids=ids, attention_mask=attention_mask).last_hidden_state


def _assert_parity(model, gm, ids, mask) -> None:
    """Outputs (NaN pattern included) and the gradients of every parameter."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    want, got = model(ids, mask), gm(ids, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, equal_nan=True)
    weights = torch.linspace(-1, 1, want.shape[-1])
    grads = [torch.autograd.grad((out.nan_to_num() * weights).sum(), parameters, allow_unused=True)
             for out in (got, want)]
    assert_gradients_close(*grads)


@pytest.mark.parametrize("family", ["legacy", "hf"])
def test_gpt2_with_padding_is_rewritten_exactly(family):
    model = (_LegacyGpt2() if family == "legacy" else _HfGpt2()).eval()
    gm, report = rewriter.optimize_module(model, (_ids(LENGTH), _padding(LENGTH)))
    assert [match.rewritten for match in report.matches] == [True, True], report.summary()
    calls = [node for node in gm.graph.nodes if node.target is ATTENTION_OP]
    assert len(calls) == 2
    if family == "legacy":  # the padding bias after the causal where: a fill program over the (B, L) mask
        assert all(call.args[FILL_PROGRAM] and call.args[3] is None and call.args[4] is None for call in calls)
    assert not n_by_n_nodes(gm, LENGTH), n_by_n_nodes(gm, LENGTH)
    for length in (LENGTH, OTHER_LENGTH):
        _assert_parity(model, gm, _ids(length), _padding(length))


def _export(model) -> bytes:
    length = torch.export.Dim("length", min=2, max=60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (_ids(LENGTH), _padding(LENGTH)), dynamo=True, verbose=False,
                                    input_names=["ids", "attention_mask"],
                                    dynamic_shapes=({1: length}, {1: length}))
    return program.model_proto.SerializeToString()


def _ort(model: bytes, length: int) -> np.ndarray:
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, (_ids(length).numpy(), _padding(length).numpy()))))[0]


@pytest.mark.parametrize("family", ["legacy", "hf"])
def test_gpt2_with_padding_in_onnx(family):
    original = _export((_LegacyGpt2() if family == "legacy" else _HfGpt2()).eval())
    optimized, report = rewriter.optimize_onnx(onnx.load_from_string(original))
    assert [match.rewritten for match in report.matches] == [True, True], report.summary()
    assert all(match.target == "chunked" for match in report.matches)
    for length in (LENGTH, OTHER_LENGTH):
        np.testing.assert_allclose(_ort(optimized.SerializeToString(), length), _ort(original, length),
                                   rtol=1e-4, atol=1e-5, equal_nan=True)
    if family == "legacy":
        _, report = rewriter.optimize_onnx(onnx.load_from_string(original), target="ort")
        assert not any(match.rewritten for match in report.matches)
        assert all("per entry" in match.reason for match in report.matches), report.summary()


def test_legacy_gpt2_export_keeps_the_fill_program(tmp_path):
    """`export_onnx` translates the op with its fill program; its verification compares ORT with eager."""
    path = tmp_path / "gpt2.onnx"
    report = rewriter.export_onnx(_LegacyGpt2().eval(), (_ids(LENGTH), _padding(LENGTH)), str(path))
    assert report.rewritten_count == 2, report.summary()
    assert report.verification, "ORT was not compared with eager"


def _programs(fill: float, offset: int):
    """keep = key ≤ query + offset; bias = extra[b, key]; fill program = fill + extra[b, key] (fp32)."""
    builder = ProgramBuilder()
    query, key, batch = (builder.index(axis) for axis in ("query", "key", "batch"))
    shifted = builder.add("add", (query, builder.const(offset, "int64")), dtype="int64")
    keep = builder.add("le", (key, shifted), dtype="bool")
    extra = builder.load("extra", [batch, key], "float32")
    filled = builder.add("add", (builder.add("cast", (builder.const(fill, "float32"),), dtype="float32"), extra),
                         dtype="float32")
    return [builder.program(step).to_json() for step in (extra, keep, filled)]


def _dense(q, k, v, extra, fill, offset):
    scores = q @ k.transpose(-1, -2) * 0.3
    rows, cols = torch.arange(q.size(-2), device=q.device)[:, None], torch.arange(k.size(-2), device=q.device)[None, :]
    scores = torch.where(cols <= rows + offset, scores, torch.full([], fill, device=q.device)) + extra[:, None, None, :]
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("fill,offset,chunks", [
    (torch.finfo(torch.float32).min, -1, (3, 4)),  # row 0 keeps no key: min + extra decides it
    (-1e4, 0, (4, 3)), (-30.0, -2, (16, 16)), (float("-inf"), -1, (2, 5)),
])
def test_op_fill_program_matches_the_dense_formula(fill, offset, chunks):
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 9, 8, generator=generator, requires_grad=True) for _ in range(3))
    extra = torch.randn(2, 9, generator=generator)
    extra[1, :4] = torch.finfo(torch.float32).min  # GPT-2's padding: min + min is −∞ in fp32
    extra.requires_grad_()
    bias, keep, filled = _programs(fill, offset)
    inputs = (q, k, v, extra)

    def op(q, k, v, extra):
        out, _ = torch.ops.rewriter.attention(q, k, v, None, None, [extra], 0.3, 0.0, fill, False, 0, *chunks, False,
                                              bias, keep, filled)
        return out

    want, got = _dense(*inputs, fill, offset), op(*inputs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, equal_nan=True)
    loss = [(out.nan_to_num() * torch.linspace(-1, 1, 8)).sum() for out in (got, want)]
    for got_grad, want_grad in zip(*(torch.autograd.grad(value, inputs) for value in loss)):
        # A NaN row (every key at −∞) makes dv and its row of the leaf's gradient NaN in both
        torch.testing.assert_close(got_grad, want_grad, atol=1e-4, rtol=1e-4, equal_nan=True)
    with torch.no_grad():  # no leaf gradient wanted: chunks of rows that keep a key may take the fused kernel
        torch.testing.assert_close(op(*inputs), want, atol=1e-5, rtol=1e-4, equal_nan=True)


def test_opcheck_with_a_fill_program():
    generator = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 6, 8, generator=generator) for _ in range(3))
    extra = torch.randn(2, 6, generator=generator)
    bias, keep, filled = _programs(-1e4, -1)
    args = (q, k, v, None, None, [extra], 0.3, 0.0, -1e4, False, 0, 4, 4, False, bias, keep, filled)
    torch.library.opcheck(ATTENTION_OP, args)


def test_a_fill_program_needs_a_mask():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="fill program needs a mask"):
        torch.ops.rewriter.attention(q, q, q, None, None, [], 1.0, 0.0, -1e4, False, 0, 4, 4, False, "", "",
                                     _programs(-1e4, 0)[2])


class _Shifted(torch.nn.Module):
    """softmax(where(keep, q·kᵀ/8 + 3, −5)) @ v: the constant moves the kept scores, not the fill."""

    def __init__(self, dense_bias: bool = False):
        super().__init__()
        self.dense_bias = dense_bias

    def forward(self, q, k, v, keep, pairs):
        scores = q @ k.transpose(-1, -2) / 8 + 3.0
        if self.dense_bias:  # an (L, L) input: data per pair, stays a tensor operand
            scores = scores + pairs
        return torch.softmax(torch.where(keep, scores, -5.0), -1) @ v


def _shift_inputs(length: int = 7):
    generator = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(2, 2, length, 8, generator=generator, requires_grad=True) for _ in range(3))
    keep = (torch.arange(length)[None, :] < torch.tensor([length, 0])[:, None])[:, None, None, :]
    return q, k, v, keep, torch.randn(length, length, generator=generator)


@pytest.mark.parametrize("dense_bias", [False, True])
def test_a_constant_before_a_finite_fill_mask_is_a_bias(dense_bias):
    model = _Shifted(dense_bias).eval()
    inputs = _shift_inputs()
    gm, report = rewriter.optimize_module(model, inputs, dynamic_shapes=None)
    assert report.rewritten_count == 1, report.summary()
    (call,) = [node for node in gm.graph.nodes if node.target is ATTENTION_OP]
    if dense_bias:  # two addends, the constant then the (L, L) input (read as it is), added in that order
        program = parse(call.args[14])
        assert call.args[3] is None
        assert [(program.steps[step].op, program.steps[step].attr) for step in program.addends] == [
            ("const", 3.0), ("load", 0)], call.args[14]
    else:
        assert [(step.op, step.attr) for step in parse(call.args[14]).steps] == [("const", 3.0)], call.args[14]
    want, got = model(*inputs), gm(*inputs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert_gradients_close(torch.autograd.grad(got.sum(), inputs[:3]), torch.autograd.grad(want.sum(), inputs[:3]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = torch.onnx.export(model, inputs, dynamo=True, verbose=False).model_proto
    optimized, report = rewriter.optimize_onnx(original)
    assert report.rewritten_count == 1, report.summary()
    feeds = [x.detach().numpy() for x in inputs]

    def run(proto):
        session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {i.name: x for i, x in zip(session.get_inputs(), feeds)})[0]

    np.testing.assert_allclose(run(optimized), run(original), rtol=1e-4, atol=1e-5)


class _ProductAfterMask(torch.nn.Module):
    """where(causal, s, −1e4) + Σ_c a[i, c]·b[j, c]: the bias is data per (query, key) pair (a reduction)."""

    def forward(self, q, k, v, a, b):
        length = q.size(-2)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        pairs = (a[:, None, :] * b[None, :, :]).sum(-1)
        scores = torch.where(causal, q @ k.transpose(-1, -2) / 8, -1e4) + pairs
        return torch.softmax(scores, -1) @ v


def test_near_misses_are_left_alone_with_the_reason():
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 6, 8, generator=generator) for _ in range(3))
    a, b = torch.randn(6, 3, generator=generator), torch.randn(6, 3, generator=generator)
    _, report = rewriter.optimize_module(_ProductAfterMask(), (q, k, v, a, b), dynamic_shapes=None)
    (match,) = report.matches
    assert not match.rewritten and "not a score program" in match.reason, report.summary()
