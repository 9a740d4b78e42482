"""Lower one `ai.rewriter::LinearAttention` node (from `rewriter.export`) into standard ONNX ops.

The exporter writes each `torch.ops.rewriter.linear_attention` call as one private node::

    q, k, v, [projection] ─ ai.rewriter::LinearAttention(feature_map, causal, data_scale, epsilon,
                                                         normalizer_epsilon, stabilizer_grad,
                                                         slice_size, key_sum_epsilon) ─ out, state, key_max

and `LowerRewriterOps` hands it here: it becomes `build_linear_attention`'s sliced subgraph
(Loops carrying only the (M, Dv + 1) state), or for target "ort" on a causal node
`com.microsoft.LinearAttention`. `state` and `key_max` exist for the torch op's backward; an
inference graph never reads them, and a node whose `state` or `key_max` is read is refused.
`stabilizer_grad` only changes gradients, so the forward ignores it.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from rewriter.kernels.onnx_linear_attention import build_linear_attention

__all__ = ["linear_fallback_reason", "linear_attention_replacement", "used_auxiliary_outputs"]

logger = logging.getLogger(__name__)

_DEFAULTS = {"feature_map": "favor_softmax", "causal": 0, "data_scale": 1.0, "epsilon": 0.0,
             "normalizer_epsilon": 0.0, "stabilizer_grad": 0, "slice_size": 256, "key_sum_epsilon": 0.0}
_AUXILIARY = ("state", "key_max")


def _attributes(node: ir.Node) -> dict:
    values = dict(_DEFAULTS)
    for name, attribute in node.attributes.items():
        values[name] = attribute.value
    return values


def used_auxiliary_outputs(node: ir.Node) -> list[str]:
    """Names of the node's `state` / `key_max` outputs that something reads (or the graph returns)."""
    return [label for label, value in zip(_AUXILIARY, node.outputs[1:])
            if value.uses() or value.is_graph_output()]


def linear_fallback_reason(node: ir.Node, target: str) -> str | None:
    """Why `target` cannot compute this node (it then becomes the sliced standard-op form), or None."""
    if target == "chunked":
        return None
    if target == "ort":
        return None if _attributes(node)["causal"] else "com.microsoft.LinearAttention is causal only"
    return f"target {target!r} has no linear-attention op"


def linear_attention_replacement(node: ir.Node, index: int, target: str, opset: int) -> tuple[list[ir.Node], ir.Value]:
    """The nodes that compute the node's `out` with `target` ("chunked" or "ort"), valid in default-domain
    `opset` (13 or newer), and that value.

    Raises ValueError when the target cannot compute it (say, "ort" without static head counts).
    """
    attrs = _attributes(node)
    q, k, v = node.inputs[:3]
    projection = node.inputs[3] if len(node.inputs) > 3 else None
    tape = ir.tape.Tape()
    out = build_linear_attention(
        tape, q, k, v, projection, feature_map=str(attrs["feature_map"]), causal=bool(attrs["causal"]),
        data_scale=float(attrs["data_scale"]), epsilon=float(attrs["epsilon"]),
        normalizer_epsilon=float(attrs["normalizer_epsilon"]), slice_size=int(attrs["slice_size"]),
        key_sum_epsilon=float(attrs["key_sum_epsilon"]),
        name=f"rewriter_linear_attention_{index}", target=target, opset=opset)
    logger.debug("%s: %s linear attention (%s) as %s", node.name, "causal" if attrs["causal"] else "bidirectional",
                 attrs["feature_map"], target)
    return list(tape.nodes), out
