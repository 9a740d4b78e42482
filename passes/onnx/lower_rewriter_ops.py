"""The lowering pass: every ``ai.rewriter`` node (in any graph) becomes its target's ops.

Both ONNX routes reach it: `export_onnx` (the exporter writes each torch op call as one private
node) and `optimize_onnx` (the detector replaces each proven block with the same node,
`passes.onnx.canonicalize_attention`). ``ai.rewriter::Attention`` nodes are lowered by
`passes.onnx.lower_attention`, ``ai.rewriter::LinearAttention`` (Performer blocks) by
`passes.onnx.lower_linear_attention`. A node whose requested target refuses it (the reason comes
from `lower_attention.refusal`) is lowered to the chunked form, and `lowered` says why; afterwards
no private node and no private opset import remain.

A run that lowers a model and then a verification copy of it (`export_onnx`, `rewriter optimize
--verify`) enters `fallback_warnings_once`, so that each block's fallback is told once, not once per copy.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging

import onnx_ir as ir

from passes.onnx.attention_node import ATTENTION_OP, LINEAR_ATTENTION_OP, REWRITER_DOMAIN
from passes.onnx.lower_attention import CHUNKED, ONNX_ATTENTION, ORT, LoweringError, lower_attention_node
from passes.onnx.lower_linear_attention import (
    linear_attention_replacement,
    linear_fallback_reason,
    used_auxiliary_outputs,
)

__all__ = ["LowerRewriterOps", "LoweringError", "fallback_warnings_once"]

logger = logging.getLogger(__name__)

_told: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("fallbacks_told", default=None)


@contextlib.contextmanager
def fallback_warnings_once():
    """Within this context (also a decorator) each fallback warning is logged once; repeats go to DEBUG."""
    token = _told.set(set())
    try:
        yield
    finally:
        _told.reset(token)


def _warn_fallback(why: str) -> None:
    """'<node>: <reason>; lowered to chunked instead', at WARNING unless already told in this context."""
    told = _told.get()
    if told is not None and why in told:
        logger.debug("%s; lowered to %s instead (again: a verification copy)", why, CHUNKED)
        return
    if told is not None:
        told.add(why)
    logger.warning("%s; lowered to %s instead", why, CHUNKED)


def _lower(node: ir.Node, index: int, target: str, opset: int) -> tuple[str, str | None]:
    """Replace `node` by `target`, or by the chunked form when `target` cannot compute it exactly.

    Returns the form used and, on a fallback, why.
    """
    if node.op_type == LINEAR_ATTENTION_OP:
        return _lower_linear(node.graph, node, index, target, opset)
    if target != CHUNKED:
        try:
            lower_attention_node(node, target, opset)
            return target, None
        except LoweringError as error:  # a used row_stats output raises again below
            _warn_fallback(str(error))
            lower_attention_node(node, CHUNKED, opset)
            return CHUNKED, str(error)
    lower_attention_node(node, CHUNKED, opset)
    return CHUNKED, None


def _splice(graph: ir.Graph, node: ir.Node, nodes, out: ir.Value) -> None:
    """Put `nodes` in place of `node`, with `out` taking over the users of its first output."""
    old = node.outputs[0]
    if old.shape is not None:
        out.shape = old.shape  # the exporter's symbolic dims ("s0", "batch") beat the kernel's own
    ir.convenience.replace_nodes_and_values(graph, node, [node], nodes, [old], [out])


def _lower_linear(graph: ir.Graph, node: ir.Node, index: int, target: str, opset: int) -> tuple[str, str | None]:
    """A LinearAttention node with `target`, or in the sliced standard-op form when `target` cannot compute it."""
    used = used_auxiliary_outputs(node)
    if used:
        raise LoweringError(f"{node.name}: its {' and '.join(used)} output is used; only the attention output "
                            f"can be lowered")
    reason = linear_fallback_reason(node, target)
    form = CHUNKED if reason else target
    try:
        nodes, out = linear_attention_replacement(node, index, form, opset)
    except ValueError as error:
        if form == CHUNKED:
            raise LoweringError(f"{node.name}: {error}") from error
        reason, form = str(error), CHUNKED
        nodes, out = linear_attention_replacement(node, index, form, opset)
    if reason:
        _warn_fallback(f"{node.name}: {reason}")
    _splice(graph, node, nodes, out)
    return form, reason


class LowerRewriterOps(ir.passes.InPlacePass):
    """Lower every ``ai.rewriter`` node (subgraphs included) to `target` ("chunked", "ort" or
    "onnx-attention"; the model must import opset 23 for the last), or to the target `targets` names
    for that node. A node `target` refuses becomes chunked; `lowered` records (form, fallback reason)
    and `kinds` ("softmax" or "performer") per node, in graph order."""

    def __init__(self, target: str = CHUNKED, targets: dict[ir.Node, str] | None = None):
        super().__init__()
        if target not in (CHUNKED, ONNX_ATTENTION, ORT):
            raise ValueError(f"unknown lowering target {target!r}")
        self.target, self.targets = target, targets if targets is not None else {}
        self.lowered: list[tuple[str, str | None]] = []
        self.kinds: list[str] = []
        self.forms: dict[ir.Node, str] = {}  # the form each node became

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes = [node for node in ir.traversal.RecursiveGraphIterator(model.graph) if node.domain == REWRITER_DOMAIN]
        wanted = [self.targets.get(node, self.target) for node in nodes]
        if ONNX_ATTENTION in wanted and model.graph.opset_imports.get("", 0) < 23:
            raise LoweringError(f"opset-23 Attention needs opset 23, the model has {model.graph.opset_imports.get('')}")
        for index, (node, target) in enumerate(zip(nodes, wanted)):
            if node.op_type not in (ATTENTION_OP, LINEAR_ATTENTION_OP):
                raise LoweringError(f"{node.name}: unknown {REWRITER_DOMAIN} op {node.op_type}")
            self.kinds.append("performer" if node.op_type == LINEAR_ATTENTION_OP else "softmax")
            self.lowered.append(_lower(node, index, target, model.graph.opset_imports.get("", 1)))
            self.forms[node] = self.lowered[-1][0]
        leftovers = [node.name for node in ir.traversal.RecursiveGraphIterator(model.graph)
                     if node.domain == REWRITER_DOMAIN]
        if leftovers:
            raise LoweringError(f"{REWRITER_DOMAIN} nodes left after lowering: {leftovers}")
        model.opset_imports.pop(REWRITER_DOMAIN, None)
        model.graph.opset_imports.pop(REWRITER_DOMAIN, None)
        if any(form == ORT for form, _ in self.lowered):
            model.graph.opset_imports.setdefault("com.microsoft", 1)
        logger.info("lowered %d %s nodes", len(nodes), REWRITER_DOMAIN)
        return ir.passes.PassResult(model, modified=bool(nodes))
