"""Emit ONNX Runtime's ``com.microsoft.MultiHeadAttention`` or opset-23 ``Attention`` for a match.

Each target has a `*_reason` check that says why it cannot compute exactly what the match
computes (None when it can). What decides it (probed on ONNX Runtime's CPU provider):

- MultiHeadAttention takes Q/K/V as (B, L, H·D), additive ``attention_bias`` of shape
  (B|1, H|1, Lq, Lk) (no broadcast over lengths, so the bias is expanded), ``scale``, and
  ``unidirectional`` = causal with offset 0, which it applies correctly only for Lq = Lk. It has
  no soft-cap and no grouped heads (K/V are repeated); rows with every key at −∞ give NaN,
  as a naive softmax does.
- Attention-23 takes grouped heads natively, a bool (keep) or float (added) ``attn_mask``,
  ``is_causal`` (offset 0 without a cache), ``scale`` and ``softcap`` in the kernels' order; it
  gives 0 for rows with every key masked, where a model's own softmax gives NaN, so it is used
  only when the model zeroes those rows too or no row can be fully masked.

A boolean mask whose fill is −∞ (or finite but ≤ −1e30, see `EFFECTIVELY_NEG_INF`) becomes the
additive term ``Where(keep, 0, fill)``: the same scores up to rounding for |score| < 1e29.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from passes.onnx.emit_chunked import combined_bias, keep_mask, zero_nan_rows
from passes.onnx.graph_values import FLOAT_TYPES, is_op
from passes.onnx.onnx_match import AnalysisContext, OnnxAttentionMatch
from passes.onnx.operand_layout import NodeWriter, arrange, arranged_dims, repeat_heads, restore_layout
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


def _full_lengths(w: NodeWriter, mask: ir.Value | None, q4: ir.Value, k4: ir.Value) -> ir.Value | None:
    """`mask` expanded over (Lq, Lk): ORT's fused kernels do not broadcast the length axes."""
    if mask is None:
        return None
    lengths = w.op("Concat", w.const([1, 1]), w.op("Shape", q4, start=2, end=3), w.op("Shape", k4, start=2, end=3),
                   axis=0)
    return w.op("Expand", mask, lengths)


def _packed(w: NodeWriter, value_4d: ir.Value) -> ir.Value:
    """(B, H, L, D) → (B, L, H·D)."""
    return w.op("Reshape", w.op("Transpose", value_4d, perm=[0, 2, 1, 3]), w.const([0, 0, -1]))


def _heads_expanded(w: NodeWriter, ctx: AnalysisContext, match: OnnxAttentionMatch, expanded, source):
    if expanded is not None:
        return arrange(w, ctx, expanded)
    heads = arranged_dims(ctx, match.query)[1]
    return repeat_heads(w, arrange(w, ctx, source), heads // match.num_kv_heads, match.num_kv_heads)


def emit_ort_mha(w: NodeWriter, ctx: AnalysisContext, match: OnnxAttentionMatch) -> ir.Value:
    dtype = ctx.facts.dtype(match.query.value)
    heads = arranged_dims(ctx, match.query)[1]
    with w.annotated():
        q4 = arrange(w, ctx, match.query, dtype)
        k4 = _heads_expanded(w, ctx, match, match.key, match.key_source)
        v4 = _heads_expanded(w, ctx, match, match.value, match.value_source)
        bias = _full_lengths(w, _additive_mask(w, ctx, match, dtype), q4, k4)
    out = w.op("MultiHeadAttention", _packed(w, q4), _packed(w, k4), _packed(w, v4), None, None, bias,
               domain="com.microsoft", num_heads=heads, scale=float(match.scale), unidirectional=int(match.causal))
    out = w.op("Transpose", w.op("Reshape", out, w.const([0, 0, heads, -1])), perm=[0, 2, 1, 3])
    if match.zero_masked_rows:
        out = zero_nan_rows(w, out, dtype)
    return restore_layout(w, out, match, dtype, ctx.facts.dtype(match.output))


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
        mask = _full_lengths(w, mask, q, k)
    out = w.op("Attention", q, k, v, mask, is_causal=int(match.causal), scale=float(match.scale),
               softcap=float(match.softcap))
    return restore_layout(w, out, match, dtype, ctx.facts.dtype(match.output))
