"""Chunked softmax attention as a subgraph of standard ONNX ops (default domain, opset 13+).

Scores follow `rewriter.kernels.chunked_attention` (scale → soft-cap → +bias → keep-mask →
causal); the softmax is computed online (Rabe & Staats; FlashAttention), so the largest tensor
at run time is one (B, H, q_chunk, k_chunk) score block, never Lq × Lk. Batch and sequence
lengths stay symbolic; bias and mask are sliced block by block. Query heads are grouped as
(B, Hkv, G, Lq, D) against (B, Hkv, 1, Lk, D), so grouped K/V heads are never expanded.

Q, K and V are only sliced, never copied whole: each block is cast to fp32 and brought into
its block form (`_BLOCK_FORM`) on its own, so they may come as (B, H, L, D), as (B, L, H, D)
(heads behind the sequence, as projections are reshaped) or K as (B, H, D, L); the scale is
applied to each query block; the output is written by the loop in (B, H, L, D) or (B, L, H, D)::

    q, k, v ─(split heads: Reshape/Unsqueeze, views)→ qg, kg, vg
    Loop i < ceil(Lq / qc)                     qc = min(q_chunk, Lq); scan output: out block
    │  q0 = i·qc   q1 = min(q0 + qc, Lq)   qb = fp32(qg[q0:q1]) as (B,Hkv,G,rows,D) · scale
    │  ks:ke = the keys rows q0:q1 may keep (`key_range`: the causal flag, a program's causal or
    │       window bounds; 0:Lk when nothing is proven)   f = ⌊ks / kc⌋   nk = ⌈ke / kc⌉ − f
    │  Loop j < nk                             carries m = −∞, l = 0, acc = 0
    │  │  k0 = (f + j)·kc   k1 = min(k0 + kc, Lk)   S = qb · fp32(kg[k0:k1]) as (B,Hkv,1,D,keys)
    │  │  S = softcap·tanh(S) → S + bias[q0:q1, k0:k1] → where(mask[q0:q1, k0:k1], S, fill)
    │  │      (a bias program's addends are added one after another, in the model's order)
    │  │      (a bias or mask given as a score program is computed here for rows q0:q1, keys
    │  │       k0:k1 from its leaves: `onnx_score_program`; nothing Lq × Lk exists)
    │  │  S + If(the causal diagonal crosses this block, (rows, keys) tile of 0 / −∞, zeros)
    │  │  m' = max(m, rowmax S)   r = max(m', −FLT_MAX)   P = exp(S − r)   a = exp(m − r)
    │  │  l = a·l + rowsum P   acc = a·acc + P · fp32(vg[k0:k0+kc]) as (B,Hkv,1,keys,Dv)   m = m'
    │  └─
    │  (a finite fill outside the bounds: Loop over the other blocks too, carrying m, l, acc, with no
    │   trips unless some row's m is within 110 of the fill, e.g. a row with every key hidden)
    │  out block = Pad(acc / l in q's dtype, in the output layout) to qc rows
    └─
    (nq, B,Hkv,G,qc,Dv) ─Transpose─Reshape→ (B,H,nq·qc,Dv) ─Slice(:Lq)→ out (B,H,Lq,Dv)
                         (or (nq, B,qc,Hkv,G,Dv) → (B,nq·qc,H,Dv) → (B,Lq,H,Dv))

ORT keeps each iteration's block and copies them into the Loop's output, so the output costs
two copies at the end whatever the form; the Transpose and Slice after it each free their input,
so they add time but no peak (a sequence of unpadded blocks, ConcatFromSequence'd, measured the
same peak on ORT 1.32: its SequenceInsert copies the sequence).

Blocks holding none of ks:ke are never visited, so they cost nothing: for a causal block about half the
blocks, for a sliding window all but the band's. Skipping is exact (`key_range`): keys outside the
bounds score −∞ (adding nothing; a row keeping no key is NaN either way), or a finite fill that
exp() takes to exactly 0 in rows with a score more than 110 above it; other rows visit them.

Using r = max(m', −FLT_MAX) instead of m' keeps exp() finite for rows whose every key so far
is at −∞; such rows end with l = 0 and give NaN, like a naive softmax. A mask with fill −∞ is
added as log(keep), the same as where(keep, S, −∞) for any S < +∞: Where over the scores is ~5x
slower on ORT's CPU provider (the causal tile is built with Where once per diagonal block).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_ir as ir

from rewriter.kernels.key_range import UNDERFLOW, KeyRange, key_range
from rewriter.kernels.onnx_emitter import Emitter, standalone_model, typed
from rewriter.kernels.onnx_score_program import ScoreProgramEmitter
from rewriter.kernels.score_program import parse

__all__ = ["build_chunked_attention", "make_chunked_attention_model"]

logger = logging.getLogger(__name__)

_FLOAT, _INT64, _BOOL = ir.DataType.FLOAT, ir.DataType.INT64, ir.DataType.BOOL
# Axis orders each operand may come in (B batch, H heads, L sequence, D head dim) and the forms
# blocks are computed in, with heads split as (Hkv, G): query heads h = Hkv·G, G = 1 for K/V.
_LAYOUTS = {"q": ("BHLD", "BLHD"), "k": ("BHLD", "BLHD", "BHDL"), "v": ("BHLD", "BLHD"), "out": ("BHLD", "BLHD")}
_BLOCK_FORM = {"q": "BHGLD", "k": "BHGDL", "v": "BHGLD"}


class _Builder:
    """Options and the outer-scope values (constants, k_len) that both loop bodies read."""

    def __init__(self, emit: Emitter, heads: int, kv_heads: int, scale: float, softcap: float,
                 mask_fill: float, causal: bool, causal_offset: int, q_chunk: int, k_chunk: int,
                 layouts: dict[str, str], keys: KeyRange):
        self.e = emit
        self.keys = keys
        self.layouts = layouts
        self.heads, self.kv_heads = heads, kv_heads
        self.scale, self.softcap, self.mask_fill = scale, softcap, mask_fill
        self.causal, self.causal_offset = causal, causal_offset
        self.k_chunk = emit.const([k_chunk])
        self.q_chunk = emit.const([q_chunk])
        self.zero, self.one = emit.const([0]), emit.const([1])
        self.neg_max = emit.const(-np.finfo(np.float32).max, np.float32)
        self._axes: dict[tuple[int, ...], ir.Value] = {}

    def axis(self, *axes: int) -> ir.Value:
        """The constant [*axes], made once in the outer graph (the loop bodies read it)."""
        if axes not in self._axes:
            self._axes[axes] = self.e.const(list(axes))
        return self._axes[axes]

    def _ceil_div(self, e: Emitter, n: ir.Value, d: ir.Value) -> ir.Value:
        return e("Div", e("Sub", e("Add", n, d), self.one), d)

    def _as_float(self, e: Emitter, x: ir.Value) -> ir.Value:
        return x if x.dtype == _FLOAT else e("Cast", x, to=_FLOAT)

    def _group_heads(self, x: ir.Value, heads: int, head_axis: int = 1) -> ir.Value:
        """x with its `heads` heads on `head_axis` split in two: (Hkv, G) for all query heads,
        (heads, 1) for K/V heads or a broadcast head axis."""
        e = self.e
        if heads != self.heads or self.heads == self.kv_heads:
            return e("Unsqueeze", x, self.axis(head_axis + 1))
        split = e.const([self.kv_heads, self.heads // self.kv_heads])
        shape = e("Concat", e.shape(x, end=head_axis), split, e.shape(x, start=head_axis + 1), axis=0)
        return e("Reshape", x, shape)

    def _sliceable(self, x: ir.Value, role: str, heads: int) -> tuple[ir.Value, ir.Value, list[int] | None]:
        """`x` in its layout with heads grouped (a view), the axis blocks are sliced along, and the
        transpose that brings a block into `_BLOCK_FORM` (None where it is in that form)."""
        layout = self.layouts[role]
        view = layout.replace("H", "HG")
        perm = [view.index(label) for label in _BLOCK_FORM[role]]
        return (typed(self._group_heads(x, heads, layout.index("H")), x.dtype), self.axis(view.index("L")),
                None if perm == sorted(perm) else perm)

    def _read_block(self, e: Emitter, sliceable, start, stop) -> ir.Value:
        """One block of Q, K or V in fp32 and in `_BLOCK_FORM`."""
        x, axis, perm = sliceable
        block = self._as_float(e, typed(e("Slice", x, start, stop, axis), x.dtype))
        return block if perm is None else e("Transpose", block, perm=perm)

    def _grouped_operand(self, x: ir.Value, role: str) -> ir.Value:
        """A bias or mask of rank ≤ 4, broadcastable to (B, H, Lq, Lk), as 5-D grouped heads."""
        if x.shape is None or x.shape.rank() > 4:
            raise ValueError(f"{role} needs a known rank of at most 4, got shape {x.shape}")
        heads = ([1] * 4 + list(x.shape))[-3]
        if heads not in (1, self.heads):
            raise ValueError(f"{role} head axis must be statically 1 or {self.heads}, got {heads}")
        dtype = x.dtype
        if x.shape.rank() < 4:
            x = self.e("Unsqueeze", x, self.e.const(list(range(4 - x.shape.rank()))))
        return typed(self._group_heads(x, heads), dtype)

    def _programs(self, q: ir.Value, programs: dict[str, str], leaves) -> list[tuple[ScoreProgramEmitter, str]]:
        """The score programs as emitters, and the batch and head positions they read (outer graph,
        shaped like the grouped scores (B, Hkv, G, rows, keys))."""
        e = self.e
        emitters = [(ScoreProgramEmitter(e, parse(text), leaves), role) for role, text in programs.items() if text]
        axes = set().union(*(emitter.axes for emitter, _ in emitters))
        self.positions = {}
        if "batch" in axes:
            batch = e("Range", self.e.const(0), e("Squeeze", e.shape(q, end=1)), self.e.const(1))
            self.positions["batch"] = e("Reshape", batch, e.const([-1, 1, 1, 1, 1]))
        if "head" in axes:
            groups = self.heads // self.kv_heads
            self.positions["head"] = e.const(np.arange(self.heads).reshape(1, self.kv_heads, groups, 1, 1))
        return emitters

    def build(self, q, k, v, bias, mask, programs: dict[str, str], leaves) -> ir.Value:
        e = self.e
        qg, kg, vg = (self._sliceable(x, role, heads) for x, role, heads in
                      ((q, "q", self.heads), (k, "k", self.kv_heads), (v, "v", self.kv_heads)))
        q_axis, k_axis = self.layouts["q"].index("L"), self.layouts["k"].index("L")
        q_len, self.k_len = e.shape(q, start=q_axis, end=q_axis + 1), e.shape(k, start=k_axis, end=k_axis + 1)
        qc = e("Max", e("Min", q_len, self.q_chunk), self.one)
        n_q = e("Squeeze", self._ceil_div(e, q_len, qc))
        operands = ((bias, "bias"), (mask, "mask"))
        scores = [(self._grouped_operand(t, role), role) for t, role in operands if t is not None]
        emitters = self._programs(q, programs, leaves)
        blocks = e("Loop", n_q, None, body=self._query_body(qg, kg, vg, q_len, qc, q.dtype, scores, emitters))
        # Scan output: (N, *one block in the output layout); N goes right before the block's rows.
        out_layout = self.layouts["out"]
        block_labels = "N" + out_layout.replace("H", "HG")
        stacked = block_labels[1:].replace("L", "NL")
        sizes = {"B": e.shape(q, end=1), "H": e.const([self.heads]), "L": e.const([-1]),
                 "D": e.shape(v, start=3)}
        out_shape = e("Concat", *(sizes[label] for label in out_layout), axis=0)
        out = e("Reshape", e("Transpose", blocks, perm=[block_labels.index(x) for x in stacked]), out_shape)
        return e("Slice", out, self.zero, q_len, self.axis(out_layout.index("L")))

    def _last_index(self, x: ir.Value, axis: int) -> ir.Value:
        """[size of x's `axis` − 1], computed in the outer graph."""
        return self.e("Sub", self.e.shape(x, start=axis, end=axis + 1), self.one)

    def _query_body(self, qg, kg, vg, q_len, qc, dtype, scores, emitters) -> ir.Graph:
        b = self.e.subgraph()
        i, cond = ir.val(b.name("i"), _INT64, []), ir.val(b.name("cond"), _BOOL, [])
        q0 = b("Mul", i, qc)
        q1 = b("Min", b("Add", q0, qc), q_len)
        q_scale = self.scale / self.softcap if self.softcap > 0 else self.scale
        qb = b("Mul", self._read_block(b, qg, q0, q1), self.e.const(q_scale, np.float32))
        # Bias and mask blocks are sliced from the outer values in the key loop (slicing rows here
        # and reading that slice in the key loop measured ~16 MiB more peak on ORT 1.32 at n = 16384);
        # a broadcast (size-1) axis is read whole.
        rows = [(t, b("Min", q0, self._last_index(t, 3)), q1, self._last_index(t, 4), role) for t, role in scores]
        block_positions = dict(self.positions)
        if any("query" in emitter.axes for emitter, _ in emitters):
            query_positions = b("Range", b("Squeeze", q0), b("Squeeze", q1), self.e.const(1))
            block_positions["query"] = b("Reshape", query_positions, self.e.const([1, 1, 1, -1, 1]))
        diagonal = None
        if self.causal:
            offset = self.e.const([self.causal_offset])
            positions = b("Range", b("Squeeze", q0), b("Squeeze", q1), self.e.const(1))
            query_pos = b("Unsqueeze", b("Add", positions, offset), self.axis(-1))
            diagonal = (query_pos, b("Add", b("Add", q0, offset), self.one))
        lead = b.shape(qb, end=4)
        row_shape = b("Concat", lead, self.one, axis=0)
        m0 = b("ConstantOfShape", row_shape, value=ir.tensor([-math.inf], dtype=_FLOAT))
        l0 = b("ConstantOfShape", row_shape, value=ir.tensor([0.0], dtype=_FLOAT))
        acc_shape = b("Concat", lead, b.shape(vg[0], start=4), axis=0)
        acc0 = b("ConstantOfShape", acc_shape, value=ir.tensor([0.0], dtype=_FLOAT))
        first, n_k = self._key_blocks(b, q0, q1)
        block_inputs = (qb, kg, vg, rows, diagonal, emitters, block_positions)
        visited = self._key_body(*block_inputs, lambda body, j: body("Add", first, j))
        m, row_sum, acc = b("Loop", b("Squeeze", n_k), None, m0, l0, acc0, body=visited, outputs=3)
        if self.keys.fill is not None:
            row_sum, acc = self._skipped_blocks(b, block_inputs, first, n_k, m, row_sum, acc)
        block = b("Div", acc, row_sum)
        if dtype != _FLOAT:
            block = b("Cast", block, to=dtype)
        out_view = self.layouts["out"].replace("H", "HG")
        if out_view != _BLOCK_FORM["q"]:
            block = b("Transpose", block, perm=[_BLOCK_FORM["q"].index(label) for label in out_view])
        # Pads spelled out for every axis: ORT 1.32's transpose optimizer mis-permutes a Pad's `axes`
        # input when it moves a Transpose (the model's head split) through the Pad.
        rank, row_axis = len(out_view), out_view.index("L")
        missing_rows = b("Sub", qc, b("Sub", q1, q0))
        before, after = self.e.const([0] * (rank + row_axis)), self.e.const([0] * (rank - 1 - row_axis))
        pad = b("Concat", before, missing_rows, after, axis=0)
        out = typed(b("Pad", block, pad), dtype)
        return b.graph([i, cond], [typed(b("Identity", cond), _BOOL), out], "query_chunk")

    def _key_blocks(self, b: Emitter, q0: ir.Value, q1: ir.Value) -> tuple[ir.Value, ir.Value]:
        """[first], [count]: the blocks of the kc grid holding the keys rows q0:q1 may keep
        (`KeyRange.span`). Blocks stay on the grid, so every block but the one at Lk has kc keys, as
        without bounds (blocks of varying sizes split ORT's arena: more peak)."""
        upper, lower = self.keys.upper, self.keys.lower
        if upper is None and lower is None:
            return self.zero, self._ceil_div(b, self.k_len, self.k_chunk)
        stop = self.k_len if upper is None else b("Min", b("Max", b("Add", q1, self.e.const([upper])), self.zero),
                                                  self.k_len)
        if lower is None:
            return self.zero, self._ceil_div(b, stop, self.k_chunk)
        start = b("Min", b("Max", b("Add", q0, self.e.const([lower])), self.zero), stop)
        first = b("Div", start, self.k_chunk)
        count = b("Sub", self._ceil_div(b, stop, self.k_chunk), first)
        return first, b("Where", b("Greater", stop, start), count, self.zero)

    def _skipped_blocks(self, b: Emitter, block_inputs, first, count, m, row_sum, acc) -> tuple[ir.Value, ir.Value]:
        """(l, acc) after also visiting the blocks before `first` and from first + count on, when a row of
        the chunk has no score more than `UNDERFLOW` above the finite fill (e.g. every key hidden): then
        those keys count in the original. Otherwise a Loop of no trips, which returns its initial values."""
        skipped = b("Sub", self._ceil_div(b, self.k_len, self.k_chunk), count)
        threshold = self.e.const(np.float32(self.keys.fill + UNDERFLOW), np.float32)
        exact = b("Greater", b("ReduceMin", m, keepdims=0), threshold)
        trips = b("Squeeze", b("Where", exact, self.zero, skipped))

        def block(body: Emitter, j: ir.Value) -> ir.Value:
            return body("Where", body("Less", j, first), j, body("Add", j, count))

        body = self._key_body(*block_inputs, block)
        _, row_sum, acc = b("Loop", trips, None, m, row_sum, acc, body=body, outputs=3)
        return row_sum, acc

    def _key_body(self, qb, kg, vg, rows, diagonal, emitters, positions, block) -> ir.Graph:
        """Trip j visits grid block `block(body, j)` ([index]): keys k0 = index·kc to min(k0 + kc, Lk)."""
        b = self.e.subgraph()
        j, cond = ir.val(b.name("j"), _INT64, []), ir.val(b.name("cond"), _BOOL, [])
        m, row_sum, acc = (ir.val(b.name(tag), _FLOAT, [None] * 5) for tag in ("m", "l", "acc"))
        k0 = b("Mul", block(b, j), self.k_chunk)
        k1 = b("Min", b("Add", k0, self.k_chunk), self.k_len)
        # Everything else a step reads is sliced or built before S: made after S is freed, these
        # small tensors split the arena's S-sized free chunks (~16 MiB more peak on ORT 1.32).
        vb = self._read_block(b, vg, k0, k1)
        blocks = {}  # bias and mask blocks: sliced from a tensor, or computed by a score program
        for x, row_start, row_stop, last_key, role in rows:
            starts = b("Concat", row_start, b("Min", k0, last_key), axis=0)
            blocks[role] = typed(b("Slice", x, starts, b("Concat", row_stop, k1, axis=0), self.axis(3, 4)), x.dtype)
        if emitters:
            key_positions = b("Range", b("Squeeze", k0), b("Squeeze", k1), self.e.const(1))
            positions = {**positions, "key": b("Reshape", key_positions, self.e.const([1, 1, 1, 1, -1]))}
            for emitter, role in emitters:  # a bias's addends, each added in turn (the model's rounding)
                blocks[role] = (emitter.emit_addends(b, positions, rank=5) if role == "bias"
                                else emitter.emit(b, positions, rank=5))
        terms = []  # in the kernels' order: + bias, mask, + causal
        for role in ("bias", "mask"):
            block = blocks.get(role)
            if block is None:
                continue
            if role == "bias":
                terms.extend(("Add", self._as_float(b, addend)) for addend in (block if isinstance(block, list) else [block]))
            elif "fill" in blocks:  # each masked entry's value from the fill program
                terms.append(("Fill", block))
            elif self.mask_fill == -math.inf:
                terms.append(("Add", _neg_inf_where_false(b, block)))
            else:
                terms.append(("Where", block))
        if diagonal is not None:
            terms.append(("Add", self._causal_tile(b, k0, k1, *diagonal)))
        s = b("MatMul", qb, self._read_block(b, kg, k0, k1))
        if self.softcap > 0:
            s = b("Mul", b("Tanh", s), self.e.const(self.softcap, np.float32))
        for op, term in terms:
            if op == "Add":
                s = b("Add", s, term)
            else:
                fill = self._as_float(b, blocks["fill"]) if op == "Fill" else self.e.const(self.mask_fill, np.float32)
                s = b("Where", term, s, fill)
        m_new = b("Max", m, b.reduce_max(s, [-1], self.axis(-1)))
        ref = b("Max", m_new, self.neg_max)
        p = b("Exp", b("Sub", s, ref))
        rescale = b("Exp", b("Sub", m, ref))
        l_new = b("Add", b("Mul", row_sum, rescale), b("ReduceSum", p, self.axis(-1), keepdims=1))
        pv = b("MatMul", p, vb)
        acc_new = b("Add", b("Mul", acc, rescale), pv)
        outputs = [typed(b("Identity", cond), _BOOL), *(typed(x, _FLOAT) for x in (m_new, l_new, acc_new))]
        return b.graph([j, cond, m, row_sum, acc], outputs, "key_chunk")

    def _causal_tile(self, b: Emitter, k0, k_end, query_pos, first_hidden) -> ir.Value:
        """A (rows, keys) tile to add to S: −∞ above the diagonal where it crosses the block (key
        k_end − 1 ≥ first_hidden), zeros elsewhere. Adding a tile, not choosing between S and a
        masked S, keeps S from being copied out of an If branch."""
        crossed = b.subgraph()
        key_pos = crossed("Range", crossed("Squeeze", k0), crossed("Squeeze", k_end), self.e.const(1))
        tile = crossed("Where", crossed("LessOrEqual", key_pos, query_pos), self.e.const(0.0, np.float32),
                       self.e.const(-math.inf, np.float32))
        below = b.subgraph()
        tile_shape = below("Concat", below.shape(query_pos, end=1), below("Sub", k_end, k0), axis=0)
        zeros = below("ConstantOfShape", tile_shape, value=ir.tensor([0.0], dtype=_FLOAT))
        return b("If", b("Greater", k_end, first_hidden),
                 then_branch=crossed.graph([], [typed(tile, _FLOAT)], "diagonal_block"),
                 else_branch=below.graph([], [typed(zeros, _FLOAT)], "below_diagonal_block"))


def _neg_inf_where_false(e: Emitter, keep: ir.Value) -> ir.Value:
    """log(keep): 0 where kept, −∞ elsewhere, to be added to the scores."""
    return e("Log", e("Cast", keep, to=_FLOAT))


def build_chunked_attention(
    tape: ir.tape.Tape,
    q: ir.Value,
    k: ir.Value,
    v: ir.Value,
    *,
    num_heads: int,
    num_kv_heads: int,
    scale: float,
    bias: ir.Value | None = None,
    mask: ir.Value | None = None,
    softcap: float = 0.0,
    mask_fill: float = -math.inf,
    causal: bool = False,
    causal_offset: int = 0,
    q_chunk: int = 1024,
    k_chunk: int = 4096,
    q_layout: str = "BHLD",
    k_layout: str = "BHLD",
    v_layout: str = "BHLD",
    out_layout: str = "BHLD",
    name: str = "chunked_attention",
    opset: int = 18,
    bias_program: str = "",
    mask_program: str = "",
    leaves: Sequence[ir.Value] = (),
    fill_program: str = "",
) -> ir.Value:
    """Append chunked attention over q (B,H,Lq,D), k (B,Hkv,Lk,D), v (B,Hkv,Lk,Dv) to `tape`.

    The `*_layout` options give other axis orders, read block by block with no whole copy:
    "BLHD" (sequence before heads, as projections are reshaped) for any of them, "BHDL" (Kᵀ)
    for k. The output is (B, H, Lq, Dv), or (B, Lq, H, Dv) with `out_layout="BLHD"`.

    `bias` (float, added) and `mask` (bool, kept where true, else replaced by `mask_fill`) must
    have a known rank ≤ 4, broadcast to (B, H, Lq, Lk) and have a head axis of static size 1 or
    `num_heads`. Returns the (B, H, Lq, Dv) output in q's dtype; all math is in fp32. Values are
    named `<name>/...`, so `name` must be unique in the graph. Every node is valid in default-domain
    `opset` (13 or newer).

    `bias_program` / `mask_program` (JSON of `rewriter.kernels.score_program`) replace `bias` /
    `mask`: each block's values are computed in the loop from `leaves` (`onnx_score_program`), so
    nothing Lq × Lk is read. `fill_program` gives each masked entry's value in place of `mask_fill`.
    Raises ValueError for a role given both ways, a fill program without a mask, or a malformed program.
    """
    if (bias is not None and bias_program) or (mask is not None and mask_program):
        raise ValueError("a bias or mask is given both as a tensor and as a score program")
    if fill_program and mask is None and not mask_program:
        raise ValueError("a fill program needs a mask")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    layouts = {"q": q_layout, "k": k_layout, "v": v_layout, "out": out_layout}
    for role, layout in layouts.items():
        if layout not in _LAYOUTS[role]:
            raise ValueError(f"{role}_layout must be one of {_LAYOUTS[role]}, got {layout!r}")
    if q_chunk < 1 or k_chunk < 1 or softcap < 0:
        raise ValueError(f"bad chunk sizes ({q_chunk}, {k_chunk}) or softcap {softcap}")
    if q.dtype is None or not q.dtype.is_floating_point() or (mask is not None and mask.dtype != _BOOL):
        raise ValueError(f"q must be floating point (got {q.dtype}) and mask boolean")
    logger.debug("chunked attention %s: heads %d/%d, chunks (%d, %d), causal=%s offset=%d",
                 name, num_heads, num_kv_heads, q_chunk, k_chunk, causal, causal_offset)
    if opset < 13:
        raise ValueError(f"the chunked subgraph needs opset 13 or newer (got {opset})")
    keys = key_range(mask_program=parse(mask_program) if mask_program else None,
                     bias_program=parse(bias_program) if bias_program else None, dense_mask=mask is not None,
                     mask_fill=mask_fill, per_entry_fill=bool(fill_program), causal=causal,
                     causal_offset=causal_offset)
    builder = _Builder(Emitter(tape, name, opset=opset), num_heads, num_kv_heads, scale, softcap, mask_fill,
                       causal, causal_offset, q_chunk, k_chunk, layouts, keys)
    out = builder.build(q, k, v, bias, mask, {"bias": bias_program, "mask": mask_program, "fill": fill_program},
                        leaves)
    out.dtype = q.dtype
    if q.shape is not None and v.shape is not None:
        dims = {"B": q.shape[0], "H": num_heads, "L": q.shape[q_layout.index("L")], "D": v.shape[3]}
        out.shape = ir.Shape([dims[label] for label in out_layout])
    return out


def make_chunked_attention_model(
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    v_head_dim: int | None = None,
    bias_shape: Sequence[int | str] | None = None,
    mask_shape: Sequence[int | str] | None = None,
    dtype: ir.DataType = _FLOAT,
    opset: int = 18,
    **options,
) -> onnx.ModelProto:
    """A standalone model: inputs q, k, v (+ bias, mask), output `out`.

    Batch is the symbolic dim "batch", sequence lengths "q_len" and "kv_len"; use these names in
    `bias_shape` / `mask_shape` too. `options` are the keywords of `build_chunked_attention`.
    """
    q = ir.val("q", dtype, ["batch", num_heads, "q_len", head_dim])
    k = ir.val("k", dtype, ["batch", num_kv_heads, "kv_len", head_dim])
    v = ir.val("v", dtype, ["batch", num_kv_heads, "kv_len", v_head_dim or head_dim])
    bias = None if bias_shape is None else ir.val("bias", dtype, bias_shape)
    mask = None if mask_shape is None else ir.val("mask", _BOOL, mask_shape)
    tape = ir.tape.Tape()
    out = build_chunked_attention(tape, q, k, v, bias=bias, mask=mask, num_heads=num_heads,
                                  num_kv_heads=num_kv_heads, opset=opset, **options)
    return standalone_model((q, k, v, bias, mask), out, tape, "chunked_attention", {"": opset})
