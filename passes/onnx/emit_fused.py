"""Emit ONNX Runtime's ``com.microsoft.MultiHeadAttention`` or opset-23 ``Attention`` for a match.

Each target has a `*_reason` check that says why it cannot compute exactly what the match
computes (None when it can). What decides it (probed on ONNX Runtime's CPU provider):

- MultiHeadAttention takes Q/K/V as (B, L, H·D), additive ``attention_bias`` of shape
  (B|1, H|1, Lq, Lk) (no broadcast over lengths, so the bias is expanded), ``scale``, and
  ``unidirectional`` = causal with offset 0, which it applies correctly only for Lq = Lk. It has
  no soft-cap and no grouped heads (K/V are repeated); rows with every key at −∞ give NaN,
  as a naive softmax does. On the CPU it runs flash attention only without bias and causality
  and with 3-D K/V (4-D K/V mean (B, H, L, D) past state and take the n×n path), and it copies
  Q, K and V into (B, H, L, D) itself.
- Attention-23 takes grouped heads natively, a bool (keep) or float (added) ``attn_mask``,
  ``is_causal`` (offset 0 without a cache), ``scale`` and ``softcap`` in the kernels' order; it
  gives 0 for rows with every key masked, where a model's own softmax gives NaN, so it is used
  only when the model zeroes those rows too or no row can be fully masked.

A boolean mask whose fill is −∞ (or finite but ≤ −1e30, see `EFFECTIVELY_NEG_INF`) becomes the
additive term ``Where(keep, 0, fill)``: the same scores up to rounding for |score| < 1e29.

Operands that are (B, L, H, D) views already are packed with a Reshape and passed to one node.
Others (torch exports Q/K/V as (B, H, L, D)) would need a transposed copy each on top of
ORT's own, so on that flash path there is one single-head node per head instead, each reading a
(B, L, D) slice of its head: the copies then cost one head at a time::

    q ─Slice head h─Squeeze─┐
    k ─Slice head h//G─...──┼─ MultiHeadAttention(num_heads=1) ─Unsqueeze─┐
    v ─Slice head h//G─...──┘                                              ├─ Concat(heads) ─ restore
                                                       (one per head h) ──┘

The slices carry no ``axes`` input: ORT fuses slices of one tensor along a constant axis into
a Split, which would make every head's copy live at once.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from passes.onnx.emit_chunked import combined_bias, keep_mask, zero_nan_rows
from passes.onnx.graph_values import FLOAT_TYPES, is_op
from passes.onnx.onnx_match import AnalysisContext, OnnxAttentionMatch
from passes.onnx.operand_layout import (
    BNSH,
    BSNH,
    NodeWriter,
    arrange,
    arranged_dims,
    copies,
    repeat_heads,
    restore_layout,
    restores_in_place,
)
from passes.onnx.score_operands import EFFECTIVELY_NEG_INF

__all__ = ["emit_onnx_attention", "emit_ort_mha", "onnx_attention_reason", "ort_mha_reason"]

_MHA_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16}


def _mask_fill_reason(match: OnnxAttentionMatch, target: str) -> str | None:
    if match.mask is not None and match.mask_fill != -math.inf and match.mask_fill > EFFECTIVELY_NEG_INF:
        return f"{target} cannot fill masked scores with the finite value {match.mask_fill:g}"
    return None


def ort_mha_reason(ctx: AnalysisContext, match: OnnxAttentionMatch) -> str | None:
    dtype = ctx.facts.dtype(match.query.value)
    if is_op(match.fused, "MultiHeadAttention", domain="com.microsoft"):
        return "already com.microsoft.MultiHeadAttention"
    if dtype not in _MHA_TYPES:
        return f"MultiHeadAttention does not take {dtype} inputs"
    if match.softcap:
        return "MultiHeadAttention has no soft-capping"
    if match.causal and (match.causal_offset != 0 or not match.equal_lengths):
        return "MultiHeadAttention is causal only with offset 0 and equal query and key lengths"
    if not isinstance(arranged_dims(ctx, match.query)[1], int):
        return "MultiHeadAttention needs a static head count"
    return _mask_fill_reason(match, "MultiHeadAttention")


def onnx_attention_reason(ctx: AnalysisContext, match: OnnxAttentionMatch) -> str | None:
    if is_op(match.fused, "Attention"):
        return "already an Attention-23 node"
    if ctx.facts.dtype(match.query.value) not in FLOAT_TYPES:
        return "Attention-23 needs floating-point inputs"
    if match.causal and match.causal_offset != 0:
        return f"Attention-23 is causal only with offset 0 (this block has {match.causal_offset})"
    can_mask_a_row = bool(match.biases) or (match.mask is not None and match.mask_fill == -math.inf)
    if can_mask_a_row and not match.zero_masked_rows:
        return ("Attention-23 gives 0 for rows whose every key is masked where this model gives NaN, "
                "and its bias or mask can mask whole rows")
    return _mask_fill_reason(match, "Attention-23")


def _additive_mask(w: NodeWriter, ctx: AnalysisContext, match: OnnxAttentionMatch, dtype) -> ir.Value | None:
    """All bias terms plus the boolean mask as Where(keep, 0, fill), in `dtype`."""
    bias, keep = combined_bias(w, ctx, match, dtype), keep_mask(w, ctx, match)
    if bias is not None and bias.dtype != dtype:
        bias = w.op("Cast", bias, to=dtype)
    if keep is not None:
        fill = w.op("Where", keep, w.const(0, dtype.numpy()), w.const(match.mask_fill, dtype.numpy()))
        bias = fill if bias is None else w.op("Add", bias, fill)
    return bias


def _full_lengths(w: NodeWriter, mask: ir.Value | None, q: ir.Value, k: ir.Value, axis: int) -> ir.Value | None:
    """`mask` expanded over (Lq, Lk), read off `axis` of q and k: ORT's fused kernels do not
    broadcast the length axes."""
    if mask is None:
        return None
    lengths = w.op("Concat", w.const([1, 1]), w.op("Shape", q, start=axis, end=axis + 1),
                   w.op("Shape", k, start=axis, end=axis + 1), axis=0)
    return w.op("Expand", mask, lengths)


def _packed(w: NodeWriter, value_bsnh: ir.Value) -> ir.Value:
    """(B, L, H, D) → (B, L, H·D), a view."""
    return w.op("Reshape", value_bsnh, w.const([0, 0, -1]))


def _heads_expanded(w: NodeWriter, ctx: AnalysisContext, match: OnnxAttentionMatch, expanded, source):
    """K or V with every query head, as (B, L, H, D)."""
    if expanded is not None:
        return arrange(w, ctx, expanded, order=BSNH)
    heads = arranged_dims(ctx, match.query)[1]
    grouped = repeat_heads(w, arrange(w, ctx, source), heads // match.num_kv_heads, match.num_kv_heads)
    return w.op("Transpose", grouped, perm=list(BSNH))


def _one_node(w: NodeWriter, ctx: AnalysisContext, match: OnnxAttentionMatch, heads: int, dtype, bias):
    """One node over all heads; the result as (B, L, H, Dv)."""
    q = arrange(w, ctx, match.query, dtype, BSNH)
    k = _heads_expanded(w, ctx, match, match.key, match.key_source)
    v = _heads_expanded(w, ctx, match, match.value, match.value_source)
    bias = _full_lengths(w, bias, q, k, axis=1)
    out = w.op("MultiHeadAttention", _packed(w, q), _packed(w, k), _packed(w, v), None, None, bias,
               domain="com.microsoft", num_heads=heads, scale=float(match.scale), unidirectional=int(match.causal))
    return w.op("Reshape", out, w.const([0, 0, heads, -1]))


def _head_slice(w: NodeWriter, operand: tuple[ir.Value, int], head: int) -> ir.Value:
    """Head `head` of a 4-D value whose heads are on `axis`, as (B, L, D)."""
    value, axis = operand
    starts, ends = [0] * axis + [head], [np.iinfo(np.int64).max] * axis + [head + 1]
    return w.op("Squeeze", w.op("Slice", value, w.const(starts), w.const(ends)), w.const([axis]))


def _node_per_head(w: NodeWriter, ctx: AnalysisContext, match: OnnxAttentionMatch, heads: int, kv_heads: int,
                   order) -> ir.Value:
    """One single-head node per query head; the result with its axes in `order`."""
    operands = []
    for operand in (match.query, match.key_source or match.key, match.value_source or match.value):
        layout = BSNH if not copies(ctx, operand, BSNH) else BNSH
        operands.append((arrange(w, ctx, operand, order=layout), layout.index(1)))
    q, k, v = operands
    head_axis = order.index(1)
    outs = []
    for head in range(heads):
        kv_head = head * kv_heads // heads
        out = w.op("MultiHeadAttention", _head_slice(w, q, head), _head_slice(w, k, kv_head),
                   _head_slice(w, v, kv_head), domain="com.microsoft", num_heads=1, scale=float(match.scale))
        outs.append(w.op("Unsqueeze", out, w.const([head_axis])))
    return outs[0] if heads == 1 else w.op("Concat", *outs, axis=head_axis)


def emit_ort_mha(w: NodeWriter, ctx: AnalysisContext, match: OnnxAttentionMatch) -> ir.Value:
    dtype = ctx.facts.dtype(match.query.value)
    heads = arranged_dims(ctx, match.query)[1]
    key, value = match.key_source or match.key, match.value_source or match.value
    kv_heads = arranged_dims(ctx, key)[1]
    with w.annotated():
        bias = _additive_mask(w, ctx, match, dtype)
        packing_copies = any(copies(ctx, operand, BSNH) for operand in (match.query, key, value))
        if bias is None and not match.causal and packing_copies and isinstance(kv_heads, int) and heads > 1:
            order = BSNH if restores_in_place(match, BSNH) and not restores_in_place(match, BNSH) else BNSH
            out = _node_per_head(w, ctx, match, heads, kv_heads, order)
        else:
            out, order = _one_node(w, ctx, match, heads, dtype, bias), BSNH
    if match.zero_masked_rows:
        out = zero_nan_rows(w, out, dtype)
    return restore_layout(w, out, match, dtype, ctx.facts.dtype(match.output), order)


def emit_onnx_attention(w: NodeWriter, ctx: AnalysisContext, match: OnnxAttentionMatch) -> ir.Value:
    dtype = ctx.facts.dtype(match.query.value)
    with w.annotated():
        q = arrange(w, ctx, match.query, dtype)
        k = arrange(w, ctx, match.key_source or match.key)
        v = arrange(w, ctx, match.value_source or match.value)
        if not match.biases and match.mask is not None and match.mask_fill == -math.inf:
            mask = keep_mask(w, ctx, match)
        else:
            mask = _additive_mask(w, ctx, match, dtype)
        mask = _full_lengths(w, mask, q, k, axis=2)
    out = w.op("Attention", q, k, v, mask, is_causal=int(match.causal), scale=float(match.scale),
               softcap=float(match.softcap))
    return restore_layout(w, out, match, dtype, ctx.facts.dtype(match.output))
