"""Block skipping in the ONNX chunked Loop: each query chunk visits only the keys its rows may keep.

- the key range (`rewriter.kernels.key_range`) read from the causal flag, a keep-mask program's
  causal and window conjuncts and a bias ``where(keep, 0, finfo.min)``, never from a tensor;
- the blocks the Loop runs, counted in ONNX Runtime's profile (each block is two MatMuls),
  equal the blocks spanning the keys some row of the chunk keeps, computed from the dense mask;
- parity on ONNX Runtime against a float64 softmax at lengths that are not multiples of the
  chunks, causal with top-left and bottom-right offsets (Lq ≠ Lk), windows whose far edge is the
  first key of a block, padding that hides every key of some rows (NaN with a −∞ fill, V averaged
  over all keys with a finite one), opsets 13, 18 and 23.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime
import pytest

from onnx_builders import blocks_run
from passes.core.score_programs import ProgramBuilder
from rewriter.kernels.key_range import KeyRange, key_range
from rewriter.kernels.onnx_chunked_attention import build_chunked_attention
from rewriter.kernels.onnx_emitter import standalone_model
from rewriter.kernels.score_program import parse

H, HKV, D = 4, 2, 8
FINFO_MIN = float(np.finfo(np.float32).min)


def _keep_program(upper: int | None, window: int | None, padded: bool):
    """keep = (key ≤ query + upper) ∧ (key > query + upper − window) ∧ pad[batch, key], HF's spelling."""
    builder = ProgramBuilder()
    query, key, batch = (builder.index(axis) for axis in ("query", "key", "batch"))
    conjuncts, shifted = [], query
    if upper is not None:
        shifted = builder.add("add", (query, builder.const(upper, "int64")), dtype="int64")
        conjuncts.append(builder.add("le", (key, shifted), dtype="bool"))
    if window is not None:
        edge = builder.add("sub", (shifted, builder.const(window, "int64")), dtype="int64")
        conjuncts.append(builder.add("gt", (key, edge), dtype="bool"))
    if padded:
        conjuncts.append(builder.load("pad", [batch, key], "bool"))
    keep = conjuncts[0]
    for conjunct in conjuncts[1:]:
        keep = builder.add("logical_and", (keep, conjunct), dtype="bool")
    return builder, keep


def _programs(upper, window, padded, as_bias):
    """(bias program, mask program) as JSON: the keep-mask, or HF eager's where(keep, 0, finfo.min)."""
    builder, keep = _keep_program(upper, window, padded)
    if not as_bias:
        return "", builder.program(keep).to_json()
    bias = builder.add("where", (keep, builder.const(0.0, "float32"), builder.const(FINFO_MIN, "float32")),
                       dtype="float32")
    return builder.program(bias).to_json(), ""


def _model(options: dict, padded: bool, opset: int = 18) -> onnx.ModelProto:
    q = ir.val("q", ir.DataType.FLOAT, ["batch", H, "q_len", D])
    k, v = (ir.val(name, ir.DataType.FLOAT, ["batch", HKV, "k_len", D]) for name in "kv")
    pad = ir.val("pad", ir.DataType.BOOL, ["batch", "k_len"])
    tape = ir.tape.Tape()
    out = build_chunked_attention(tape, q, k, v, num_heads=H, num_kv_heads=HKV, scale=0.3, opset=opset,
                                  leaves=[pad] if padded else [], **options)
    return standalone_model((q, k, v, pad if padded else None), out, tape, "skipping", {"": opset})


def _dense_keep(lq, lk, upper, window, pad):
    rows, cols = np.arange(lq)[:, None], np.arange(lk)[None, :]
    keep = np.ones((pad.shape[0], 1, lq, lk), dtype=bool)
    if upper is not None:
        keep &= cols <= rows + upper
    if window is not None:
        keep &= cols > rows + (upper or 0) - window
    return keep & pad[:, None, None, :]


def _reference(q, k, v, keep, fill):
    groups = q.shape[1] // k.shape[1]
    k, v = (np.repeat(x, groups, 1).astype(np.float64) for x in (k, v))
    s = np.where(keep, 0.3 * (q.astype(np.float64) @ k.swapaxes(-1, -2)), fill)
    with np.errstate(invalid="ignore"):
        p = np.exp(s - s.max(-1, keepdims=True))
        return (p / p.sum(-1, keepdims=True)) @ v


