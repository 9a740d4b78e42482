"""Chunked-attention ONNX subgraph: parity with a naive float64 softmax on ONNX Runtime (CPU)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewriter.kernels.onnx_chunked_attention import (
    build_chunked_attention,
    make_chunked_attention_model,
)

FINITE_FILL = -3.4e38


def _reference(q, k, v, bias=None, mask=None, *, scale, softcap=0.0, mask_fill=-math.inf,
               causal=False, causal_offset=0, **_chunks):
    groups = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, groups, 1).astype(np.float64), np.repeat(v, groups, 1).astype(np.float64)
    s = scale * (q.astype(np.float64) @ k.swapaxes(-1, -2))
    if softcap:
        s = softcap * np.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = np.where(mask, s, mask_fill)
    if causal:
        rows, cols = np.arange(q.shape[2])[:, None], np.arange(k.shape[2])
        s = np.where(cols <= rows + causal_offset, s, -np.inf)
    with np.errstate(invalid="ignore"):
        p = np.exp(s - s.max(-1, keepdims=True))
        return (p / p.sum(-1, keepdims=True)) @ v


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _inputs(rng, b, h, h_kv, lq, lk, d, dv=None, dtype=np.float32):
    return {
        "q": rng.standard_normal((b, h, lq, d)).astype(dtype),
        "k": rng.standard_normal((b, h_kv, lk, d)).astype(dtype),
        "v": rng.standard_normal((b, h_kv, lk, dv or d)).astype(dtype),
    }


def _check(shape, options, *, bias_shape=None, mask_shape=None, mask_fn=None, seed=0):
    """Build a model for `options`, run it on `shape` = (B, H, Hkv, Lq, Lk, D), compare."""
    b, h, h_kv, lq, lk, d = shape
    rng = np.random.default_rng(seed)
    feeds = _inputs(rng, b, h, h_kv, lq, lk, d)
    dims = {"batch": b, "q_len": lq, "kv_len": lk}
    if bias_shape is not None:
        feeds["bias"] = rng.standard_normal([dims.get(x, x) for x in bias_shape]).astype(np.float32)
    if mask_shape is not None:
        mask = rng.random([dims.get(x, x) for x in mask_shape]) < 0.7
        feeds["mask"] = mask if mask_fn is None else mask_fn(mask)
    model = make_chunked_attention_model(num_heads=h, num_kv_heads=h_kv, head_dim=d,
                                         bias_shape=bias_shape, mask_shape=mask_shape, **options)
    got = _session(model).run(None, feeds)[0]
    want = _reference(**feeds, **options)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    return got


@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("lengths", [(10, 10), (5, 13), (13, 4), (1, 1), (1, 9)])
def test_plain_and_grouped_heads(heads, lengths):
    _check((2, *heads, *lengths, 8), dict(scale=0.35, q_chunk=4, k_chunk=3))


@pytest.mark.parametrize("bias_shape", [(1, 4, "q_len", "kv_len"), ("batch", 1, 1, "kv_len"),
                                        ("q_len", "kv_len")])
def test_additive_bias(bias_shape):
    _check((2, 4, 2, 7, 11, 8), dict(scale=0.5, q_chunk=3, k_chunk=4), bias_shape=bias_shape)


def _mask_row(mask):
    mask[..., 2, :] = False
    return mask


@pytest.mark.parametrize("fill", [-math.inf, FINITE_FILL])
@pytest.mark.parametrize("mask_shape", [("batch", 4, "q_len", "kv_len"), ("batch", 1, 1, "kv_len")])
def test_boolean_mask(fill, mask_shape):
    options = dict(scale=0.5, mask_fill=fill, q_chunk=4, k_chunk=5)
    _check((2, 4, 2, 9, 12, 8), options, mask_shape=mask_shape)


def test_fully_masked_row_finite_fill_is_uniform_and_inf_fill_is_nan():
    shape, mask_shape = (1, 2, 2, 6, 10, 4), (1, 2, "q_len", "kv_len")
    out = _check(shape, dict(scale=1.0, mask_fill=FINITE_FILL, q_chunk=4, k_chunk=3),
                 mask_shape=mask_shape, mask_fn=_mask_row)
    assert np.isfinite(out).all()
    out = _check(shape, dict(scale=1.0, q_chunk=4, k_chunk=3), mask_shape=mask_shape, mask_fn=_mask_row)
    assert np.isnan(out[:, :, 2]).all() and np.isfinite(np.delete(out, 2, axis=2)).all()


@pytest.mark.parametrize("lq,lk", [(9, 9), (6, 14), (14, 6), (1, 7)])
@pytest.mark.parametrize("offset_from_end", [False, True])
def test_causal(lq, lk, offset_from_end):
    offset = lk - lq if offset_from_end else 0
    _check((2, 4, 2, lq, lk, 8), dict(scale=0.4, causal=True, causal_offset=offset, q_chunk=4, k_chunk=3))


def test_causal_with_bias_mask_and_softcap():
    options = dict(scale=0.7, softcap=2.0, causal=True, causal_offset=3, mask_fill=FINITE_FILL,
                   q_chunk=5, k_chunk=2)
    _check((2, 4, 1, 11, 13, 8), options, bias_shape=(1, 4, "q_len", "kv_len"),
           mask_shape=("batch", 1, "q_len", "kv_len"))


def test_softcap():
    _check((1, 2, 2, 8, 8, 16), dict(scale=3.0, softcap=1.5, q_chunk=3, k_chunk=3))


def test_one_model_at_two_sequence_lengths():
    model = make_chunked_attention_model(num_heads=4, num_kv_heads=2, head_dim=8, scale=0.3, causal=True,
                                         bias_shape=(1, 1, "q_len", "kv_len"), q_chunk=4, k_chunk=4)
    session = _session(model)
    rng = np.random.default_rng(1)
    for b, lq, lk in [(1, 5, 7), (3, 17, 17)]:
        feeds = _inputs(rng, b, 4, 2, lq, lk, 8)
        feeds["bias"] = rng.standard_normal((1, 1, lq, lk)).astype(np.float32)
        want = _reference(**feeds, scale=0.3, causal=True)
        np.testing.assert_allclose(session.run(None, feeds)[0], want, rtol=1e-4, atol=1e-5)


def test_value_head_dim_differs_from_query_head_dim():
    model = make_chunked_attention_model(num_heads=4, num_kv_heads=2, head_dim=8, v_head_dim=5, scale=0.3,
                                         q_chunk=4, k_chunk=4)
    feeds = _inputs(np.random.default_rng(5), 2, 4, 2, 7, 9, 8, dv=5)
    got = _session(model).run(None, feeds)[0]
    np.testing.assert_allclose(got, _reference(**feeds, scale=0.3), rtol=1e-4, atol=1e-5)


def test_half_precision_inputs_give_half_output():
    model = make_chunked_attention_model(num_heads=2, num_kv_heads=1, head_dim=8, scale=0.3, q_chunk=3,
                                         k_chunk=4, dtype=ir.DataType.FLOAT16, bias_shape=(1, 1, 1, "kv_len"))
    rng = np.random.default_rng(2)
    feeds = _inputs(rng, 1, 2, 1, 6, 9, 8, dtype=np.float16)
    feeds["bias"] = rng.standard_normal((1, 1, 1, 9)).astype(np.float16)
    got = _session(model).run(None, feeds)[0]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got, _reference(**feeds, scale=0.3), rtol=1e-2, atol=2e-3)


def test_two_subgraphs_in_one_graph_keep_names_unique():
    q = ir.val("q", ir.DataType.FLOAT, ["batch", 2, "q_len", 8])
    kv = ir.val("kv", ir.DataType.FLOAT, ["batch", 2, "kv_len", 8])
    tape = ir.tape.Tape()
    first = build_chunked_attention(tape, q, kv, kv, num_heads=2, num_kv_heads=2, scale=0.3,
                                    q_chunk=2, k_chunk=3, name="attn0")
    second = build_chunked_attention(tape, first, kv, kv, num_heads=2, num_kv_heads=2, scale=0.3,
                                     q_chunk=3, k_chunk=2, name="attn1")
    graph = ir.Graph([q, kv], [second], nodes=tape.nodes, opset_imports={"": 21}, name="two_attentions")
    session = _session(ir.to_proto(ir.Model(graph, ir_version=10)))
    rng = np.random.default_rng(3)
    x, y = (rng.standard_normal((1, 2, n, 8)).astype(np.float32) for n in (5, 7))
    want = _reference(_reference(x, y, y, scale=0.3), y, y, scale=0.3)
    np.testing.assert_allclose(session.run(None, {"q": x, "kv": y})[0], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_heads=3, num_kv_heads=2), "multiple"),
    (dict(bias_shape=(1, 2, "q_len", "kv_len")), "head axis"),
    (dict(q_chunk=0), "chunk"),
])
def test_rejects_bad_arguments(kwargs, message):
    options = dict(num_heads=4, num_kv_heads=2, head_dim=8, scale=1.0) | kwargs
    with pytest.raises(ValueError, match=message):
        make_chunked_attention_model(**options)


@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    kv_heads=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 2, 3]),
    lq=st.integers(1, 20),
    lk=st.integers(1, 20),
    chunks=st.tuples(st.integers(1, 8), st.integers(1, 8)),
    causal=st.booleans(),
    softcap=st.sampled_from([0.0, 2.5]),
    score_input=st.sampled_from(["none", "bias", "mask_inf", "mask_finite"]),
)
def test_matches_naive_attention(data, kv_heads, groups, lq, lk, chunks, causal, softcap, score_input):
    h = kv_heads * groups
    offset = data.draw(st.integers(-2, 4)) if causal else 0
    options = dict(scale=0.4, softcap=softcap, causal=causal, causal_offset=offset, q_chunk=chunks[0],
                   k_chunk=chunks[1], mask_fill=FINITE_FILL if score_input == "mask_finite" else -math.inf)
    operand_shape = data.draw(st.sampled_from(
        [("batch", h, "q_len", "kv_len"), (1, 1, "q_len", "kv_len"), ("batch", 1, 1, "kv_len"), ("kv_len",)]))
    _check((2, h, kv_heads, lq, lk, 4), options, seed=data.draw(st.integers(0, 99)),
           bias_shape=operand_shape if score_input == "bias" else None,
           mask_shape=operand_shape if score_input.startswith("mask") else None)


_PEAK_SCRIPT = """
import sys, numpy as np, onnxruntime as ort
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
options = ort.SessionOptions()
options.enable_cpu_mem_arena = False
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, {heads}, {length}, 64)).astype(np.float32) for _ in range(3))
before = status("VmRSS")
session.run(None, dict(q=q, k=k, v=v))
print(status("VmHWM") - before)
"""


@pytest.mark.parametrize("causal", [False, True])
def test_peak_memory_is_bounded_by_chunks(tmp_path, causal):
    heads, length = 4, 4096
    path = tmp_path / "attention.onnx"
    model = make_chunked_attention_model(num_heads=heads, num_kv_heads=heads, head_dim=64, scale=0.125,
                                         causal=causal, q_chunk=256, k_chunk=1024)
    onnx.save(model, path)
    script = _PEAK_SCRIPT.format(heads=heads, length=length)
    # A fixed mmap threshold makes glibc return each freed block at once; by default it keeps
    # freed multi-MiB blocks in its heap, which adds up to ~50 MiB of noise to the high-water mark.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                            check=True, timeout=120, env=env)
    growth = int(result.stdout.split()[-1])
    assert growth < length * length * 4 * heads / 4, f"peak RSS grew by {growth / 2**20:.1f} MiB"
