"""`rewriter::attention` against naive attention: random shapes, masks, chunk sizes; opcheck."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rewriter.kernels.attention_op as attention_op
from rewriter.kernels.chunked_attention import ScoreOptions, ScoreTerms
from rewriter.kernels.fused_rows import FusedRows
from parity import naive_attention, run_op
from passes.core.planner import parse_size, plan_chunk_sizes
from passes.core.attention_spec import AttentionSpec


@st.composite
def attention_cases(draw):
    batch, kv_heads, groups = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3]))
    query_len, key_len = draw(st.integers(1, 37)), draw(st.integers(1, 37))
    head_dim = draw(st.sampled_from([1, 4, 8]))
    causal = draw(st.booleans())
    offset = draw(st.integers(0, 4)) + (key_len - query_len if draw(st.booleans()) else 0)
    opts = ScoreOptions(
        scale=draw(st.floats(0.05, 1.5)),
        softcap=draw(st.sampled_from([0.0, 0.0, 3.0])),
        mask_fill=draw(st.sampled_from([-math.inf, -1e9, torch.finfo(torch.float32).min])),
        causal=causal, causal_offset=max(offset, 0) if causal else 0,
        q_chunk=draw(st.integers(1, 40)), k_chunk=draw(st.integers(1, 40)),
    )
    bias_shape = draw(st.sampled_from([None, (1, 1, 1, key_len), (batch, 1, query_len, key_len),
                                       (1, kv_heads * groups, query_len, key_len)]))
    mask_shape = draw(st.sampled_from([None, (batch, 1, 1, key_len), (1, 1, query_len, key_len)]))
    seed = draw(st.integers(0, 2**16))
    return batch, kv_heads, groups, query_len, key_len, head_dim, bias_shape, mask_shape, seed, opts


def _tensors(batch, kv_heads, groups, query_len, key_len, head_dim, bias_shape, mask_shape, seed):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * groups, query_len, head_dim, generator=generator)
    k = torch.randn(batch, kv_heads, key_len, head_dim, generator=generator)
    v = torch.randn(batch, kv_heads, key_len, head_dim + 1, generator=generator)
    bias = None if bias_shape is None else torch.randn(bias_shape, generator=generator)
    mask = None if mask_shape is None else torch.rand(mask_shape, generator=generator) > 0.3
    return q, k, v, bias, mask


@settings(max_examples=80, deadline=None)
@given(attention_cases())
def test_op_matches_naive_forward_and_backward(case):
    *shape, opts = case
    q, k, v, bias, mask = _tensors(*shape)
    leaves = [t.requires_grad_() for t in (q, k, v) + ((bias,) if bias is not None else ())]
    expected = naive_attention(q, k, v, bias, mask, opts)
    actual = run_op(q, k, v, bias, mask, opts)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4, equal_nan=True)
    grad = torch.randn_like(expected)
    # Rows with every key at −∞ are NaN in both; their gradients are not compared.
    finite_rows = ~expected.isnan().any(-1, keepdim=True)
    expected_grads = torch.autograd.grad(expected, leaves, grad * finite_rows, allow_unused=True)
    actual_grads = torch.autograd.grad(actual, leaves, grad * finite_rows, allow_unused=True)
    if bool(finite_rows.all()):
        for want, got in zip(expected_grads, actual_grads):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("causal", [False, True])
def test_bf16_matches_fp32_reference(causal):
    opts = ScoreOptions(scale=0.125, causal=causal, q_chunk=16, k_chunk=32)
    q, k, v, _, _ = _tensors(1, 2, 2, 70, 70, 64, None, None, seed=3)
    expected = naive_attention(q, k, v, None, None, opts)
    actual = run_op(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, None, opts)
    torch.testing.assert_close(actual.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("masked", [False, True])
def test_fused_and_chunked_paths_agree(masked):
    q, k, _, _, mask = _tensors(2, 2, 2, 50, 50, 16, None, (2, 1, 1, 50) if masked else None, seed=5)
    v = torch.randn_like(k)
    opts = ScoreOptions(scale=0.25, q_chunk=8, k_chunk=16)
    assert attention_op.uses_fused_kernel(q, k, v, ScoreTerms(None, mask), opts) != masked
    torch.testing.assert_close(run_op(q, k, v, None, mask, opts), naive_attention(q, k, v, None, mask, opts))


def test_fully_masked_row_is_nan_like_eager_and_stays_off_the_fused_kernel():
    q, k, v, _, _ = _tensors(1, 1, 1, 4, 6, 8, None, None, seed=1)
    mask = torch.ones(1, 1, 4, 6, dtype=torch.bool)
    mask[..., 2, :] = False
    opts = ScoreOptions(scale=0.3)
    assert FusedRows(q, k, v, ScoreTerms(None, mask), opts).forward(0, 4) is None
    out = run_op(q, k, v, None, mask, opts)
    assert out[0, 0, 2].isnan().all() and not out[0, 0, [0, 1, 3]].isnan().any()


@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(with_bias):
    q, k, v, bias, mask = _tensors(1, 2, 2, 9, 11, 8, (1, 1, 9, 11) if with_bias else None, (1, 1, 1, 11), seed=2)
    for t in (q, k, v) + ((bias,) if with_bias else ()):
        t.requires_grad_()
    args = (q, k, v, bias, mask, [], 0.3, 2.0 if with_bias else 0.0, -math.inf, True, 0, 4, 5, False, "", "", "")
    torch.library.opcheck(torch.ops.rewriter.attention.default, args)


@pytest.mark.parametrize("fused", [False, True])
def test_opcheck_on_transposed_inputs(fused):
    """Sequence-first projections arrive as non-contiguous views: fake strides must still match."""
    q, k, v = (torch.randn(2, 9, 4, 8).transpose(1, 2).requires_grad_() for _ in range(3))
    args = (q, k, v, None, None, [], 0.3, 0.0 if fused else 2.0, -math.inf, False, 0, 4, 5, False, "", "", "")
    torch.library.opcheck(torch.ops.rewriter.attention.default, args)


def test_shape_errors_are_clear():
    q = torch.randn(1, 3, 4, 8)
    k = v = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="incompatible"):
        run_op(q, k, v, None, None, ScoreOptions(scale=1.0))


def _spec(heads=2, length=16384):
    return AttentionSpec("softmax", (), batch_size=1, num_heads=heads, seq_len_q=length, seq_len_k=length)


def test_planner_fits_the_budget_and_respects_overrides():
    for budget in ("8MiB", "64MiB", "1GiB"):
        chunks = plan_chunk_sizes(_spec(), budget)
        assert 2 * chunks.query * chunks.key * 4 * 4 <= parse_size(budget)
    assert plan_chunk_sizes(_spec(length=100)) == plan_chunk_sizes(_spec(length=100), "1GiB")
    assert plan_chunk_sizes(_spec(length=100)).query == 100
    assert plan_chunk_sizes(_spec(), chunk_size=(3, 5)).key == 5
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_rows_whose_every_key_has_a_finfo_min_bias_keep_exact_gradients():
    """Found by BLOOM with left padding: the fused kernel's backward lost log(sum) at finfo.min."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8, requires_grad=True) for _ in range(3))
    bias = torch.zeros(1, 1, 6, 6)
    bias[..., :3, :] = torch.finfo(torch.float32).min  # rows 0-2 see no key at all
    grad = torch.randn(1, 2, 6, 8)
    eager = torch.softmax(q @ k.transpose(-1, -2) * 0.3 + bias, -1) @ v
    want = torch.autograd.grad(eager, (q, k, v), grad)
    out, _ = torch.ops.rewriter.attention(q, k, v, bias, None, [], 0.3, 0.0, float("-inf"), False, 0, 1024, 4096, False, "", "", "")
    got = torch.autograd.grad(out, (q, k, v), grad)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_a_part_at_minus_infinity_on_a_whole_row_weighs_nothing():
    """A bias at −∞ on every key of one part of a row (a sliding window given as an additive bias,
    with the causal flag splitting off the keys left of the diagonal band) on the fused-rows path:
    that part's rows weigh 0 in the merge, whatever log-sum-exp the kernel reports for them (it
    reported 0, which weighed them in: outputs 0.13 off)."""
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 96, 16, generator=generator).requires_grad_() for _ in range(3))
    rows, cols = torch.arange(96)[:, None], torch.arange(96)[None, :]
    bias = torch.where(cols > rows - 8, 0.0, -math.inf)[None, None]
    opts = ScoreOptions(0.25, 0.0, -math.inf, True, 0, 32, 32)
    got = run_op(q, k, v, bias, None, opts)
    want = naive_attention(q, k, v, bias, None, opts)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(torch.autograd.grad(got.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