def _feeds(b, lq, lk, pad, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {"q": rng.standard_normal((b, H, lq, D)), "k": rng.standard_normal((b, HKV, lk, D)),
             "v": rng.standard_normal((b, HKV, lk, D))}
    feeds = {name: x.astype(np.float32) for name, x in feeds.items()}
    return feeds | ({"pad": pad} if pad is not None else {})


def _padding(b, lk, hidden_prefix):
    """Batch 0 keeps every key; the last batch hides its first `hidden_prefix` keys (left padding)."""
    pad = np.ones((b, lk), dtype=bool)
    pad[-1, :hidden_prefix] = False
    return pad


CASES = {  # name: (causal flag offset or None, program upper, window, padded)
    "causal-flag": (0, None, None, False),
    "causal-flag-bottom-right": ("end", None, None, False),
    "program-causal-padding": (None, 0, None, True),
    "program-causal-bottom-right": (None, "end", None, True),
    "window": (None, 0, 3, True),
    "window-bottom-right": (None, "end", 4, False),
    "flag-and-window": (0, None, 2, True),
}


def _resolve(offset, lq, lk):
    return lk - lq if offset == "end" else offset


@pytest.mark.parametrize("opset", [13, 18, 23])
@pytest.mark.parametrize("fill", ["-inf", "finite", "bias"])
@pytest.mark.parametrize("lengths, chunks", [((11, 11), (3, 4)), ((7, 13), (4, 3)), ((13, 7), (5, 2))])
@pytest.mark.parametrize("case", list(CASES))
def test_skipping_loop_matches_softmax(case, lengths, chunks, fill, opset):
    flag, upper, window, padded = CASES[case]
    lq, lk = lengths
    flag, upper = _resolve(flag, lq, lk), _resolve(upper, lq, lk)
    if fill == "bias" and upper is None and window is None:
        pytest.skip("no program to write as a bias")
    mask_fill = FINFO_MIN if fill == "finite" else -math.inf
    bias_program, mask_program = _programs(upper, window, padded, as_bias=fill == "bias") if (
        upper is not None or window is not None or padded) else ("", "")
    options = dict(causal=flag is not None, causal_offset=flag or 0, q_chunk=chunks[0], k_chunk=chunks[1],
                   mask_fill=mask_fill, bias_program=bias_program, mask_program=mask_program)
    pad = _padding(2, lk, hidden_prefix=lk // 2 + 1) if padded else np.ones((2, lk), dtype=bool)
    feeds = _feeds(2, lq, lk, pad if padded else None)
    model = _model(options, padded, opset)
    onnx.checker.check_model(model, full_check=True)
    got = onnxruntime.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    program_keep = _dense_keep(lq, lk, upper, window, pad)
    flag_keep = _dense_keep(lq, lk, flag, None, np.ones_like(pad))
    program_fill = FINFO_MIN if fill in ("finite", "bias") else -math.inf
    # the causal flag's −∞ comes after the program's fill (the op's order)
    keep = program_keep & flag_keep
    s_fill = np.where(flag_keep, program_fill, -math.inf)
    want = _reference(feeds["q"], feeds["k"], feeds["v"], keep, s_fill)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, equal_nan=True)
    if padded:  # rows keeping no key are there: NaN with −∞ fills, V's mean over all keys with a finite one
        assert not keep.any(-1).all()


def test_reference_handles_finite_rows_as_uniform():
    """The reference itself: a row whose every key holds a finite fill averages V over all keys."""
    feeds = _feeds(1, 2, 5, None)
    keep = np.array([[True] * 5, [False] * 5])[None, None]
    out = _reference(feeds["q"], feeds["k"], feeds["v"], keep, FINFO_MIN)
    np.testing.assert_allclose(out[0, :, 1], np.repeat(feeds["v"], 2, 1)[0].mean(1), rtol=1e-6)


def _needed_blocks(keep: np.ndarray, q_chunk: int, k_chunk: int) -> int:
    """Blocks of the k_chunk grid from, for each chunk of rows, the first to the last key one of them keeps."""
    lq = keep.shape[-2]
    kept_anywhere = keep.reshape(-1, lq, keep.shape[-1]).any(0)
    total = 0
    for q0 in range(0, lq, q_chunk):
        keys = np.flatnonzero(kept_anywhere[q0:q0 + q_chunk].any(0))
        total += keys[-1] // k_chunk - keys[0] // k_chunk + 1 if keys.size else 0
    return total


@pytest.mark.parametrize("k_chunk", [3, 4])
@pytest.mark.parametrize("lengths", [(16, 16), (9, 20), (20, 9)])
@pytest.mark.parametrize("kind", ["causal-flag", "program-causal", "window", "bias-window"])
def test_loop_runs_only_the_blocks_rows_may_keep(kind, lengths, k_chunk, tmp_path):
    lq, lk = lengths
    q_chunk, upper, window = 4, lk - lq, 5
    if kind.startswith("bias") and upper < 0:
        pytest.skip("rows keeping no key visit every key with a finite fill (the test below)")
    if kind == "causal-flag":
        options, keep = dict(causal=True, causal_offset=upper), _dense_keep(lq, lk, upper, None, np.ones((1, lk), bool))
    else:
        with_window = window if "window" in kind else None
        bias, mask = _programs(upper, with_window, False, as_bias=kind.startswith("bias"))
        options = dict(bias_program=bias, mask_program=mask)
        keep = _dense_keep(lq, lk, upper, with_window, np.ones((1, lk), bool))
    model = _model(dict(options, q_chunk=q_chunk, k_chunk=k_chunk), padded=False)
    feeds = _feeds(1, lq, lk, None)
    assert blocks_run(model.SerializeToString(), feeds, tmp_path) == _needed_blocks(keep, q_chunk, k_chunk)
    unbounded = math.ceil(lq / q_chunk) * math.ceil(lk / k_chunk)
    assert _needed_blocks(keep, q_chunk, k_chunk) < unbounded


def test_finite_fill_visits_the_skipped_keys_only_for_chunks_with_a_row_keeping_none(tmp_path):
    """Left padding hides every key of the first rows of the last batch: their chunk visits all keys."""
    lq = lk = 12
    bias, _ = _programs(0, None, True, as_bias=True)
    model = _model(dict(bias_program=bias, q_chunk=4, k_chunk=4), padded=True)
    keep_all = _dense_keep(lq, lk, 0, None, np.ones((1, lk), bool))
    skipping = _needed_blocks(keep_all, 4, 4)
    assert blocks_run(model.SerializeToString(), _feeds(1, lq, lk, np.ones((1, lk), bool)), tmp_path) == skipping
    pad = _padding(1, lk, hidden_prefix=2)  # rows 0 and 1 keep no key: chunk 0 also visits keys 4:12
    feeds = _feeds(1, lq, lk, pad)
    assert blocks_run(model.SerializeToString(), feeds, tmp_path) == skipping + 2
    got = onnxruntime.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    want = _reference(feeds["q"], feeds["k"], feeds["v"], _dense_keep(lq, lk, 0, None, pad), FINFO_MIN)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[0, :, 0], np.repeat(feeds["v"], 2, 1)[0].mean(1), rtol=1e-5)


