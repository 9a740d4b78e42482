"""The `AttentionSpec` fields of an ONNX match: layouts, sizes, and what masks the scores."""

from __future__ import annotations

from passes.core.attention_spec import layout_name
from passes.core.mask_semantics import mask_kind
from passes.core.operand_forms import operand_fields
from passes.onnx.axis_labels import Operand
from passes.onnx.onnx_match import AnalysisContext, OnnxAttentionMatch

__all__ = ["spec_fields"]


def _layout(operand: Operand, packed: bool = False) -> str:
    """The operand's layout; `packed` (or `operand.merged`): its (batch, heads) axes are one axis."""
    name = layout_name(operand.labels, operand.order)
    return name.replace("BH", "(BH)", 1) if packed or operand.merged else name


def spec_fields(ctx: AnalysisContext, match: OnnxAttentionMatch) -> dict:
    """Spec fields of an accepted match; sizes are ints where static, else None."""
    query, key, value = match.query, match.key_source or match.key, match.value_source or match.value
    q_seq, head_dim = query.order[-2], query.order[-1]
    batch = query.order[:-2]
    fields = {
        "causal": match.causal, "causal_offset": match.causal_offset, "scale": match.scale,
        "softcap": match.softcap or None, "mask_fill": match.mask_fill,
        "mask_kind": mask_kind(match.mask is not None or match.mask_program is not None,
                               bool(match.biases) or match.bias_program is not None),
        "q_layout": _layout(query), "k_layout": _layout(key), "v_layout": _layout(value),
        "out_layout": _layout(Operand(match.output, match.out_labels, match.out_canonical), match.out_merged_batch),
        "seq_len_q": ctx.static_dim(query, q_seq), "seq_len_k": ctx.static_dim(key, key.order[-2]),
        "head_dim": ctx.static_dim(query, head_dim), "value_head_dim": ctx.static_dim(value, value.order[-1]),
        "batch_size": ctx.static_dim(query, batch[0]) if batch else 1,
        "num_heads": match.num_heads, "num_kv_heads": match.num_kv_heads,
        **operand_fields(mask_program=match.mask_program, bias_program=match.bias_program,
                         dense_mask=match.mask.value.name if match.mask is not None else None,
                         dense_biases=[operand.value.name for operand, _ in match.biases],
                         leaves=[leaf.name for leaf in match.leaves], causal=match.causal),
    }
    return fields
