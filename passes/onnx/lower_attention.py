"""The one lowering of ``ai.rewriter::Attention`` nodes, for files and exports alike.

Targets (the names users pass, and the op each becomes in reports):

- ``chunked``: the standard-op Loop subgraph of `build_chunked_attention`; memory bounded by the
  node's ``q_chunk`` × ``k_chunk`` blocks. Q, K, V and the output are read and written through a
  ``Transpose`` to (B, L, H, D) (or K as (B, H, D, L)) when that is where they come from, so the
  kernel slices the model's own tensors.
- ``ort``: ``com.microsoft.MultiHeadAttention`` on (B, L, H·D) views, K/V heads repeated for
  grouped queries. Where packing would copy Q, K and V whole and there is no bias, mask or
  causality (ORT's CPU flash path), one single-head node per head reads a (B, L, D) slice of its
  head instead, so the copies cost one head at a time.
- ``onnx-attention``: opset-23 ``Attention`` (grouped heads native).

`refusal` is the one place that says when a target cannot compute a block exactly (probed on ORT's
CPU provider): MultiHeadAttention has no soft-cap, is causal only with offset 0 and equal lengths,
takes fp32/fp16 only and needs static head counts; Attention-23 has no causal offset and gives 0
for rows whose every key is masked (used only where the block zeroes those rows too, or none can
be masked) and so takes no finite fill (such rows average V in the model); MultiHeadAttention
takes none above −1e30. Rows whose every key
is masked give NaN from the chunked kernel and MultiHeadAttention; a node with ``zero_masked_rows``
gets ``Where(IsNaN(out), 0, out)`` after them.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import onnx_ir as ir

from passes.core.mask_semantics import EFFECTIVELY_NEG_INF
from passes.core.planner import CHUNKED, ONNX_ATTENTION, ORT
from passes.onnx.attention_node import (ATTENTION_OP, REWRITER_DOMAIN, AttentionAttributes, attention_attributes,
                                        program_leaves)
from passes.onnx.graph_values import attribute, is_op, producer_op
from passes.onnx.operand_layout import repeat_heads
from rewriter.kernels.onnx_chunked_attention import build_chunked_attention
from rewriter.kernels.onnx_emitter import Emitter

__all__ = ["CHUNKED", "ONNX_ATTENTION", "ORT", "TARGET_OPS", "BlockFacts", "LoweringError", "block_facts",
           "lower_attention_node", "refusal"]

logger = logging.getLogger(__name__)

TARGET_OPS = {CHUNKED: "chunked", ORT: "com.microsoft.MultiHeadAttention", ONNX_ATTENTION: "Attention-23"}
_MHA_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16}
_FLOAT_TYPES = _MHA_TYPES | {ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
_TO_BSNH, _TO_BHDL = [0, 2, 1, 3], [0, 1, 3, 2]


class LoweringError(ValueError):
    """An ``ai.rewriter`` node that cannot be lowered; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class BlockFacts:
    """What the target rules read about one block: its dtype, static sizes and attributes."""

    dtype: ir.DataType | None
    heads: int | None
    kv_heads: int | None
    value_head_dim: int | None
    equal_lengths: bool  # query and key lengths provably the same
    has_bias: bool
    has_mask: bool
    attributes: AttentionAttributes

    @property
    def has_program(self) -> bool:
        """The bias, mask or fill is a score program, computed block by block from its leaves."""
        return bool(self.attributes.bias_program or self.attributes.mask_program or self.attributes.fill_program)

    @property
    def flash_eligible(self) -> bool:
        """No bias, mask, causality or soft-cap: ORT's CPU MultiHeadAttention takes its flash path."""
        a = self.attributes
        return not (a.causal or self.has_bias or self.has_mask or self.has_program or a.softcap)


def _dim(value: ir.Value | None, axis: int):
    if value is None or value.shape is None or len(value.shape) != 4:
        return None
    dim = value.shape[axis]
    return dim if isinstance(dim, int) else dim.value