@pytest.mark.parametrize("program_kind, mask_fill, dense_mask, per_entry_fill, want", [
    ("mask", -math.inf, False, False, KeyRange(upper=0, lower=-2)),
    ("mask", FINFO_MIN, False, False, KeyRange(upper=0, lower=-2, fill=FINFO_MIN)),
    ("bias", -math.inf, False, False, KeyRange(upper=0, lower=-2, fill=FINFO_MIN)),
    ("bias", -math.inf, True, False, KeyRange()),  # a dense mask's fill, not the bias's, holds outside the bounds
    ("mask", -math.inf, False, True, KeyRange()),  # a fill program's values, not −∞, hold outside the bounds
])
def test_key_range_reads_the_programs(program_kind, mask_fill, dense_mask, per_entry_fill, want):
    bias, mask = _programs(0, 3, True, as_bias=program_kind == "bias")
    got = key_range(mask_program=parse(mask) if mask else None, bias_program=parse(bias) if bias else None,
                    dense_mask=dense_mask, mask_fill=mask_fill, per_entry_fill=per_entry_fill, causal=False,
                    causal_offset=0)
    assert got == want
    assert KeyRange(upper=0, lower=-2).span(4, 8, 20) == (2, 8)


def test_a_causal_flag_tighter_than_the_program_needs_no_second_visit():
    _, mask = _programs(2, None, True, as_bias=False)
    got = key_range(mask_program=parse(mask), bias_program=None, dense_mask=False, mask_fill=FINFO_MIN,
                    per_entry_fill=False, causal=True, causal_offset=0)
    assert got == KeyRange(upper=0)  # the flag's −∞ hides what the program would: skipping is exact
