"""The ops and rewrites on CUDA: parity with eager math on the same device, forward (NaN pattern
included) and backward; skipped where CUDA is not available.

- `rewriter::attention`: plain, causal (top-left and with offsets), GQA, cross lengths, soft-cap, a
  dense bias with its gradient, a bool mask with an all-masked row (NaN, or 0 with
  ``zero_masked_rows``), mask programs (padding ∧ causal), a T5-like bias program (a learned table's
  gradient), fill programs; in fp32, and fp16/bf16 against an fp32 reference with looser bounds;
- SDPA's memory-efficient kernel (`rewriter.kernels.efficient_attention`): which calls take it, and
  that they agree with the blockwise path (forced by a zero bias), log-sum-exp included;
- `rewriter::linear_attention`, causal and bidirectional;
- `rewriter.optimize_module` on a small causal + padding model and on HF LLaMA and T5 (when
  `transformers` imports), and ``torch.compile(model, backend="rewriter")`` on one model.
"""

from __future__ import annotations

import math

import pytest
import torch

import rewriter
import rewriter.compile_backend  # noqa: F401  (registers the "rewriter" backend)
import rewriter.kernels.attention_op as attention_op
import rewriter.kernels.linear_attention_op  # noqa: F401  (registers torch.ops.rewriter.linear_attention)
from parity import assert_gradients_close, assert_parity, naive_attention, run_op
from rewriter.kernels.chunked_attention import ScoreOptions, ScoreTerms
from test_score_programs import _dense as t5_dense
from test_score_programs import _programs as t5_programs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICE = "cuda"
LOW_PRECISION = {torch.float16: 1e-2, torch.bfloat16: 5e-2}  # max error ≤ tol · (1 + max |reference|)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _assert_close(got, want, dtype, atol, rtol, what=""):
    """fp32: elementwise; fp16/bf16 (against an fp32 reference): the largest error relative to the
    reference's magnitude. NaN patterns must match in both."""
    if got is None or want is None:
        assert got is None or not got.abs().any(), f"{what}: gradient where eager has none"
        return
    got, want = got.float(), want.float()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{what}: {m}")
        return
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN patterns differ"
    finite = ~want.isnan()
    error = (got[finite] - want[finite]).abs().max().item() if finite.any() else 0.0
    bound = LOW_PRECISION[dtype] * (1 + want[finite].abs().max().item() if finite.any() else 1)
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g} ({dtype})"


def _loss(output: torch.Tensor) -> torch.Tensor:
    """A loss that weighs every output feature differently; NaN rows contribute nothing."""
    weights = torch.linspace(-1, 1, output.shape[-1], device=output.device, dtype=torch.float32)
    return (output.float().nan_to_num() * weights).sum()


def _check(op, reference, tensors, dtype, grad_of, atol=1e-4, grad_atol=1e-3, cast=(0, 1, 2)):
    """`op(*tensors)` with the tensors at the indices `cast` (q, k, v) in `dtype` against `reference` on
    fp32 copies: outputs, and the gradients of the tensors at the indices `grad_of`."""
    low = [t.to(dtype) if index in cast else t for index, t in enumerate(tensors)]
    high = [t.float() if t is not None and t.is_floating_point() else t for t in tensors]
    for group in (low, high):
        for index in grad_of:
            group[index] = group[index].detach().requires_grad_()
    got, want = op(*low), reference(*high)
    _assert_close(got, want, dtype, atol, 1e-4, "output")
    if grad_of:
        got_grads = torch.autograd.grad(_loss(got), [low[i] for i in grad_of], allow_unused=True)
        want_grads = torch.autograd.grad(_loss(want), [high[i] for i in grad_of], allow_unused=True)
        for index, g, w in zip(grad_of, got_grads, want_grads):
            _assert_close(g, w, dtype, grad_atol, 1e-3, f"gradient of input {index}")


def _qkv(batch, heads, kv_heads, q_len, k_len, head_dim, seed=0):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=generator, device=DEVICE)
    k = torch.randn(batch, kv_heads, k_len, head_dim, generator=generator, device=DEVICE)
    v = torch.randn(batch, kv_heads, k_len, head_dim, generator=generator, device=DEVICE)
    return q, k, v


