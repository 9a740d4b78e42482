"""Lower `ai.rewriter::Attention` nodes (from `rewriter.export`) into standard ONNX ops.

The exporter writes each `torch.ops.rewriter.attention` call as one private node::

    q, k, v, [bias], [mask] ─ ai.rewriter::Attention(scale, softcap, mask_fill, causal,
                                                     causal_offset, q_chunk, k_chunk) ─ out, row_stats

This pass replaces each with the chunked standard-op subgraph of `build_chunked_attention`
(same semantics: scale → soft-cap → +bias → keep-mask → causal; rows with every key hidden give
NaN, as the torch op does), or on request with opset-23 `Attention` or ORT's
`com.microsoft.MultiHeadAttention` where they compute the same (bias and mask become one additive
mask broadcast to (.., Lq, Lk); K/V heads are repeated for MultiHeadAttention), and then drops
the private domain from the opset imports. `row_stats`
is what the torch op's backward needs; an exported inference graph never reads it, and a node
whose `row_stats` is read is refused. `ai.rewriter::LinearAttention` nodes (Performer blocks) are
lowered by `passes.onnx.lower_linear_attention`.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx_ir as ir

from passes.onnx.lower_linear_attention import (
    LINEAR_OP,
    linear_attention_replacement,
    linear_fallback_reason,
    used_auxiliary_outputs,
)
from rewriter.kernels.onnx_chunked_attention import build_chunked_attention

__all__ = ["CHUNKED", "ONNX_ATTENTION", "ORT", "REWRITER_DOMAIN", "LowerRewriterOps", "LoweringError"]

logger = logging.getLogger(__name__)

REWRITER_DOMAIN = "ai.rewriter"
CHUNKED, ONNX_ATTENTION, ORT = "chunked", "onnx-attention", "ort"
_DEFAULTS = {"scale": 1.0, "softcap": 0.0, "mask_fill": -math.inf, "causal": 0, "causal_offset": 0,
             "q_chunk": 1024, "k_chunk": 4096}


class LoweringError(ValueError):
    """An `ai.rewriter` node that cannot be lowered; the message says which and why."""


def _attributes(node: ir.Node) -> dict:
    values = dict(_DEFAULTS)
    for name, attribute in node.attributes.items():
        values[name] = attribute.value
    return values


def _heads(value: ir.Value, role: str, node: ir.Node) -> int:
    if value.shape is None or len(value.shape) != 4 or not isinstance(value.shape[1], int):
        raise LoweringError(f"{node.name}: {role} needs a 4-D shape with a static head count, got {value.shape}")
    return value.shape[1]


def _operand(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _onnx_attention(tape: ir.tape.Tape, q, k, v, bias, mask, attrs: dict, node: ir.Node) -> ir.Value:
    """Opset-23 Attention: same order (scale → soft-cap → +mask → causal); GQA native for 4-D inputs."""
    if attrs["causal"] and attrs["causal_offset"] != 0:
        raise LoweringError(f"{node.name}: opset-23 Attention has no causal offset ({attrs['causal_offset']})")
    attn_mask = _additive_mask(tape, q, k, bias, mask, float(attrs["mask_fill"]), keep_bool=True)
    inputs = [q, k, v] + ([attn_mask] if attn_mask is not None else [])
    attributes = {"scale": float(attrs["scale"]), "is_causal": int(bool(attrs["causal"]))}
    if attrs["softcap"]:
        attributes["softcap"] = float(attrs["softcap"])
    return tape.op("Attention", inputs, attributes, name=f"rewriter_attention/{node.name}")


def _const(tape: ir.tape.Tape, value, dtype=np.int64) -> ir.Value:
    return tape.op("Constant", [], {"value": ir.tensor(np.array(value, dtype))})


def _additive_mask(tape: ir.tape.Tape, q, k, bias, mask, fill: float, keep_bool: bool) -> ir.Value | None:
    """bias and mask as one attention mask broadcast to (.., Lq, Lk) (ORT wants the query axis spelled out)."""
    attn_mask = bias
    if mask is not None:
        if bias is None and fill == -math.inf and keep_bool:
            attn_mask = mask  # a boolean attn_mask keeps where true
        else:
            dtype = q.dtype.numpy()
            kept = bias if bias is not None else _const(tape, 0, dtype)
            attn_mask = tape.op("Where", [mask, kept, _const(tape, fill, dtype)])
    if attn_mask is None:
        return None
    q_len = tape.op("Shape", [q], {"start": 2, "end": 3})
    k_len = tape.op("Shape", [k], {"start": 2, "end": 3})
    return tape.op("Expand", [attn_mask, tape.op("Concat", [_const(tape, [1, 1]), q_len, k_len], {"axis": 0})])


def _ort_mha(tape: ir.tape.Tape, q, k, v, bias, mask, attrs: dict, node: ir.Node) -> ir.Value:
    """com.microsoft.MultiHeadAttention on (B, L, H·D) views; K/V heads repeated for grouped queries."""
    heads, kv_heads = _heads(q, "q", node), _heads(k, "k", node)
    if attrs["softcap"]:
        raise LoweringError(f"{node.name}: MultiHeadAttention has no soft-cap")
    if attrs["causal"] and (attrs["causal_offset"] != 0 or q.shape is None or k.shape is None
                            or q.shape[2] != k.shape[2]):
        raise LoweringError(f"{node.name}: MultiHeadAttention is causal only for equal query and key lengths")
    dv = v.shape[3] if v.shape is not None else None
    if not isinstance(dv, int):
        raise LoweringError(f"{node.name}: MultiHeadAttention needs a static value head size")
    attn_bias = _additive_mask(tape, q, k, bias, mask, float(attrs["mask_fill"]), keep_bool=False)

    def packed(x: ir.Value, source_heads: int) -> ir.Value:
        if source_heads != heads:
            groups = heads // source_heads
            x = tape.op("Unsqueeze", [x, _const(tape, [2])])
            shape = tape.op("Shape", [x])
            target = tape.op("Concat", [tape.op("Slice", [shape, _const(tape, [0]), _const(tape, [2])]),
                                        _const(tape, [groups]),
                                        tape.op("Slice", [shape, _const(tape, [3]), _const(tape, [5])])], {"axis": 0})
            merged = tape.op("Concat", [tape.op("Slice", [shape, _const(tape, [0]), _const(tape, [1])]),
                                        _const(tape, [heads]),
                                        tape.op("Slice", [shape, _const(tape, [3]), _const(tape, [5])])], {"axis": 0})
            x = tape.op("Reshape", [tape.op("Expand", [x, target]), merged])
        x = tape.op("Transpose", [x], {"perm": [0, 2, 1, 3]})
        return tape.op("Reshape", [x, _const(tape, [0, 0, -1])])

    inputs = [packed(q, heads), packed(k, kv_heads), packed(v, kv_heads), None, None]
    inputs.append(attn_bias)
    out = tape.op("MultiHeadAttention", inputs, {"num_heads": heads, "scale": float(attrs["scale"]),
                                                 "unidirectional": int(bool(attrs["causal"]))},
                  domain="com.microsoft", name=f"rewriter_attention/{node.name}")
    out = tape.op("Reshape", [out, _const(tape, [0, 0, heads, dv])])
    return tape.op("Transpose", [out], {"perm": [0, 2, 1, 3]})


def _lower(graph: ir.Graph, node: ir.Node, index: int, target: str) -> tuple[str, str | None]:
    """Replace `node` by `target`, or by the chunked form when `target` cannot compute it exactly.

    Returns the form used and, on a fallback, why.
    """
    if node.op_type == LINEAR_OP:
        return _lower_linear(graph, node, index, target)
    if len(node.outputs) > 1 and node.outputs[1].uses():
        raise LoweringError(f"{node.name}: its row_stats output is used; only the attention output can be lowered")
    if target != CHUNKED:
        try:
            _replace(graph, node, index, target)
            return target, None
        except LoweringError as error:
            logger.warning("%s; lowered to %s instead", error, CHUNKED)
            _replace(graph, node, index, CHUNKED)
            return CHUNKED, str(error)
    _replace(graph, node, index, CHUNKED)
    return CHUNKED, None


def _replace(graph: ir.Graph, node: ir.Node, index: int, target: str) -> None:
    q, k, v = node.inputs[:3]
    bias, mask = _operand(node, 3), _operand(node, 4)
    attrs = _attributes(node)
    tape = ir.tape.Tape()
    if target == ONNX_ATTENTION:
        out = _onnx_attention(tape, q, k, v, bias, mask, attrs, node)
        out.dtype = q.dtype
    elif target == ORT:
        out = _ort_mha(tape, q, k, v, bias, mask, attrs, node)
        out.dtype = q.dtype
    else:
        out = build_chunked_attention(
            tape, q, k, v, num_heads=_heads(q, "q", node), num_kv_heads=_heads(k, "k", node),
            scale=float(attrs["scale"]), bias=bias, mask=mask, softcap=float(attrs["softcap"]),
            mask_fill=float(attrs["mask_fill"]), causal=bool(attrs["causal"]),
            causal_offset=int(attrs["causal_offset"]), q_chunk=int(attrs["q_chunk"]),
            k_chunk=int(attrs["k_chunk"]), name=f"rewriter_attention_{index}")
    _splice(graph, node, tape.nodes, out)


def _splice(graph: ir.Graph, node: ir.Node, nodes, out: ir.Value) -> None:
    """Put `nodes` in place of `node`, with `out` taking over the users of its first output."""
    old = node.outputs[0]
    if old.shape is not None:
        out.shape = old.shape  # the exporter's symbolic dims ("s0", "batch") beat the kernel's own
    ir.convenience.replace_nodes_and_values(graph, node, [node], nodes, [old], [out])


def _lower_linear(graph: ir.Graph, node: ir.Node, index: int, target: str) -> tuple[str, str | None]:
    """A LinearAttention node with `target`, or in the sliced standard-op form when `target` cannot compute it."""
    used = used_auxiliary_outputs(node)
    if used:
        raise LoweringError(f"{node.name}: its {' and '.join(used)} output is used; only the attention output "
                            f"can be lowered")
    reason = linear_fallback_reason(node, target)
    form = CHUNKED if reason else target
    try:
        nodes, out = linear_attention_replacement(node, index, form)
    except ValueError as error:
        if form == CHUNKED:
            raise LoweringError(f"{node.name}: {error}") from error
        reason, form = str(error), CHUNKED
        nodes, out = linear_attention_replacement(node, index, form)
    if reason:
        logger.warning("%s: %s; lowered to %s instead", node.name, reason, CHUNKED)
    _splice(graph, node, nodes, out)
    return form, reason


class LowerRewriterOps(ir.passes.InPlacePass):
    """Replace every `ai.rewriter::Attention` of the main graph with chunked standard ops, with
    opset-23 `Attention` ("onnx-attention"; the model must import opset 23 or newer) or with
    `com.microsoft.MultiHeadAttention` ("ort"); a node the chosen op cannot compute exactly
    (soft-cap, causal offset, ...) becomes chunked, and `lowered` says so. `ai.rewriter::LinearAttention`
    becomes sliced standard ops, or `com.microsoft.LinearAttention` for a causal node with "ort"."""

    def __init__(self, target: str = CHUNKED):
        super().__init__()
        if target not in (CHUNKED, ONNX_ATTENTION, ORT):
            raise ValueError(f"unknown lowering target {target!r}")
        self.target = target
        self.lowered: list[tuple[str, str | None]] = []  # per node, in graph order: (form, fallback reason)
        self.kinds: list[str] = []  # per node, in the same order: "softmax" or "performer"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.target == ONNX_ATTENTION and model.graph.opset_imports.get("", 0) < 23:
            raise LoweringError(f"opset-23 Attention needs opset 23, the model has {model.graph.opset_imports.get('')}")
        targets = [node for node in model.graph if node.domain == REWRITER_DOMAIN]
        for index, node in enumerate(targets):
            if node.op_type not in ("Attention", LINEAR_OP):
                raise LoweringError(f"{node.name}: unknown {REWRITER_DOMAIN} op {node.op_type}")
            self.kinds.append("performer" if node.op_type == LINEAR_OP else "softmax")
            self.lowered.append(_lower(model.graph, node, index, self.target))
        leftovers = [node.name for node in ir.traversal.RecursiveGraphIterator(model.graph)
                     if node.domain == REWRITER_DOMAIN]
        if leftovers:
            raise LoweringError(f"{REWRITER_DOMAIN} nodes inside subgraphs are not supported: {leftovers}")
        model.opset_imports.pop(REWRITER_DOMAIN, None)
        model.graph.opset_imports.pop(REWRITER_DOMAIN, None)
        if any(form == ORT for form, _ in self.lowered):
            model.graph.opset_imports.setdefault("com.microsoft", 1)
        logger.info("lowered %d %s nodes to %s", len(targets), REWRITER_DOMAIN, self.target)
        return ir.passes.PassResult(model, modified=bool(targets))
