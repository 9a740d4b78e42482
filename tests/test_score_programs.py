"""Score programs: masks and biases evaluated block by block from O(n) leaves (`rewriter.kernels.score_program`).

Parity of `rewriter::attention` with programs against the dense tensors they describe (forward,
NaN pattern, gradients including a learned T5-style bucket table), block skipping that changes
nothing, and the symbolic proofs of `passes.core.score_programs`.
"""

import math

import pytest
import torch

import rewriter.kernels.attention_op  # noqa: F401
from passes.core.score_programs import ProgramBuilder, causal_split, fill_mask
from rewriter.kernels.program_proofs import filled_bias_bounds, key_bounds
from rewriter.kernels.score_program import parse

B, H, L, D = 2, 4, 37, 8


def _programs(pad, table, offset=0):
    """keep = (key ≤ query + offset) ∧ pad[b, key]; bias = table[min(|key − query|, 15), head]."""
    builder = ProgramBuilder()
    query, key, batch, head = (builder.index(axis) for axis in ("query", "key", "batch", "head"))
    shifted = builder.add("add", (query, builder.const(offset, "int64")), dtype="int64")
    causal = builder.add("le", (key, shifted), dtype="bool")
    keep = builder.add("logical_and", (causal, builder.load(pad, [batch, key], "bool")), dtype="bool")
    distance = builder.add("abs", (builder.add("sub", (key, query), dtype="int64"),), dtype="int64")
    bucket = builder.add("minimum", (distance, builder.const(15, "int64")), dtype="int64")
    bias = builder.load(table, [bucket, head], "float32")
    return builder.program(bias), builder.program(keep), builder.leaves


def _dense(pad, table, offset=0):
    rows, cols = torch.arange(L, device=pad.device)[:, None], torch.arange(L, device=pad.device)[None, :]
    keep = (cols <= rows + offset)[None, None] & pad[:, None, None, :]
    bias = table[(cols - rows).abs().clamp(max=15)].permute(2, 0, 1)[None]
    return bias, keep


def _inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=generator).requires_grad_() for _ in range(3))
    pad = torch.ones(B, L, dtype=torch.bool)
    pad[1, :9] = False  # with the causal mask, rows 0–8 of batch 1 see no key at all
    table = torch.randn(16, H, generator=generator).requires_grad_()
    return q, k, v, pad, table


def _run(q, k, v, bias, mask, leaves, chunks, bias_program="", mask_program="", zero_rows=True):
    out, _ = torch.ops.rewriter.attention(q, k, v, bias, mask, leaves, 0.3, 0.0, -math.inf, False, 0, *chunks,
                                          zero_rows, bias_program, mask_program, "")
    return out


@pytest.mark.parametrize("chunks", [(8, 16), (64, 64), (5, 3)])
@pytest.mark.parametrize("zero_rows", [True, False])
def test_programs_match_the_dense_tensors(chunks, zero_rows):
    q, k, v, pad, table = _inputs()
    bias_program, mask_program, leaves = _programs(pad, table)
    bias, keep = _dense(pad, table)
    grad = torch.randn(B, H, L, D)
    want = _run(q, k, v, bias, keep, [], chunks, zero_rows=zero_rows)
    got = _run(q, k, v, None, None, leaves, chunks, bias_program.to_json(), mask_program.to_json(), zero_rows)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, equal_nan=True)
    assert got.isnan().any() != zero_rows
    if zero_rows:  # gradients are NaN everywhere once a NaN row exists
        wanted = torch.autograd.grad((want * grad).sum(), (q, k, v, table))
        gotten = torch.autograd.grad((got * grad).sum(), (q, k, v, table))
        for g, w in zip(gotten, wanted):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_skipped_blocks_leave_finite_fills_exact():
    """A finite fill on a fully hidden row averages V over the row: blocks are skipped only where exact."""
    q, k, v, pad, table = _inputs(1)
    _, mask_program, leaves = _programs(pad, table)
    _, keep = _dense(pad, table)
    for fill in (-1e9, torch.finfo(torch.float32).min):
        want, _ = torch.ops.rewriter.attention(q, k, v, None, keep, [], 0.3, 0.0, fill, False, 0, 4, 4, False, "", "", "")
        got, _ = torch.ops.rewriter.attention(q, k, v, None, None, leaves, 0.3, 0.0, fill, False, 0, 4, 4, False, "",
                                              mask_program.to_json(), "")
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_opcheck_with_programs():
    q, k, v, pad, table = _inputs(2)
    bias_program, mask_program, leaves = _programs(pad, table)
    args = (q, k, v, None, None, leaves, 0.3, 0.0, -math.inf, False, 0, 8, 16, True, bias_program.to_json(),
            mask_program.to_json(), "")
    torch.library.opcheck(torch.ops.rewriter.attention.default, args)


@pytest.mark.parametrize("offset", [0, 3, -2])
def test_causal_split_reads_the_offset(offset):
    pad, table = torch.ones(B, L, dtype=torch.bool), torch.zeros(16, H)
    _, mask_program, _ = _programs(pad, table, offset)
    proven, rest = causal_split(mask_program)
    assert proven == offset
    assert [step.op for step in rest.steps] == ["index", "index", "load"]


