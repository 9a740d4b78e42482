"""Replace each planned Performer block of an ONNX graph with `build_linear_attention`, in place.

The whole block goes, feature maps included: φ is recomputed inside the replacement from the
block's q, k (before their feature maps), v and the projection initializer, one slice of keys at a
time, so nothing of size L × M × Dv (the causal CumSum of φ(k)·vᵀ) nor L × M is formed::

    q ─┐
    k ─┼─ build_linear_attention(q, k, v, Ω, feature_map, causal, c, ε, 0, slice) ─ users
    v ─┘

The new nodes go in right before the block's output node; the new result takes over the output's
name, type, shape and uses (graph outputs included), and the matched nodes, with whatever only they
kept alive (constants, scale arithmetic), are removed. A block whose builder refuses is skipped and
records why. Target `chunked` is the standard-op slice loop; `com.microsoft.LinearAttention`
(causal only) is ONNX Runtime's contrib op, fed φ(Q), φ(K) formed whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import numpy as np
import onnx_ir as ir
import onnx_ir.passes

from passes.onnx.linear_block import OnnxLinearAttentionMatch
from passes.onnx.lower_attention import CHUNKED
from passes.onnx.onnx_match import AnalysisContext
from passes.onnx.dead_nodes import remove_dead_block
from rewriter.kernels.onnx_linear_attention import build_linear_attention

__all__ = ["LINEAR_ORT", "PlannedLinearRewrite", "RewriteOnnxLinearAttention"]

logger = logging.getLogger(__name__)

LINEAR_ORT = "com.microsoft.LinearAttention"
_BUILDER_TARGET = {CHUNKED: "chunked", LINEAR_ORT: "ort"}


@dataclasses.dataclass
class PlannedLinearRewrite:
    match: OnnxLinearAttentionMatch
    target: str  # CHUNKED or LINEAR_ORT
    slice_size: int
    done: bool = False
    failure: str | None = None


@contextlib.contextmanager
def _typed_operands(ctx: AnalysisContext, values: list[ir.Value]):
    """Give q, k, v their inferred dtype and shape while the builder reads them, then restore them."""
    saved = [(value, value.type, value.shape) for value in values]
    try:
        for value in values:
            if value.dtype is None and ctx.facts.dtype(value) is not None:
                value.dtype = ctx.facts.dtype(value)
            if value.shape is None and ctx.facts.dims(value) is not None:
                value.shape = ir.Shape(list(ctx.facts.dims(value)))
        yield
    finally:
        for value, type_, shape in saved:
            value.type, value.shape = type_, shape


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


class RewriteOnnxLinearAttention(onnx_ir.passes.InPlacePass):
    """Rewrites each `PlannedLinearRewrite` in place; `plan.done` / `plan.failure` say what happened."""

    def __init__(self, ctx: AnalysisContext, plans: list[PlannedLinearRewrite]):
        super().__init__()
        self.ctx, self.plans = ctx, plans

    def call(self, model: ir.Model) -> onnx_ir.passes.PassResult:
        replaced: dict[ir.Value, ir.Value] = {}  # stacked blocks: a later block may read an earlier output
        for plan in self.plans:
            match = plan.match
            q, k, v = (replaced.get(x, x) for x in (match.query.source, match.key.source, match.value))
            tape, name = ir.tape.Tape(), f"{match.output.name}/linear_attention"
            try:
                with _typed_operands(self.ctx, [q, k, v]):
                    new = build_linear_attention(
                        tape, q, k, v, _projection_operand(tape, match, name), feature_map=match.query.kind,
                        causal=match.causal, data_scale=match.query.data_scale, epsilon=match.query.epsilon,
                        normalizer_epsilon=0.0, slice_size=plan.slice_size, name=name,
                        target=_BUILDER_TARGET[plan.target], key_sum_epsilon=match.key_sum_epsilon,
                        opset=self.ctx.opsets.get("", 1))
            except ValueError as error:
                plan.failure = f"the linear-attention builder refused: {error}"
                logger.info("not rewriting %s: %s", match.output.name, error)
                continue
            anchor = match.anchor
            anchor.graph.insert_before(anchor, tape.nodes)
            for initializer in tape.initializers:
                anchor.graph.register_initializer(initializer)
            old = match.output
            ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
            name, old.name = old.name, f"{old.name}/replaced"
            new.name = name
            new.type, new.shape = old.type or new.type, old.shape or new.shape  # the builder's when inference gave none
            replaced[old] = new
            remove_dead_block(match.nodes)
            plan.done = True
            logger.info("rewrote Performer attention at %s as %s (slice %d)", name, plan.target, plan.slice_size)
        if any(plan.done and plan.target == LINEAR_ORT for plan in self.plans):
            model.opset_imports.setdefault("com.microsoft", 1)
        return onnx_ir.passes.PassResult(model, any(plan.done for plan in self.plans))
