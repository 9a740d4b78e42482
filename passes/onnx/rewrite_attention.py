"""Replace each planned ONNX attention match with its target, in place.

For each plan the emitter's nodes go in right before the node that produced the replaced value
(the P·V product, or the fused node); the new result takes over the replaced value's name, type,
shape and uses (graph outputs included), and the matched nodes, with whatever only they kept
alive (mask construction, scale arithmetic, initializers such as a causal buffer), are removed.
When the block's only user is a ``Transpose`` (models move heads back behind the sequence before
merging them), that transpose's result is replaced instead, so the emitter writes that layout
directly rather than transposing twice. Nothing else in the graph changes. A plan whose emitter
refuses (`Rejected`) is skipped and records why.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir
import onnx_ir.passes

from passes.attention_spec import ChunkSizes
from passes.onnx.detect_fused_attention import ONNX_ATTENTION, ORT_MHA
from passes.onnx.emit_chunked import CHUNKED, emit_chunked
from passes.onnx.emit_fused import emit_onnx_attention, emit_ort_mha
from passes.onnx.graph_values import attribute, is_op
from passes.onnx.onnx_match import AnalysisContext, OnnxAttentionMatch, Rejected
from passes.onnx.operand_layout import NodeWriter

__all__ = ["PlannedRewrite", "RewriteOnnxAttention", "TARGETS", "remove_dead_block"]

logger = logging.getLogger(__name__)

TARGETS = (CHUNKED, ORT_MHA, ONNX_ATTENTION)


@dataclasses.dataclass
class PlannedRewrite:
    match: OnnxAttentionMatch
    target: str
    chunks: ChunkSizes | None = None
    done: bool = False
    failure: str | None = None


def _emit(w: NodeWriter, ctx: AnalysisContext, plan: PlannedRewrite) -> ir.Value:
    if plan.target == CHUNKED:
        return emit_chunked(w, ctx, plan.match, plan.chunks)
    if plan.target == ORT_MHA:
        return emit_ort_mha(w, ctx, plan.match)
    if plan.target == ONNX_ATTENTION:
        return emit_onnx_attention(w, ctx, plan.match)
    raise ValueError(f"unknown target {plan.target!r}")


def _follow_replacements(match: OnnxAttentionMatch, replaced: dict[ir.Value, ir.Value]) -> None:
    """Point the match's operands past values that earlier rewrites replaced (stacked blocks)."""
    def current(operand):
        if operand is None or operand.value not in replaced:
            return operand
        return dataclasses.replace(operand, value=replaced[operand.value])

    for field in ("query", "key", "value", "key_source", "value_source", "mask"):
        setattr(match, field, current(getattr(match, field)))
    match.biases = [(current(operand), factor) for operand, factor in match.biases]


def _absorb_output_transpose(match: OnnxAttentionMatch) -> None:
    """Replace the result of the block's only user when that user is a Transpose."""
    users = list(dict.fromkeys(match.output.consumers()))
    if match.out_merged or match.output.is_graph_output() or len(users) != 1 or not is_op(users[0], "Transpose"):
        return
    if users[0].graph is not match.output.producer().graph:
        return  # a user inside a subgraph: the block would move into it
    perm = attribute(users[0], "perm", list(range(len(match.out_labels)))[::-1])
    if sorted(perm) != list(range(len(match.out_labels))):
        return
    match.out_labels = "".join(match.out_labels[axis] for axis in perm)
    match.output = users[0].outputs[0]
    match.nodes.append(users[0])


def _is_dead(node: ir.Node) -> bool:
    return not any(output.uses() or output.is_graph_output() for output in node.outputs)


def remove_dead_block(nodes: list[ir.Node]) -> None:
    """Remove `nodes` and then every producer that only they kept alive."""
    work, initializers = list(nodes), []
    while work:
        node = work.pop()
        if node.graph is None or not _is_dead(node):
            continue
        inputs = [value for value in node.inputs if value is not None]
        node.graph.remove(node, safe=True)
        for value in inputs:
            if value.producer() is not None:
                work.append(value.producer())
            elif value.is_initializer():
                initializers.append(value)
    for value in initializers:
        graph = value.graph
        if graph is not None and not value.uses() and not value.is_graph_output() and not value.is_graph_input():
            graph.initializers.pop(value.name, None)


class RewriteOnnxAttention(onnx_ir.passes.InPlacePass):
    """Rewrites each `PlannedRewrite` in place; `plan.done` / `plan.failure` say what happened."""

    def __init__(self, ctx: AnalysisContext, plans: list[PlannedRewrite]):
        super().__init__()
        self.ctx, self.plans = ctx, plans

    def call(self, model: ir.Model) -> onnx_ir.passes.PassResult:
        replaced: dict[ir.Value, ir.Value] = {}
        for plan in self.plans:
            match = plan.match
            _follow_replacements(match, replaced)
            _absorb_output_transpose(match)
            anchor = match.output.producer()
            w = NodeWriter(ir.tape.Tape(), f"{match.output.name}/{plan.target.split('.')[-1]}")
            try:
                new = _emit(w, self.ctx, plan)
            except Rejected as error:
                plan.failure = str(error)
                logger.info("not rewriting %s: %s", match.output.name, error)
                continue
            except Exception as error:  # noqa: BLE001 - nothing was inserted yet; leave this block alone
                plan.failure = f"emitting {plan.target} failed: {error!r}"
                logger.exception("emitting %s for %s failed", plan.target, match.output.name)
                continue
            anchor.graph.insert_before(anchor, w.tape.nodes)
            if plan.target == ORT_MHA:
                model.opset_imports.setdefault("com.microsoft", 1)
            old = match.output
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
            name, old.name = old.name, f"{old.name}/replaced"
            new.name, new.type, new.shape = name, old.type, old.shape
            replaced[old] = new
            remove_dead_block(match.nodes)
            plan.done = True
            logger.info("rewrote attention at %s as %s", name, plan.target)
        return onnx_ir.passes.PassResult(model, any(plan.done for plan in self.plans))