def test_causal_split_refuses_non_causal_comparisons():
    builder = ProgramBuilder()
    query, key = builder.index("query"), builder.index("key")
    doubled = builder.add("mul", (query, builder.const(2, "int64")), dtype="int64")
    for keep in (builder.add("le", (key, doubled), dtype="bool"), builder.add("le", (query, key), dtype="bool")):
        program = builder.program(keep)
        assert causal_split(program) == (None, program)


def test_fill_mask_reads_where_zero_min():
    builder = ProgramBuilder()
    keep = builder.add("le", (builder.index("key"), builder.index("query")), dtype="bool")
    fill = torch.finfo(torch.float32).min
    bias = builder.add("where", (keep, builder.const(0.0, "float32"), builder.const(fill, "float32")))
    mask, found = fill_mask(builder.program(bias))
    assert found == fill and mask.steps[-1].op == "le"
    small = builder.add("where", (keep, builder.const(0.0, "float32"), builder.const(-65504.0, "float32")))
    assert fill_mask(builder.program(small)) is None  # fp16's min keeps the score: not a mask


def test_triu_of_minus_infinity_is_the_causal_mask():
    """``triu(full((L, L), −∞), 1)`` = where(key − query ≥ 1, −∞, 0): keep = ¬(key − query ≥ 1)."""
    builder = ProgramBuilder()
    above = builder.add("ge", (builder.add("sub", (builder.index("key"), builder.index("query")), dtype="int64"),
                               builder.const(1, "int64")), dtype="bool")
    bias = builder.add("where", (above, builder.const(-math.inf, "float32"), builder.const(0.0, "float32")))
    mask, fill = fill_mask(builder.program(bias))
    assert fill == -math.inf and causal_split(mask) == (0, None)


def test_malformed_programs_are_refused():
    with pytest.raises(ValueError, match="not a score program"):
        parse("{")
    with pytest.raises(ValueError, match="unknown op"):
        parse('[["sqrt", [], null, "float32"]]')


@pytest.mark.parametrize("window", [1, 5, 40])
def test_sliding_window_program_matches_its_dense_mask(window):
    """Keys are split at the window's edges and the causal diagonal (`key_bounds`); the parts merge exactly."""
    q, k, v, pad, _ = _inputs(3)
    builder = ProgramBuilder()
    query, key, batch = builder.index("query"), builder.index("key"), builder.index("batch")
    causal = builder.add("le", (key, query), dtype="bool")
    far_edge = builder.add("sub", (query, builder.const(window, "int64")), dtype="int64")
    inside = builder.add("gt", (key, far_edge), dtype="bool")
    keep = builder.add("logical_and", (builder.add("logical_and", (causal, inside), dtype="bool"),
                                       builder.load(pad, [batch, key], "bool")), dtype="bool")
    program = builder.program(keep)
    assert key_bounds(program)[:2] == (0, 1 - window)
    rows, cols = torch.arange(L)[:, None], torch.arange(L)[None, :]
    dense = ((cols <= rows) & (cols > rows - window))[None, None] & pad[:, None, None, :]
    grad = torch.randn(B, H, L, D)
    for chunks in ((8, 16), (64, 64)):
        want = _run(q, k, v, None, dense, [], chunks)
        got = _run(q, k, v, None, None, builder.leaves, chunks, "", program.to_json())
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        for g, w in zip(torch.autograd.grad((got * grad).sum(), (q, k, v)),
                        torch.autograd.grad((want * grad).sum(), (q, k, v))):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_filled_bias_with_bounds_matches_its_dense_bias():
    """HF eager's ``where(causal ∧ padding, 0, finfo.min)`` bias: chunks stop at the diagonal, exactly."""
    q, k, v, pad, _ = _inputs(4)
    pad[1, :9] = True
    pad[1, -5:] = False  # right padding: every row keeps key 0
    builder = ProgramBuilder()
    query, key, batch = builder.index("query"), builder.index("key"), builder.index("batch")
    keep = builder.add("logical_and", (builder.add("le", (key, query), dtype="bool"),
                                       builder.load(pad, [batch, key], "bool")), dtype="bool")
    fill = torch.finfo(torch.float32).min
    bias = builder.add("where", (keep, builder.const(0.0, "float32"), builder.const(fill, "float32")))
    program = builder.program(bias)
    assert filled_bias_bounds(program)[:2] == (0, None)
    rows, cols = torch.arange(L)[:, None], torch.arange(L)[None, :]
    dense = torch.zeros(B, 1, L, L).masked_fill(~((cols <= rows)[None, None] & pad[:, None, None, :]), fill)
    grad = torch.randn(B, H, L, D)
    want = _run(q, k, v, dense, None, [], (8, 16), zero_rows=False)
    got = _run(q, k, v, None, None, builder.leaves, (8, 16), program.to_json(), "", zero_rows=False)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    for g, w in zip(torch.autograd.grad((got * grad).sum(), (q, k, v)), torch.autograd.grad((want * grad).sum(), (q, k, v))):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