def block_facts(node: ir.Node) -> BlockFacts:
    """The facts of a canonical node, from its inputs' shapes and its attributes."""
    q, k, v = node.inputs[:3]
    static = [dim if isinstance(dim, int) else None for dim in (_dim(q, 1), _dim(k, 1), _dim(v, 3))]
    q_len, k_len = _dim(q, 2), _dim(k, 2)
    return BlockFacts(q.dtype, *static, equal_lengths=q_len is not None and q_len == k_len,
                      has_bias=_input(node, 3) is not None, has_mask=_input(node, 4) is not None,
                      attributes=attention_attributes(node))



def _finite_fill(facts: BlockFacts, target: str, limit: float = EFFECTIVELY_NEG_INF) -> str | None:
    """Why `target` cannot take a mask filled with a finite value above `limit`, or None."""
    fill = facts.attributes.mask_fill
    if facts.has_mask and fill != -math.inf and fill > limit:
        return f"{target} cannot fill masked scores with the finite value {fill:g}"
    return None


def refusal(facts: BlockFacts, target: str) -> str | None:
    """Why `target` cannot compute the block exactly, or None when it can."""
    a = facts.attributes
    if facts.heads is None or facts.kv_heads is None:
        return f"{TARGET_OPS[target]} needs static head counts (got {facts.heads}/{facts.kv_heads})"
    if target == CHUNKED:
        return None
    if a.fill_program:
        return (f"{TARGET_OPS[target]} fills masked scores with one constant, not per entry (a bias follows a "
                "mask with a finite fill)")
    if facts.has_program:
        # Their masks are dense (.., Lq, Lk) tensors: a score program would be built at full size.
        return f"{TARGET_OPS[target]} takes the mask or bias only as an Lq × Lk tensor, not as a score program"
    if target == ORT:
        if facts.dtype not in _MHA_TYPES:
            return f"MultiHeadAttention does not take {facts.dtype} inputs"
        if a.softcap:
            return "MultiHeadAttention has no soft-capping"
        if a.causal and (a.causal_offset != 0 or not facts.equal_lengths):
            return "MultiHeadAttention is causal only with offset 0 and equal query and key lengths"
        if facts.value_head_dim is None:
            return "MultiHeadAttention needs a static value head size"
        return _finite_fill(facts, "MultiHeadAttention")
    if target == ONNX_ATTENTION:
        if facts.dtype not in _FLOAT_TYPES:
            return "Attention-23 needs floating-point inputs"
        if a.causal and a.causal_offset != 0:
            return f"Attention-23 is causal only with offset 0 (this block has {a.causal_offset})"
        can_mask_a_row = facts.has_bias or (facts.has_mask and a.mask_fill == -math.inf)
        if can_mask_a_row and not a.zero_masked_rows:
            return ("Attention-23 gives 0 for rows whose every key is masked where this model gives NaN, "
                    "and its bias or mask can mask whole rows")
        # Rows whose every key holds a finite fill average V in the model; Attention-23 gives them 0.
        return _finite_fill(facts, "Attention-23", limit=-math.inf)
    raise ValueError(f"unknown lowering target {target!r}")


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _through_transpose(value: ir.Value, perm: list[int]) -> ir.Value | None:
    """The input of the Transpose(perm) that produced `value`, if one did."""
    producer = producer_op(value, "Transpose")
    return producer.inputs[0] if producer is not None and list(attribute(producer, "perm", ())) == perm else None


def _read(value: ir.Value, layouts: tuple[str, ...]) -> tuple[ir.Value, str]:
    """`value` (B, H, L, D), or the tensor it transposes when that is in one of `layouts`."""
    for layout, perm in (("BLHD", _TO_BSNH), ("BHDL", _TO_BHDL)):
        source = _through_transpose(value, perm) if layout in layouts else None
        if source is not None and source.shape is not None and len(source.shape) == 4:
            return source, layout
    return value, "BHLD"


