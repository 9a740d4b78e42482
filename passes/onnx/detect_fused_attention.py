"""Attention nodes already in the graph: opset-23 ``Attention`` and ORT's ``MultiHeadAttention``.

Both compute the whole n×n score matrix on ONNX Runtime's CPU provider (MultiHeadAttention takes
its flash path only without bias, masks and causality), so they are candidates like any softmax.
A node is taken when the record can say exactly what it computes:

- ``Attention`` (opset ≥ 23): 4-D or 3-D (with ``q_num_heads``/``kv_num_heads``) Q/K/V, grouped
  heads, bool or float ``attn_mask``, ``is_causal`` (offset 0 without a cache), ``scale``,
  ``softcap``; rows with every key masked give 0. Not taken: past key/value, used
  present/qk outputs, ``nonpad_kv_seqlen``.
- ``com.microsoft.MultiHeadAttention``: 3-D Q, 3-D or 4-D (BNSH) K/V, ``attention_bias``,
  ``scale``, ``unidirectional`` (only where query and key lengths are provably equal). Not taken:
  packed QKV/KV, projection ``bias``, ``key_padding_mask``, past state, used extra outputs.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import onnx_ir as ir

from passes.core.attention_labels import ScoreAxes
from passes.core.attention_spec import AttentionSpec
from passes.onnx.axis_labels import Operand
from passes.onnx.graph_values import attribute, is_op, value_consumers
from passes.onnx.onnx_match import AnalysisContext, OnnxAttentionMatch, Rejected
from passes.onnx.score_operands import fill_masks
from passes.core.score_algebra import MaskStep
from passes.onnx.shape_facts import ShapeFacts
from passes.onnx.spec_fields import spec_fields

__all__ = ["detect_fused_attention"]

logger = logging.getLogger(__name__)

_CANONICAL = "bhMP"


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _require_unused_outputs(node: ir.Node, first: int) -> None:
    for output in node.outputs[first:]:
        if value_consumers(output):
            raise Rejected(f"output '{output.name}' of '{node.name}' is used")


def _operands(ctx: AnalysisContext, node: ir.Node, q_heads: int | None, kv_heads: int | None):
    """Q, K, V operands (4-D, or 3-D with packed heads) and the head counts."""
    q, k, v = node.inputs[:3]
    ranks = [ctx.facts.rank(x) for x in (q, k, v)]
    if ranks[0] == 4:
        dims_q, dims_k = ctx.facts.dims(q), ctx.facts.dims(k)
        heads, groups_src = dims_q[1], dims_k[1] if ranks[1] == 4 else kv_heads
        query = Operand(q, "bhMN", "bhMN")
    elif ranks[0] == 3 and q_heads:
        heads, groups_src = q_heads, kv_heads or q_heads
        query = Operand(q, "bMhN", "bhMN", split_heads=q_heads)
    else:
        raise Rejected(f"query of rank {ranks[0]} (packed QKV or missing head count)")
    if ranks[1] == 4 and ranks[2] == 4:
        key, value = Operand(k, "bhPN", "bhPN"), Operand(v, "bhPV", "bhPV")
        groups_src = ctx.facts.dims(k)[1]
    elif ranks[1] == 3 and ranks[2] == 3 and groups_src:
        key = Operand(k, "bPhN", "bhPN", split_heads=groups_src)
        value = Operand(v, "bPhV", "bhPV", split_heads=groups_src)
    else:
        raise Rejected(f"key/value of ranks {ranks[1]}/{ranks[2]} (packed or past-state layouts are not supported)")
    if not isinstance(heads, int) or not isinstance(groups_src, int) or heads % groups_src:
        raise Rejected(f"head counts {heads}/{groups_src} are not static multiples")
    return query, key, value, heads, groups_src


def _lengths(ctx: AnalysisContext, query: Operand, key: Operand):
    return ctx.dim_of(query, "b"), ctx.dim_of(query, "M"), ctx.dim_of(key, "P")


def _match(ctx, node, query, key, value, heads, kv_heads, scale, out_labels) -> OnnxAttentionMatch:
    match = OnnxAttentionMatch(AttentionSpec("softmax", (node.name,)), graph=node.graph, fused=node)
    match.query, match.value = query, value
    if kv_heads == heads:
        match.key, match.value = key, value
    else:
        match.key = match.value = None
    match.key_source, match.value_source = key, value
    match.num_heads, match.num_kv_heads = heads, kv_heads
    match.output, match.out_canonical = node.outputs[0], "bhMV"
    match.out_labels, match.out_merged = ("bMhV", True) if out_labels == "packed" else (out_labels, False)
    head_dim = ctx.static_dim(query, "N")
    if scale is None or scale == 0.0:
        if head_dim is None:
            raise Rejected("default scale needs a static head size")
        scale = 1.0 / math.sqrt(head_dim)
    match.scale = scale
    return match


def _scores(ctx: AnalysisContext, match: OnnxAttentionMatch, query: Operand, key: Operand, heads: int) -> ScoreAxes:
    batch, q_len, k_len = _lengths(ctx, query, key)
    match.equal_lengths = ShapeFacts.same(q_len, k_len)
    return ScoreAxes(_CANONICAL, (batch, heads, q_len, k_len), "bh", "M", "P")


def _from_onnx_attention(ctx: AnalysisContext, node: ir.Node) -> OnnxAttentionMatch:
    if any(_input(node, i) is not None for i in (4, 5, 6)):
        raise Rejected("Attention with a key/value cache or nonpad_kv_seqlen")
    _require_unused_outputs(node, 1)
    query, key, value, heads, kv_heads = _operands(ctx, node, attribute(node, "q_num_heads"),
                                                   attribute(node, "kv_num_heads"))
    out_labels = "bhMV" if not query.split_heads else "packed"
    match = _match(ctx, node, query, key, value, heads, kv_heads, attribute(node, "scale"), out_labels)
    softcap = attribute(node, "softcap", 0.0)
    if softcap < 0:
        raise Rejected(f"negative softcap {softcap}")
    match.softcap, match.zero_masked_rows = softcap, True
    mask = _input(node, 3)
    biases, masks = [], []
    if mask is not None:
        if ctx.facts.dtype(mask) == ir.DataType.BOOL:
            masks.append(MaskStep(mask, keep_when_true=True, fill=-math.inf))
        else:
            biases.append((mask, 1.0))
    fill_masks(ctx, match, _scores(ctx, match, query, key, heads), biases, masks)
    if attribute(node, "is_causal", 0):
        if match.causal:
            raise Rejected("is_causal together with a causal mask")
        match.causal, match.causal_offset = True, 0
    return match


def _from_ort_mha(ctx: AnalysisContext, node: ir.Node) -> OnnxAttentionMatch:
    for index, role in ((3, "projection bias"), (4, "key_padding_mask"), (6, "past key"), (7, "past value"),
                        (8, "past_sequence_length"), (9, "cache_indirection")):
        if _input(node, index) is not None:
            raise Rejected(f"MultiHeadAttention with a {role} is not modelled")
    if _input(node, 1) is None or _input(node, 2) is None:
        raise Rejected("MultiHeadAttention with packed QKV")
    _require_unused_outputs(node, 1)
    heads = attribute(node, "num_heads")
    query, key, value, heads, kv_heads = _operands(ctx, node, heads, heads)
    match = _match(ctx, node, query, key, value, heads, kv_heads, attribute(node, "scale"), "packed")
    bias = _input(node, 5)
    scores = _scores(ctx, match, query, key, heads)
    fill_masks(ctx, match, scores, [(bias, 1.0)] if bias is not None else [], [])
    if attribute(node, "unidirectional", 0):
        if not ShapeFacts.same(scores.dims[2], scores.dims[3]):
            raise Rejected("unidirectional MultiHeadAttention with query and key lengths not provably equal")
        if match.causal:
            raise Rejected("unidirectional together with a causal bias")
        match.causal, match.causal_offset = True, 0
    return match


def detect_fused_attention(ctx: AnalysisContext) -> list[OnnxAttentionMatch]:
    """Every Attention-23 / MultiHeadAttention node, as an accepted match or with a reason."""
    matches = []
    for node in ir.traversal.RecursiveGraphIterator(ctx.model.graph):
        if is_op(node, "Attention") and ctx.opsets.get("", 0) >= 23:
            builder = _from_onnx_attention
        elif is_op(node, "MultiHeadAttention", domain="com.microsoft"):
            builder = _from_ort_mha
        else:
            continue
        try:
            match = builder(ctx, node)
            match.nodes = [node]
            match.spec = dataclasses.replace(match.spec, **spec_fields(ctx, match))
        except Rejected as error:
            match = OnnxAttentionMatch(AttentionSpec("softmax", (node.name,), reason=str(error)), fused=node)
        except Exception as error:  # noqa: BLE001 - one unanalysable node must not stop the others
            logger.exception("analysing %s failed", node.name)
            reason = f"not analysed: {error!r}"
            match = OnnxAttentionMatch(AttentionSpec("softmax", (node.name,), reason=reason), fused=node)
        matches.append(match)
        logger.info("%s: %s", node.name, "match" if match.spec.accepted else match.spec.reason)
    return matches
