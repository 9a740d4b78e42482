"""T5-style relative position biases, evaluated per block without a gather or a rows × keys write.

`score_program_torch.evaluate` spreads the values that depend on positions only through
``key − query`` as a strided `unfold` view (rows last first) or its flipped copy, and collapses
small all-equal integer/boolean values (``query ≥ 0``); `key_run_bias.KeyRunBias` feeds a bias
``x + where(keep, 0, f)`` whose keep-mask reads only the key to the fused kernel as x alone on
each run of kept keys (`program_proofs.added_fill`). Checked here against the same functions
computed densely with torch, forward (NaN pattern included) and backward (the bucket table's
gradient included), at odd lengths and chunk edges, bidirectional and causal buckets, and the
cases that must fall back to the whole bias.
"""

import math

import pytest
import torch

import rewriter.kernels.attention_op  # noqa: F401
from passes.core.score_programs import ProgramBuilder
from rewriter.kernels import key_run_bias
from rewriter.kernels.program_proofs import added_fill
from rewriter.kernels.score_program_torch import evaluate, evaluate_within, relative_view

B, H, D, BUCKETS, MAX_DISTANCE = 2, 3, 8, 32, 20
FILL = torch.finfo(torch.float32).min


def _bucket_program(builder, causal):
    """HF T5's `_relative_position_bucket(key − query)` as its exported graph computes it."""
    query, key, zero = builder.index("query"), builder.index("key"), builder.const(0, "int64")
    relative = builder.add("sub", (key, query), dtype="int64")
    if causal:
        distance = builder.add("neg", (builder.add("minimum", (relative, zero), dtype="int64"),), dtype="int64")
        half, base = BUCKETS, None
    else:
        half = BUCKETS // 2
        later = builder.add("cast", (builder.add("gt", (relative, zero), dtype="bool"),), dtype="int64")
        base = builder.add("mul", (later, builder.const(half, "int64")), dtype="int64")
        distance = builder.add("abs", (relative,), dtype="int64")
    exact = builder.const(half // 2, "int64")
    small = builder.add("lt", (distance, exact), dtype="bool")
    ratio = builder.add("div", (builder.add("cast", (distance,), dtype="float32"), exact))
    scaled = builder.add("div", (builder.add("log", (ratio,)), builder.const(math.log(MAX_DISTANCE / (half // 2)), "float32")))
    large = builder.add("add", (builder.add("cast", (builder.add("mul", (scaled, builder.const(half - half // 2, "int64"))),),
                                            dtype="int64"), exact), dtype="int64")
    large = builder.add("minimum", (large, builder.const(half - 1, "int64")), dtype="int64")
    bucket = builder.add("where", (small, distance, large), dtype="int64")
    return bucket if base is None else builder.add("add", (base, bucket), dtype="int64")


def _dense_bucket(rows, cols, causal):
    relative = cols[None, :] - rows[:, None]
    if causal:
        distance, half, base = -torch.minimum(relative, torch.zeros_like(relative)), BUCKETS, 0
    else:
        half = BUCKETS // 2
        distance, base = relative.abs(), (relative > 0).long() * half
    exact = half // 2
    large = exact + (torch.log(distance.float() / exact) / math.log(MAX_DISTANCE / exact) * (half - exact)).long()
    return base + torch.where(distance < exact, distance, large.clamp(max=half - 1))


def _t5(table, pad, causal=False, fill=FILL, pad_first=False):
    """bias = table[bucket(key − query), head] + where(query ≥ 0 ∧ pad[b|0, key], 0, fill), as HF T5 builds it;
    `pad` (1, L) is read at batch 0 (every batch row the same keys), (B, L) at the batch."""
    builder = ProgramBuilder()
    x = builder.load(table, [_bucket_program(builder, causal), builder.index("head")], "float32")
    if pad is None:
        return builder.program(x), builder.leaves
    zero = builder.const(0, "int64")
    row = builder.index("batch") if pad.size(0) > 1 else zero
    keep = builder.add("logical_and", (builder.add("ge", (builder.index("query"), zero), dtype="bool"),
                                       builder.add("cast", (builder.load(pad, [row, builder.index("key")], "int64"),),
                                                   dtype="bool")), dtype="bool")
    term = builder.add("where", (keep, builder.const(0.0, "float32"), builder.const(fill, "float32")))
    return builder.program(builder.add("add", (term, x) if pad_first else (x, term))), builder.leaves


def _dense(table, pad, length, causal=False, fill=FILL):
    positions = torch.arange(length)
    bias = table[_dense_bucket(positions, positions, causal)].permute(2, 0, 1)[None]
    if pad is None:
        return bias
    return bias + torch.where(pad.bool()[:, None, None, :], 0.0, fill)


def _attention(q, k, v, bias, leaves, program, q_chunk, causal=False, zero_rows=False):
    out, _ = torch.ops.rewriter.attention(q, k, v, bias, None, leaves, 0.35, 0.0, -math.inf, causal, 0, q_chunk, 16,
                                          zero_rows, program, "", "")
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("reverse_rows", [False, True])
def test_blocks_match_the_dense_bias_bit_for_bit(causal, reverse_rows):
    """Any block (odd sizes, edges, blocks far from the diagonal) equals the dense bias's slice exactly."""
    length = 61
    table = torch.randn(BUCKETS, H, generator=torch.Generator().manual_seed(0))
    pad = torch.ones(1, length, dtype=torch.int64)
    pad[0, -7:] = 0
    program, leaves = _t5(table, pad, causal)
    dense = _dense(table, pad, length, causal)
    for rows, cols in [((0, 61), (0, 61)), ((5, 18), (0, 61)), ((40, 41), (3, 60)), ((0, 7), (50, 61)),
                       ((33, 61), (0, 1)), ((12, 29), (12, 29))]:
        got = evaluate(program, leaves, 1, H, rows, cols, torch.device("cpu"), reverse_rows)
        want = dense[..., rows[0]:rows[1], cols[0]:cols[1]]
        assert torch.equal(got.expand_as(want), want.flip(-2) if reverse_rows else want)


def test_reversed_rows_are_a_view_of_the_differences():
    """With rows last first, x alone is a strided view over rows + keys − 1 values: nothing rows × keys is written."""
    table = torch.randn(BUCKETS, H)
    program, leaves = _t5(table, None)
    block = evaluate(program, leaves, 1, H, (100, 164), (0, 512), torch.device("cpu"), reverse_rows=True)
    assert block.shape == (1, H, 64, 512) and block.stride()[-2:] == (1, 1)
    assert block.untyped_storage().nbytes() == H * (64 + 512 - 1) * 4


def test_all_equal_small_values_collapse():
    """``query ≥ 0 ∧ pad[key]`` is one row of keys, not rows × keys; an all-true pad is one entry."""
    pad = torch.ones(1, 40, dtype=torch.int64)
    _, leaves = _t5(torch.zeros(BUCKETS, H), pad)
    builder = ProgramBuilder()
    zero = builder.const(0, "int64")
    keep = builder.add("logical_and", (builder.add("ge", (builder.index("query"), zero), dtype="bool"),
                                       builder.load(pad, [zero, builder.index("key")], "bool")), dtype="bool")
    program = builder.program(keep)
    assert evaluate(program, [pad], 1, 1, (3, 20), (0, 40), torch.device("cpu")).shape == (1, 1, 1, 1)
    pad[0, 30:] = 0
    keep = evaluate(program, [pad], 1, 1, (3, 20), (0, 40), torch.device("cpu"))
    assert keep.shape == (1, 1, 1, 40) and torch.equal(keep[0, 0, 0], pad[0].bool())


def test_added_fill_reads_t5_with_padding():
    table, pad = torch.zeros(BUCKETS, H), torch.ones(1, 8, dtype=torch.int64)
    for pad_first in (False, True):
        program, _ = _t5(table, pad, pad_first=pad_first)
        x, keep, fill = added_fill(program)
        assert fill == FILL and keep.dtype == "bool" and x.steps[-1].op == "load"
    assert added_fill(_t5(table, pad, fill=-1e9)[0]) is None  # not a fill: the bias is x − 1e9 there
    assert added_fill(_t5(table, None)[0]) is None


def _spy(monkeypatch):
    """Counts of the chunk key ranges `KeyRunBias.parts` split into runs and of those it left to the whole bias."""
    counts = {"split": 0, "whole": 0}
    original = key_run_bias.KeyRunBias.parts

    def spied(self, *args):
        parts = original(self, *args)
        counts["whole" if parts is None else "split"] += 1
        return parts

    monkeypatch.setattr(key_run_bias.KeyRunBias, "parts", spied)
    return counts


def _pad(length, kind):
    pad = torch.ones(1, length, dtype=torch.int64)
    if kind == "right":
        pad[0, -9:] = 0
    elif kind == "left":
        pad[0, :4] = 0
    elif kind == "holes":
        pad[0, 3:5] = pad[0, 20:31] = pad[0, -1:] = 0
    elif kind == "many runs":  # more kept runs than `_MAX_RUNS`
        pad[0, 1::3] = 0
    return pad


@pytest.mark.parametrize("kind", ["right", "left", "holes", "none", "many runs"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_chunk", [5, 64])
@pytest.mark.parametrize("table_grad", [False, True])
def test_fused_runs_match_the_dense_bias(monkeypatch, kind, causal, q_chunk, table_grad):
    """Forward and gradients (q, k, v, and the table's where it learns) against the dense bias; the fused
    kernel sees x alone on runs of kept keys except where the runs are too many."""
    counts = _spy(monkeypatch)
    length = 53
    generator = torch.Generator().manual_seed(q_chunk + 7 * causal)
    q, k, v = (torch.randn(B, H, length, D, generator=generator).requires_grad_() for _ in range(3))
    table = torch.randn(BUCKETS, H, generator=generator).requires_grad_(table_grad)
    pad = _pad(length, kind)
    program, leaves = _t5(table, pad, causal)
    want = _attention(q, k, v, _dense(table, pad, length, causal), [], "", q_chunk, causal)
    got = _attention(q, k, v, None, leaves, program.to_json(), q_chunk, causal)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    grad = torch.randn(B, H, length, D, generator=generator)
    inputs = (q, k, v, table) if table_grad else (q, k, v)
    for g, w in zip(torch.autograd.grad((got * grad).sum(), inputs), torch.autograd.grad((want * grad).sum(), inputs)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)
    if kind == "many runs":  # causal: the diagonal bands take the whole bias, the ranges left of them few keys
        assert counts["whole"] > 0 or causal
    else:
        assert counts["split"] > 0 and counts["whole"] == 0


@pytest.mark.parametrize("case", ["x + f above the fill", "x is +inf at a hidden key", "keys per batch row",
                                  "a row with no key"])
def test_cases_that_need_the_whole_bias_stay_exact(monkeypatch, case):
    counts = _spy(monkeypatch)
    length = 29
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, length, D, generator=generator) for _ in range(3))
    table = torch.randn(BUCKETS, H, generator=generator)
    pad, fill = _pad(length, "right"), FILL
    if case == "x + f above the fill":
        table, fill = table.abs() * 1e24 + 1e25, -1e30  # x + f > −1e30 at every hidden key
    elif case == "x is +inf at a hidden key":
        table[BUCKETS // 2 + 6:] = math.inf  # far keys after the query: the padded ones for early rows
    elif case == "keys per batch row":
        pad = torch.ones(B, length, dtype=torch.int64)
        pad[1, -5:] = 0
    else:
        pad[0, :] = 0
    program, leaves = _t5(table, pad, fill=fill)
    for zero_rows in (False, True):
        want = _attention(q, k, v, _dense(table, pad, length, fill=fill), [], "", 8, zero_rows=zero_rows)
        got = _attention(q, k, v, None, leaves, program.to_json(), 8, zero_rows=zero_rows)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, equal_nan=True)
    if case == "keys per batch row":  # keep reads the batch too: the whole bias from the start
        assert counts == {"split": 0, "whole": 0}
    elif case != "a row with no key":  # there: no part at all, so blockwise
        assert counts["whole"] > 0


def test_relative_view_serves_every_block():
    """`relative_view` is evaluated once; its rows Lq − q1 : Lq − q0 are the reversed block of rows q0:q1."""
    table, length, keys = torch.randn(BUCKETS, H), 23, 31
    program, leaves = _t5(table, None, causal=True)
    view = relative_view(program, leaves, 1, H, length, keys, torch.device("cpu"))
    assert view.untyped_storage().nbytes() == H * (length + keys - 1) * 4
    for q0, q1, k0, k1 in [(0, 23, 0, 31), (4, 9, 2, 30), (22, 23, 0, 1)]:
        block = evaluate(program, leaves, 1, H, (q0, q1), (k0, k1), torch.device("cpu"), reverse_rows=True)
        assert torch.equal(view[..., length - q1:length - q0, k0:k1], block)
    padded, _ = _t5(table, torch.ones(1, keys, dtype=torch.int64))
    assert relative_view(padded, leaves, 1, H, length, keys, torch.device("cpu")) is None


@pytest.mark.parametrize("rows, keys", [(5, 9), (2, 2), (7, 7), (6, 40), (9, 4), (1, 8)])
def test_row_max_of_a_toeplitz_view_equals_amax(rows, keys):
    differences = torch.randn(2, H, 1, rows + keys + 2)
    view = differences.unfold(-1, keys, 1).squeeze(-3)[..., 1:1 + rows, :]
    assert torch.equal(key_run_bias.row_max(view), view.amax(-1))
    differences[0, 1, 0, 3] = math.nan
    torch.testing.assert_close(key_run_bias.row_max(view), view.amax(-1), rtol=0, atol=0, equal_nan=True)


def test_evaluate_within_stops_before_a_large_step():
    """A keep-mask reading the key only is one row over all rows at once; one comparing key and query
    is refused before its rows × keys step runs."""
    pad = torch.ones(1, 50, dtype=torch.int64)
    pad[0, 44:] = 0
    program, leaves = _t5(torch.zeros(BUCKETS, H), pad)
    _, keep, _ = added_fill(program)
    row = evaluate_within(keep, leaves, 1, H, (0, 40), (0, 50), torch.device("cpu"), 90)
    assert row.shape == (1, 1, 1, 50) and torch.equal(row.reshape(-1), pad[0].bool())
    builder = ProgramBuilder()
    causal = builder.program(builder.add("le", (builder.index("key"), builder.index("query")), dtype="bool"))
    assert evaluate_within(causal, [], 1, H, (0, 40), (0, 50), torch.device("cpu"), 90) is None
    assert evaluate_within(causal, [], 1, H, (0, 40), (0, 50), torch.device("cpu"), 2000).shape == (1, 1, 40, 50)