def _written_transposed(out: ir.Value) -> ir.Node | None:
    """The Transpose to (B, L, H, Dv) that is the output's only user, if it is."""
    users = list(dict.fromkeys(out.consumers()))
    if out.is_graph_output() or len(users) != 1 or not is_op(users[0], "Transpose"):
        return None
    return users[0] if list(attribute(users[0], "perm", ())) == _TO_BSNH and users[0].graph is out.graph else None


def _chunked(w: Emitter, node: ir.Node, facts: BlockFacts, out_layout: str) -> ir.Value:
    a = facts.attributes
    (q, q_layout), (k, k_layout), (v, v_layout) = (
        _read(node.inputs[0], ("BLHD",)), _read(node.inputs[1], ("BLHD", "BHDL")), _read(node.inputs[2], ("BLHD",)))
    return build_chunked_attention(
        w.tape, q, k, v, num_heads=facts.heads, num_kv_heads=facts.kv_heads, scale=a.scale, bias=_input(node, 3),
        mask=_input(node, 4), softcap=a.softcap, mask_fill=a.mask_fill, causal=a.causal,
        causal_offset=a.causal_offset, q_chunk=a.q_chunk, k_chunk=a.k_chunk, q_layout=q_layout, k_layout=k_layout,
        v_layout=v_layout, out_layout=out_layout, name=f"{w.prefix}/chunked", opset=w.opset,
        bias_program=a.bias_program, mask_program=a.mask_program, leaves=program_leaves(node),
        fill_program=a.fill_program)


def _additive_mask(w: Emitter, node: ir.Node, facts: BlockFacts, keep_bool: bool) -> ir.Value | None:
    """Bias and keep-mask as one attention mask over the full (.., Lq, Lk): ORT's kernels do not
    broadcast the length axes. With `keep_bool`, a lone −∞ mask stays boolean (Attention-23 keeps where true)."""
    q, k, bias, mask = node.inputs[0], node.inputs[1], _input(node, 3), _input(node, 4)
    if bias is not None and bias.dtype is not None and bias.dtype != q.dtype:
        bias = w.op("Cast", bias, to=q.dtype)
    attn_mask = bias
    if mask is not None:
        fill = facts.attributes.mask_fill
        if bias is None and fill == -math.inf and keep_bool:
            attn_mask = mask
        else:
            dtype = q.dtype.numpy()
            fill_values = w.op("Where", mask, w.const(0, dtype), w.const(fill, dtype))
            attn_mask = fill_values if bias is None else w.op("Add", bias, fill_values)
    if attn_mask is None:
        return None
    lengths = w.op("Concat", w.const([1, 1]), w.shape(q, start=2, end=3), w.shape(k, start=2, end=3),
                   axis=0)
    return w.op("Expand", attn_mask, lengths)


