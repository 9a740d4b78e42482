"""Replace each planned Performer block of an ONNX graph with one canonical ``ai.rewriter::LinearAttention``.

The node is the one `export_onnx` gets from ``torch.ops.rewriter.linear_attention``, so files and
exports share one lowering (`passes.onnx.lower_linear_attention`, run by `LowerRewriterOps`). The
whole block goes, feature maps included: the lowering recomputes φ inside its Loop from the block's
q, k (before their feature maps), v and the projection, one slice of keys at a time, so nothing of
size L × M × Dv (the causal CumSum of φ(k)·vᵀ) nor L × M is formed::

    q ─┐
    k ─┼─ ai.rewriter::LinearAttention(feature_map, causal, data_scale, epsilon, key_sum_epsilon, slice_size)
    v ─┤      ─ users
    Ω ─┘

The node goes in right before the block's output node; its result takes over the output's name,
type, shape and uses (graph outputs included), and the matched nodes, with whatever only they kept
alive (constants, scale arithmetic), are removed. Target `chunked` is the standard-op slice loop;
`com.microsoft.LinearAttention` (causal only) is ONNX Runtime's contrib op, fed φ(Q), φ(K) formed whole.
A block written in another layout (fast-transformers' (N, L, H, D)) gets Transposes of q, k, v to
(B, H, L, D) before the node and of its result back after it.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes

from passes.core.planner import CHUNKED, ORT
from passes.onnx.attention_node import LINEAR_ATTENTION_OP, REWRITER_DOMAIN
from passes.onnx.dead_nodes import remove_dead_block
from passes.onnx.linear_block import OnnxLinearAttentionMatch
from passes.onnx.onnx_match import AnalysisContext
from rewriter.kernels.onnx_emitter import Emitter

__all__ = ["LINEAR_ORT", "LINEAR_TARGET_OPS", "CanonicalizeLinearAttention", "PlannedLinearRewrite"]

logger = logging.getLogger(__name__)

LINEAR_ORT = "com.microsoft.LinearAttention"
LINEAR_TARGET_OPS = {CHUNKED: CHUNKED, ORT: LINEAR_ORT}  # lowering target → what the report names
_LOWERING_TARGET = {name: target for target, name in LINEAR_TARGET_OPS.items()}


@dataclasses.dataclass
class PlannedLinearRewrite:
    match: OnnxLinearAttentionMatch
    target: str  # CHUNKED or LINEAR_ORT
    slice_size: int
    done: bool = False
    failure: str | None = None
    node: ir.Node | None = None  # its canonical node, once made


def _projection_operand(tape: ir.tape.Tape, match: OnnxLinearAttentionMatch, name: str) -> ir.Value | None:
    """The (M, D) projection: the constant itself, or its first (M, D) slice when it was broadcast."""
    projection = match.query.projection
    if projection is None or len(projection.shape or ()) == 2:
        return projection
    matrix = match.query.projection_matrix()
    shape = tape.initializer(ir.tensor(np.array((-1,) + matrix.shape, np.int64)), name=f"{name}/projection_shape")
    first = tape.initializer(ir.tensor(np.array(0, np.int64)), name=f"{name}/projection_first")
    flat = tape.op("Reshape", [projection, shape])
    out = tape.op("Gather", [flat, first], attributes={"axis": 0})
    out.dtype, out.shape = projection.dtype, ir.Shape(list(matrix.shape))
    return out


def _transposed(w: Emitter, value: ir.Value, perm: tuple[int, ...] | None) -> ir.Value:
    """`value` with its axes permuted by `perm` (dtype and dims carried over); itself for None or the identity."""
    if perm is None or list(perm) == sorted(perm):
        return value
    dims = list(value.shape) if value.shape is not None else None
    return w.op("Transpose", value, perm=list(perm), dtype=value.dtype,
                shape=None if dims is None else [dims[axis] for axis in perm])


class CanonicalizeLinearAttention(onnx_ir.passes.InPlacePass):
    """Replaces each `PlannedLinearRewrite` with its canonical node and records in `targets` the target
    each new node is lowered to (by `LowerRewriterOps`); `writers` hold the dtype/shape annotations of
    the model's values that the lowering reads (undone by `UndoAnnotations`)."""

    def __init__(self, ctx: AnalysisContext, plans: list[PlannedLinearRewrite]):
        super().__init__()
        self.ctx, self.plans = ctx, plans
        self.targets: dict[ir.Node, str] = {}
        self.writers: list[Emitter] = []

    def call(self, model: ir.Model) -> onnx_ir.passes.PassResult:
        replaced: dict[ir.Value, ir.Value] = {}  # stacked blocks: a later block may read an earlier output
        for plan in self.plans:
            match = plan.match
            q, k, v = (replaced.get(x, x) for x in (match.query.source, match.key.source, match.value))
            name = f"{match.output.name}/linear_attention"
            w = Emitter(ir.tape.Tape(), name, opset=self.ctx.opsets.get("", 1))
            self.writers.append(w)
            for value in (q, k, v):  # the lowering reads their dtype and static head counts
                w.annotate(value, value.dtype or self.ctx.facts.dtype(value),
                           None if value.shape is not None else self.ctx.facts.dims(value))
            q_perm, k_perm, v_perm, out_perm = match.permutations or (None,) * 4
            q, k, v = (_transposed(w, x, perm) for x, perm in ((q, q_perm), (k, k_perm), (v, v_perm)))
            attributes = {"feature_map": match.query.kind, "causal": int(match.causal),
                          "data_scale": float(match.query.data_scale), "epsilon": float(match.query.epsilon),
                          "normalizer_epsilon": float(match.normalizer_epsilon), "stabilizer_grad": 0,
                          "slice_size": int(plan.slice_size), "key_sum_epsilon": float(match.key_sum_epsilon)}
            node_out = w.op(LINEAR_ATTENTION_OP, q, k, v, _projection_operand(w.tape, match, name),
                            domain=REWRITER_DOMAIN, dtype=q.dtype, **attributes)
            node_out = _transposed(w, node_out, out_perm)
            anchor = match.anchor
            anchor.graph.insert_before(anchor, w.tape.nodes)
            for initializer in w.tape.initializers:
                anchor.graph.register_initializer(initializer)
            old = match.output
            ir.convenience.replace_all_uses_with(old, node_out, replace_graph_outputs=True)
            name, old.name = old.name, f"{old.name}/replaced"
            node_out.name = name
            node_out.type, node_out.shape = old.type or node_out.type, old.shape
            replaced[old] = node_out
            remove_dead_block(match.nodes)
            plan.node = node_out.producer()
            self.targets[plan.node] = _LOWERING_TARGET[plan.target]
            plan.done = True
            logger.info("Performer attention at %s becomes %s (slice %d)", name, plan.target, plan.slice_size)
        return onnx_ir.passes.PassResult(model, bool(self.targets))
