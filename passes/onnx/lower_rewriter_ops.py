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

import onnx_ir as ir

from rewriter.kernels.onnx_chunked_attention import build_chunked_attention

__all__ = ["REWRITER_DOMAIN", "LowerRewriterOps", "LoweringError"]

logger = logging.getLogger(__name__)

REWRITER_DOMAIN = "ai.rewriter"
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


def _lower(graph: ir.Graph, node: ir.Node, index: int) -> None:
    q, k, v = node.inputs[:3]
    bias, mask = _operand(node, 3), _operand(node, 4)
    if len(node.outputs) > 1 and node.outputs[1].uses():
        raise LoweringError(f"{node.name}: its row_stats output is used; only the attention output can be lowered")
    attrs = _attributes(node)
    tape = ir.tape.Tape()
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
    """Replace every `ai.rewriter::Attention` of the main graph with chunked standard ops."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        targets = [node for node in model.graph if node.domain == REWRITER_DOMAIN]
        for index, node in enumerate(targets):
            if node.op_type != "Attention":
                raise LoweringError(f"{node.name}: unknown {REWRITER_DOMAIN} op {node.op_type}")
            _lower(model.graph, node, index)
        leftovers = [node.name for node in ir.traversal.RecursiveGraphIterator(model.graph)
                     if node.domain == REWRITER_DOMAIN]
        if leftovers:
            raise LoweringError(f"{REWRITER_DOMAIN} nodes inside subgraphs are not supported: {leftovers}")
        model.opset_imports.pop(REWRITER_DOMAIN, None)
        model.graph.opset_imports.pop(REWRITER_DOMAIN, None)
        logger.info("lowered %d %s::Attention nodes to chunked attention", len(targets), REWRITER_DOMAIN)
        return ir.passes.PassResult(model, modified=bool(targets))
