"""Emit the chunked standard-op subgraph (`build_chunked_attention`) for one accepted match.

    Q, K/V sources, bias terms, mask ─ arrange ─ build_chunked_attention ─ (NaN rows → 0) ─ restore

Q, K and V are read from the values they are views of (`arrange`), in whichever of the kernel's
layouts (B, H, L, D), (B, L, H, D) or, for K, (B, H, D, L) needs no transpose, so the kernel
slices the model's own tensors; the output comes in the order its users need, when the kernel
has it. Grouped K/V heads are passed unexpanded; every bias term is summed into one
(B|1, H|1, Lq|1, Lk) operand, sliced block by block inside the loops. Dynamic batch and sequence
lengths stay dynamic.
"""

from __future__ import annotations

import onnx_ir as ir

from passes.attention_spec import ChunkSizes
from passes.onnx.onnx_match import AnalysisContext, OnnxAttentionMatch, Rejected
from passes.onnx.operand_layout import (
    BNSH,
    BSNH,
    NodeWriter,
    arrange,
    arranged_dims,
    copies,
    restore_layout,
    restores_in_place,
)
from rewriter.kernels.onnx_chunked_attention import build_chunked_attention

__all__ = ["combined_bias", "emit_chunked", "zero_nan_rows"]

CHUNKED = "chunked"
# The kernel's layouts as orders of the canonical (batch, heads, rows, cols) axes, preferred first.
_LAYOUTS = {"BHLD": BNSH, "BLHD": BSNH, "BHDL": (0, 1, 3, 2)}

def _broadcast(dims_list: list[list]) -> list:
    out = []
    for column in zip(*dims_list):
        wide = [d for d in column if d != 1]
        out.append(1 if not wide else (wide[0] if all(d == wide[0] for d in wide) else None))
    return out

def combined_bias(w: NodeWriter, ctx: AnalysisContext, match: OnnxAttentionMatch, dtype) -> ir.Value | None:
    """The sum of the match's bias terms (each times its factor), 4-D, in `dtype` when they differ."""
    terms, dims = [], []
    dtypes = {ctx.facts.dtype(operand.value) for operand, _ in match.biases}
    for operand, factor in match.biases:
        term = arrange(w, ctx, operand)
        term_dtype = ctx.facts.dtype(operand.value)
        if len(dtypes) > 1 and term_dtype != dtype:
            term, term_dtype = w.op("Cast", term, to=dtype), dtype
        if factor != 1.0:
            term = w.op("Mul", term, w.const(factor, term_dtype.numpy()))
        terms.append(term)
        dims.append(arranged_dims(ctx, operand))
    if not terms:
        return None
    total = terms[0]
    for term in terms[1:]:
        total = w.op("Add", total, term)
    return w.annotate(total, dtype if len(dtypes) > 1 else dtypes.pop(), _broadcast(dims))

def keep_mask(w: NodeWriter, ctx: AnalysisContext, match: OnnxAttentionMatch) -> ir.Value | None:
    """The boolean mask as 4-D 'true = keep'."""
    if match.mask is None:
        return None
    mask = arrange(w, ctx, match.mask, ir.DataType.BOOL)
    if not match.mask_keep_when_true:
        mask = w.annotate(w.op("Not", mask), ir.DataType.BOOL, arranged_dims(ctx, match.mask))
    return mask

def zero_nan_rows(w: NodeWriter, out: ir.Value, dtype) -> ir.Value:
    """Where(IsNaN(out), 0, out): rows whose every key was masked become 0, as the model's did."""
    return w.op("Where", w.op("IsNaN", out), w.const(0, dtype.numpy()), out)

def _read(w: NodeWriter, ctx: AnalysisContext, operand, layouts: tuple[str, ...], dtype=None):
    """The operand in the first of `layouts` it needs no copy for (else the first), and that layout."""
    layout = next((name for name in layouts if not copies(ctx, operand, _LAYOUTS[name])), layouts[0])
    return arrange(w, ctx, operand, dtype, _LAYOUTS[layout]), layout


def emit_chunked(w: NodeWriter, ctx: AnalysisContext, match: OnnxAttentionMatch, chunks: ChunkSizes) -> ir.Value:
    dtype = ctx.facts.dtype(match.query.value)
    key, value = match.key_source or match.key, match.value_source or match.value
    out_layout = "BLHD" if restores_in_place(match, BSNH) and not restores_in_place(match, BNSH) else "BHLD"
    with w.annotated():
        q, q_layout = _read(w, ctx, match.query, ("BHLD", "BLHD"), dtype)
        k, k_layout = _read(w, ctx, key, ("BHLD", "BLHD", "BHDL"))
        v, v_layout = _read(w, ctx, value, ("BHLD", "BLHD"))
        heads, kv_heads = arranged_dims(ctx, match.query)[1], arranged_dims(ctx, key)[1]
        if not isinstance(heads, int) or not isinstance(kv_heads, int):
            raise Rejected(f"the chunked kernel needs static head counts (got {heads}/{kv_heads})")
        bias, mask = combined_bias(w, ctx, match, dtype), keep_mask(w, ctx, match)
        try:
            out = build_chunked_attention(
                w.tape, q, k, v, num_heads=heads, num_kv_heads=kv_heads, scale=match.scale, bias=bias,
                mask=mask, softcap=match.softcap, mask_fill=match.mask_fill, causal=match.causal,
                causal_offset=match.causal_offset, q_chunk=chunks.query, k_chunk=chunks.key, q_layout=q_layout,
                k_layout=k_layout, v_layout=v_layout, out_layout=out_layout, name=f"{w.prefix}/chunked")
        except ValueError as error:
            raise Rejected(f"chunked kernel: {error}") from error
    if match.zero_masked_rows:
        out = zero_nan_rows(w, out, dtype)
    return restore_layout(w, out, match, dtype, ctx.facts.dtype(match.output), _LAYOUTS[out_layout])