# name: (batch, heads, kv_heads, q_len, k_len, head_dim, causal, offset, softcap)
CASES = {
    "plain": (2, 4, 4, 77, 77, 64, False, 0, 0.0),
    "causal": (2, 4, 4, 77, 77, 64, True, 0, 0.0),
    "causal_bottom_right": (1, 4, 4, 40, 77, 64, True, 37, 0.0),
    "causal_offset": (1, 2, 2, 50, 50, 32, True, 3, 0.0),
    "gqa_causal": (2, 8, 2, 65, 65, 64, True, 0, 0.0),
    "cross": (2, 4, 1, 33, 100, 64, False, 0, 0.0),
    "long_queries_causal": (1, 2, 2, 90, 40, 64, True, 0, 0.0),
    "softcap": (1, 4, 2, 60, 60, 64, True, 0, 5.0),
    "head_dim_12": (1, 2, 2, 45, 45, 12, True, 0, 0.0),
    "head_dim_160": (1, 2, 2, 45, 45, 160, False, 0, 0.0),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_attention_matches_eager(case, dtype):
    batch, heads, kv_heads, q_len, k_len, head_dim, causal, offset, softcap = CASES[case]
    opts = ScoreOptions(head_dim**-0.5, softcap, -math.inf, causal, offset, 32, 48)
    q, k, v = _qkv(batch, heads, kv_heads, q_len, k_len, head_dim)
    _check(lambda q, k, v: run_op(q, k, v, None, None, opts), lambda q, k, v: naive_attention(q, k, v, None, None, opts),
           [q, k, v], dtype, grad_of=(0, 1, 2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_bias_and_its_gradient(dtype):
    q, k, v = _qkv(2, 4, 2, 50, 70, 64, seed=1)
    bias = torch.randn(1, 4, 50, 70, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(2))
    opts = ScoreOptions(0.125, 0.0, -math.inf, True, 20, 16, 32)
    _check(lambda q, k, v, b: run_op(q, k, v, b, None, opts), lambda q, k, v, b: naive_attention(q, k, v, b, None, opts),
           [q, k, v, bias], dtype, grad_of=(0, 1, 2, 3), cast=(0, 1, 2, 3))


@pytest.mark.parametrize("zero_rows", [False, True])
@pytest.mark.parametrize("fill", [-math.inf, -1e9])
def test_bool_mask_with_an_all_masked_row(zero_rows, fill):
    """−∞ fill: NaN on the hidden row, or 0 (gradient 0) with zero_masked_rows; a finite fill: the mean
    of V there either way, as eager gives."""
    q, k, v = _qkv(2, 4, 4, 40, 40, 64, seed=3)
    mask = torch.rand(2, 1, 40, 40, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(4)) > 0.4
    mask[1, :, 7] = False  # row 7 of batch 1 sees no key
    opts = ScoreOptions(0.125, 0.0, fill, False, 0, 16, 16, zero_rows)
    seen = mask.any(-1, keepdim=True)

    def reference(q, k, v):
        if not zero_rows or fill != -math.inf:
            return naive_attention(q, k, v, None, mask, opts)
        return torch.where(seen, naive_attention(q, k, v, None, mask | ~seen, opts), 0.0)  # SDPA's 0, gradient 0

    out = run_op(q, k, v, None, mask, opts)
    assert bool(out[1, :, 7].isnan().all()) == (fill == -math.inf and not zero_rows)
    _check(lambda q, k, v: run_op(q, k, v, None, mask, opts), reference, [q, k, v], torch.float32,
           grad_of=(0, 1, 2) if zero_rows or fill != -math.inf else ())


def _padding(leading: bool) -> torch.Tensor:
    pad = torch.ones(2, 37, dtype=torch.bool, device=DEVICE)
    if leading:
        pad[1, :9] = False  # with causality, rows 0–8 of batch 1 see no key at all
    else:
        pad[1, -9:] = False
    return pad


@pytest.mark.parametrize("with_bias", [False, True], ids=["padding_and_causal", "t5_bias_and_mask"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_score_programs_match_their_dense_tensors(with_bias, dtype):
    """Programs over O(n) leaves: padding ∧ causal keep-mask, and a T5-like bucket table's bias."""
    pad = _padding(leading=False)
    table = torch.randn(16, 4, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(5))
    q, k, v = _qkv(2, 4, 4, 37, 37, 64, seed=6)
    opts = ScoreOptions(0.3, 0.0, -math.inf, False, 0, 8, 16)

    def op(q, k, v, table):
        bias_program, mask_program, leaves = t5_programs(pad, table)
        return run_op(q, k, v, None, None, opts, leaves, bias_program.to_json() if with_bias else "",
                      mask_program.to_json())

    def reference(q, k, v, table):
        bias, keep = t5_dense(pad, table)
        return naive_attention(q, k, v, bias if with_bias else None, keep, opts)

    _check(op, reference, [q, k, v, table], dtype, grad_of=(0, 1, 2, 3) if with_bias else (0, 1, 2))


@pytest.mark.parametrize("zero_rows", [False, True])
def test_score_programs_on_rows_that_see_no_key(zero_rows):
    pad = _padding(leading=True)
    table = torch.randn(16, 4, device=DEVICE)
    q, k, v = _qkv(2, 4, 4, 37, 37, 32, seed=7)
    opts = ScoreOptions(0.3, 0.0, -math.inf, False, 0, 8, 16, zero_rows)
    bias_program, mask_program, leaves = t5_programs(pad, table)
    bias, keep = t5_dense(pad, table)
    got = run_op(q, k, v, None, None, opts, leaves, bias_program.to_json(), mask_program.to_json())
    want = naive_attention(q, k, v, bias, keep, opts)
    torch.testing.assert_close(got, want.nan_to_num() if zero_rows else want, atol=1e-4, rtol=1e-4, equal_nan=True)
    assert bool(got.isnan().any()) != zero_rows


@pytest.mark.parametrize("fill,offset", [(-1e4, 0), (torch.finfo(torch.float32).min, -1), (-30.0, -2)])
def test_fill_programs_match_the_dense_formula(fill, offset):
    fill_programs = pytest.importorskip("test_fill_programs")  # its module imports transformers
    generator = torch.Generator(device=DEVICE).manual_seed(8)
    q, k, v = (torch.randn(2, 2, 9, 8, generator=generator, device=DEVICE) for _ in range(3))
    extra = torch.randn(2, 9, generator=generator, device=DEVICE)
    extra[1, :4] = torch.finfo(torch.float32).min  # GPT-2's padding: min + min is −∞ in fp32
    bias, keep, filled = fill_programs._programs(fill, offset)

    def op(q, k, v, extra):
        out, _ = torch.ops.rewriter.attention(q, k, v, None, None, [extra], 0.3, 0.0, fill, False, 0, 4, 3, False,
                                              bias, keep, filled)
        return out

    _check(op, lambda q, k, v, extra: fill_programs._dense(q, k, v, extra, fill, offset), [q, k, v, extra],
           torch.float32, grad_of=(0, 1, 2, 3))


# --------------------------------------------------------------------------- the fused CUDA kernel


def _fused(q, k, v, opts, bias=None) -> bool:
    return attention_op.uses_fused_kernel(q, k, v, ScoreTerms(bias, None), opts)


def test_which_calls_take_the_fused_kernel():
    q, k, v = _qkv(1, 4, 2, 20, 20, 64)
    opts = ScoreOptions(0.125, causal=True)
    for dtype in DTYPES:
        assert _fused(q.to(dtype), k.to(dtype), v.to(dtype), opts), dtype
    assert _fused(q, k, v, ScoreOptions(0.125))
    assert not _fused(q, k, v, ScoreOptions(0.125, causal=True, causal_offset=2))  # bottom-right: blockwise
    assert not _fused(q, k, v, ScoreOptions(0.125, softcap=5.0))
    assert not _fused(q, k, v, opts, bias=torch.zeros(1, 1, 20, 20, device=DEVICE))
    q2, k2, v2 = _qkv(2, 4, 2, 20, 20, 64)
    assert not _fused(q2, k2[:1], v2[:1], opts)  # K/V batch 1 under a query batch 2: blockwise
    half = [t.half() for t in _qkv(1, 2, 2, 20, 20, 12)]
    assert not _fused(*half, opts)  # fp16 head dim not a multiple of 8
    assert not _fused(*_qkv(1, 2, 2, 20, 20, 160), opts)  # head dim over 128


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 1])
def test_fused_kernel_agrees_with_the_blockwise_path(dtype, causal, kv_heads):
    """The same call with a zero bias runs blockwise: outputs, log-sum-exp and gradients agree."""
    q, k, v = (t.to(dtype).requires_grad_() for t in _qkv(2, 4, kv_heads, 130, 97, 64, seed=9))
    zeros = torch.zeros(1, 1, 130, 97, device=DEVICE, dtype=dtype)
    args = ([], 0.125, 0.0, -math.inf, causal, 0, 32, 32, False, "", "", "")
    assert _fused(q, k, v, ScoreOptions(0.125, causal=causal))
    fused, fused_stats = torch.ops.rewriter.attention(q, k, v, None, None, *args)
    blockwise, block_stats = torch.ops.rewriter.attention(q, k, v, zeros, None, *args)
    assert torch.equal(fused_stats[..., 1], torch.ones_like(fused_stats[..., 1]))  # stored as (lse, 1)
    lse_fused = fused_stats[..., 0] + fused_stats[..., 1].log()
    lse_block = block_stats[..., 0] + block_stats[..., 1].log()
    torch.testing.assert_close(lse_fused, lse_block, atol=1e-3 if dtype != torch.float32 else 1e-5, rtol=1e-4)
    _assert_close(fused, blockwise, dtype, 1e-5, 1e-4, "output")
    grads = [torch.autograd.grad(_loss(out), (q, k, v)) for out in (fused, blockwise)]
    for name, got, want in zip("qkv", *grads):
        _assert_close(got, want, dtype, 1e-4, 1e-3, f"d{name}")


# --------------------------------------------------------------------------- linear attention


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind,with_projection", [("favor_softmax", True), ("relu", False)])
def test_linear_attention_matches_eager(causal, kind, with_projection):
    linear = pytest.importorskip("test_linear_attention_op")  # its module imports hypothesis
    inputs = linear.make_inputs(2, 2, 2, 70, 70, 16, 24, 16, with_projection, seed=10)
    q, k, v, proj = (None if t is None else t.detach().to(DEVICE).requires_grad_() for t in inputs)
    leaves = [t for t in (q, k, v, proj) if t is not None]
    scale, eps = 16**-0.25, linear.FEATURE_EPSILON[kind]
    expected = linear.naive(q, k, v, proj, kind, causal, scale, eps)
    actual = linear.run_op(q, k, v, proj, kind, causal, scale, eps, 16)
    linear.assert_parity(expected, actual, leaves, fwd_atol=1e-4, bwd_atol=1e-3, rtol=1e-3)


# --------------------------------------------------------------------------- whole models


class _CausalPaddingAttention(torch.nn.Module):
    """One attention layer: softmax(q kᵀ / √d, causal ∧ key padding) v, its mask built by the model."""

    def __init__(self, hidden=64, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv, self.out = torch.nn.Linear(hidden, 3 * hidden), torch.nn.Linear(hidden, hidden)

    def forward(self, x, padding):
        batch, length, hidden = x.shape
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(hidden // self.heads)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~(causal & padding[:, None, None, :]), float("-inf"))
        return self.out((torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(batch, length, hidden))


def test_optimize_module_on_a_causal_padding_model():
    torch.manual_seed(0)
    model = _CausalPaddingAttention().to(DEVICE)
    x = torch.randn(2, 50, 64, device=DEVICE)
    padding = torch.ones(2, 50, dtype=torch.bool, device=DEVICE)
    padding[1, -7:] = False
    assert_parity(model, (x, padding), rewrites=1, atol=1e-4, grad_atol=1e-3)


def _hf_parity(family: str, length: int = 48) -> None:
    pytest.importorskip("transformers")
    from benchmarks.hf_families import NoSuchImplementation, build_model, padding_mask, token_ids

    try:
        model = build_model(family, "eager", length, length).to(DEVICE)
    except NoSuchImplementation as error:
        pytest.skip(str(error))
    ids = torch.from_numpy(token_ids(2, length)).to(DEVICE)
    mask = torch.from_numpy(padding_mask(2, length)).to(DEVICE)
    gm, report = rewriter.optimize_module(model, (ids,), example_kwargs={"attention_mask": mask})
    assert report.rewritten_count == 2, report.summary()

    def hidden(output):
        output = output[0] if isinstance(output, (tuple, list)) else output
        return output.last_hidden_state if hasattr(output, "last_hidden_state") else output

    want, got = hidden(model(input_ids=ids, attention_mask=mask)), hidden(gm(ids, attention_mask=mask))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, equal_nan=True)
    parameters = [p for p in model.parameters() if p.requires_grad]
    assert_gradients_close(torch.autograd.grad(_loss(got), parameters, allow_unused=True),
                           torch.autograd.grad(_loss(want), parameters, allow_unused=True), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_optimize_module_on_hf_models(family):
    _hf_parity(family)


def test_torch_compile_with_the_rewriter_backend():
    from model_families import GPT2Model

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT2Model().to(DEVICE).eval()
    (ids,) = (t.to(DEVICE) for t in model.example_inputs(2, 40))
    rewriter.compile_backend.compile_reports(clear=True)
    compiled = torch.compile(model, backend="rewriter", options={"compiler": "aot_eager"})
    expected, actual = model(ids), compiled(ids)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    parameters = list(model.parameters())
    assert_gradients_close(torch.autograd.grad(_loss(actual), parameters, allow_unused=True),
                           torch.autograd.grad(_loss(expected), parameters, allow_unused=True), atol=1e-3, rtol=1e-3)
    reports = rewriter.compile_backend.compile_reports()
    assert sum(report.rewritten_count for report in reports) == 2, [report.summary() for report in reports]