def _packed(w: Emitter, value: ir.Value, heads: int, source_heads: int) -> ir.Value:
    """(B, Hs, L, D) → (B, L, H·D), heads repeated to `heads`; a view when the input transposes (B, L, H, D)."""
    if source_heads == heads:
        source = _through_transpose(value, _TO_BSNH)
        if source is not None:
            return w.op("Reshape", source, w.const([0, 0, -1]))
    value = repeat_heads(w, value, heads // source_heads, source_heads)
    return w.op("Reshape", w.op("Transpose", value, perm=_TO_BSNH), w.const([0, 0, -1]))


def _head(w: Emitter, value: ir.Value, head: int) -> ir.Value:
    """Head `head` as (B, L, D), sliced from (B, L, H, D) where that is the source. The slices carry no
    ``axes`` input: ORT fuses slices of one tensor along a constant axis into a Split, which would
    make every head's copy live at once."""
    source = _through_transpose(value, _TO_BSNH)
    value, axis = (source, 2) if source is not None else (value, 1)
    starts, ends = [0] * axis + [head], [np.iinfo(np.int64).max] * axis + [head + 1]
    return w.op("Squeeze", w.op("Slice", value, w.const(starts), w.const(ends)), w.const([axis]))


def _ort_mha(w: Emitter, node: ir.Node, facts: BlockFacts, out_layout: str) -> ir.Value:
    """The result in `out_layout` from MultiHeadAttention: one node over all heads, or one per head
    (see the module docstring)."""
    q, k, v = node.inputs[:3]
    a, heads, kv_heads = facts.attributes, facts.heads, facts.kv_heads
    head_axis = out_layout.index("H")
    copies = any(_through_transpose(x, _TO_BSNH) is None for x in (q, k, v))
    if facts.flash_eligible and copies and heads > 1:
        outs = []
        for head in range(heads):
            kv_head = head * kv_heads // heads
            out = w.op("MultiHeadAttention", _head(w, q, head), _head(w, k, kv_head), _head(w, v, kv_head),
                       domain="com.microsoft", num_heads=1, scale=float(a.scale))
            outs.append(w.op("Unsqueeze", out, w.const([head_axis])))
        return w.op("Concat", *outs, axis=head_axis)
    bias = _additive_mask(w, node, facts, keep_bool=False)
    out = w.op("MultiHeadAttention", _packed(w, q, heads, heads), _packed(w, k, heads, kv_heads),
               _packed(w, v, heads, kv_heads), None, None, bias, domain="com.microsoft", num_heads=heads,
               scale=float(a.scale), unidirectional=int(a.causal))
    out = w.op("Reshape", out, w.const([0, 0, heads, facts.value_head_dim]))
    return out if out_layout == "BLHD" else w.op("Transpose", out, perm=_TO_BSNH)


def _onnx_attention(w: Emitter, node: ir.Node, facts: BlockFacts) -> ir.Value:
    a = facts.attributes
    attributes = {"scale": float(a.scale), "is_causal": int(a.causal)}
    if a.softcap:
        attributes["softcap"] = float(a.softcap)
    return w.op("Attention", *node.inputs[:3], _additive_mask(w, node, facts, keep_bool=True), **attributes)


def lower_attention_node(node: ir.Node, target: str, opset: int) -> None:
    """Replace the canonical `node` in its graph by `target`'s ops, valid in default-domain `opset`
    (13 or newer; 23 for "onnx-attention"); raises LoweringError when `target` refuses it (`refusal`)
    or its ``row_stats`` output is read."""
    if node.domain != REWRITER_DOMAIN or node.op_type != ATTENTION_OP:
        raise LoweringError(f"{node.name}: not an {REWRITER_DOMAIN}::{ATTENTION_OP} node")
    if len(node.outputs) > 1 and node.outputs[1].uses():
        raise LoweringError(f"{node.name}: its row_stats output is used; only the attention output can be lowered")
    facts = block_facts(node)
    reason = refusal(facts, target)
    if reason is not None:
        raise LoweringError(f"{node.name}: {reason}")
    old, graph = node.outputs[0], node.graph
    w = Emitter(ir.tape.Tape(), f"{node.name or old.name}/{target}", opset=opset)
    transpose = _written_transposed(old) if target != ONNX_ATTENTION else None
    out_layout = "BLHD" if transpose is not None else "BHLD"
    if target == CHUNKED:
        out = _chunked(w, node, facts, out_layout)
    elif target == ORT:
        out = _ort_mha(w, node, facts, out_layout)
    else:
        out = _onnx_attention(w, node, facts)
    if facts.attributes.zero_masked_rows and target != ONNX_ATTENTION:
        out = w.op("Where", w.op("IsNaN", out), w.const(0, node.inputs[0].dtype.numpy()), out)
    replaced = [node] if transpose is None else [node, transpose]
    if transpose is not None:
        old = transpose.outputs[0]
    out.dtype, out.shape = old.dtype or node.inputs[0].dtype, old.shape
    ir.convenience.replace_nodes_and_values(graph, node, replaced, w.tape.nodes, [old], [out])
