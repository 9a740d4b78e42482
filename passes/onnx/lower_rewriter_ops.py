"""Lower `ai.rewriter::Attention` nodes (from `rewriter.export`) into standard ONNX ops.

The exporter writes each `torch.ops.rewriter.attention` call as one private node::

    q, k, v, [bias], [mask] ─ ai.rewriter::Attention(scale, softcap, mask_fill, causal,
                                                     causal_offset, q_chunk, k_chunk) ─ out, row_stats

This pass replaces each with the chunked standard-op subgraph of `build_chunked_attention`
(same semantics: scale → soft-cap → +bias → keep-mask → causal; rows with every key hidden give
NaN, as the torch op does) and then drops the private domain from the opset imports. `row_stats`
is what the torch op's backward needs; an exported inference graph never reads it, and a node
whose `row_stats` is read is refused.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx_ir as ir

from rewriter.kernels.onnx_chunked_attention import build_chunked_attention

__all__ = ["CHUNKED", "ONNX_ATTENTION", "REWRITER_DOMAIN", "LowerRewriterOps", "LoweringError"]

logger = logging.getLogger(__name__)

REWRITER_DOMAIN = "ai.rewriter"
CHUNKED, ONNX_ATTENTION = "chunked", "onnx-attention"
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
    fill = float(attrs["mask_fill"])
    attn_mask = bias
    if mask is not None:
        if bias is None and fill == -math.inf:
            attn_mask = mask  # a boolean attn_mask keeps where true
        else:
            dtype = q.dtype.numpy()
            kept = bias if bias is not None else tape.op("Constant", [], {"value": ir.tensor(np.array(0, dtype))})
            filler = tape.op("Constant", [], {"value": ir.tensor(np.array(fill, dtype))})
            attn_mask = tape.op("Where", [mask, kept, filler])
    if attn_mask is not None:
        # ONNX Runtime wants the mask's query axis spelled out: broadcast it to (.., Lq, Lk).
        q_len = tape.op("Shape", [q], {"start": 2, "end": 3})
        k_len = tape.op("Shape", [k], {"start": 2, "end": 3})
        ones = tape.op("Constant", [], {"value": ir.tensor(np.array([1, 1], np.int64))})
        attn_mask = tape.op("Expand", [attn_mask, tape.op("Concat", [ones, q_len, k_len], {"axis": 0})])
    inputs = [q, k, v] + ([attn_mask] if attn_mask is not None else [])
    attributes = {"scale": float(attrs["scale"]), "is_causal": int(bool(attrs["causal"]))}
    if attrs["softcap"]:
        attributes["softcap"] = float(attrs["softcap"])
    return tape.op("Attention", inputs, attributes, name=f"rewriter_attention/{node.name}")


def _lower(graph: ir.Graph, node: ir.Node, index: int, target: str) -> None:
    q, k, v = node.inputs[:3]
    bias, mask = _operand(node, 3), _operand(node, 4)
    if len(node.outputs) > 1 and node.outputs[1].uses():
        raise LoweringError(f"{node.name}: its row_stats output is used; only the attention output can be lowered")
    attrs = _attributes(node)
    tape = ir.tape.Tape()
    if target == ONNX_ATTENTION:
        out = _onnx_attention(tape, q, k, v, bias, mask, attrs, node)
        out.dtype = q.dtype
    else:
        out = build_chunked_attention(
            tape, q, k, v, num_heads=_heads(q, "q", node), num_kv_heads=_heads(k, "k", node),
            scale=float(attrs["scale"]), bias=bias, mask=mask, softcap=float(attrs["softcap"]),
            mask_fill=float(attrs["mask_fill"]), causal=bool(attrs["causal"]),
            causal_offset=int(attrs["causal_offset"]), q_chunk=int(attrs["q_chunk"]),
            k_chunk=int(attrs["k_chunk"]), name=f"rewriter_attention_{index}")
    old = node.outputs[0]
    if old.shape is not None:
        out.shape = old.shape  # the exporter's symbolic dims ("s0", "batch") beat the kernel's own
    ir.convenience.replace_nodes_and_values(graph, node, [node], tape.nodes, [old], [out])


class LowerRewriterOps(ir.passes.InPlacePass):
    """Replace every `ai.rewriter::Attention` of the main graph with chunked standard ops, or with
    opset-23 `Attention` (target "onnx-attention"; the model must import opset 23 or newer)."""

    def __init__(self, target: str = CHUNKED):
        super().__init__()
        if target not in (CHUNKED, ONNX_ATTENTION):
            raise ValueError(f"unknown lowering target {target!r}")
        self.target = target

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.target == ONNX_ATTENTION and model.graph.opset_imports.get("", 0) < 23:
            raise LoweringError(f"opset-23 Attention needs opset 23, the model has {model.graph.opset_imports.get('')}")
        targets = [node for node in model.graph if node.domain == REWRITER_DOMAIN]
        for index, node in enumerate(targets):
            if node.op_type != "Attention":
                raise LoweringError(f"{node.name}: unknown {REWRITER_DOMAIN} op {node.op_type}")
            _lower(model.graph, node, index, self.target)
        leftovers = [node.name for node in ir.traversal.RecursiveGraphIterator(model.graph)
                     if node.domain == REWRITER_DOMAIN]
        if leftovers:
            raise LoweringError(f"{REWRITER_DOMAIN} nodes inside subgraphs are not supported: {leftovers}")
        model.opset_imports.pop(REWRITER_DOMAIN, None)
        model.graph.opset_imports.pop(REWRITER_DOMAIN, None)
        logger.info("lowered %d %s::Attention nodes to %s", len(targets), REWRITER_DOMAIN, self.target)
        return ir.passes.PassResult(model, modified=bool(targets))
