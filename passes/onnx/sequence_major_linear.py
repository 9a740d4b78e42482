"""Linear attention in any layout in an ONNX graph: fast-transformers' forms as torch's exporters write them.

fast-transformers (Katharopoulos et al., `LinearAttention`, `CausalLinearAttention`) works on
(N, L, H, D) tensors, φ = elu + 1 or ReLU, ε added after φ(q)·Σφ(k)::

    bidirectional
        φK, V ─ Einsum("nshd,nshm->nhmd") ─ KV ───────────────────────────────┐
        φK ─ ReduceSum(s) ─ Einsum("nlhd,nhd->nlh", φQ, ·) ─ Add ε ─ Reciprocal ─ Einsum("nlhd,nhmd,nlh->nlhm") ─ out
    causal
        φQ, φK, V ─ Transpose(0, 2, 1, 3) ─ Einsum("nhld,nhlm->nhldm") ─ CumSum(l) ─ Einsum(φQᵖ, ·) ─ Transpose ─┐
        φK ─ CumSum(l) ─ Einsum("nlhi,nlhi->nlh", φQ, ·) ─ Add ε ─ Reciprocal ─ Unsqueeze ───────────── Mul ─ out
        (or ─ Add ε ─ Unsqueeze ─ Div(num, ·): the quotient the op computes)

(also the causal product written without permutes, `einsum("nlhd,nlhdm->nlhm", φQ, einsum("nlhd,nlhm->nlhdm",
φK, V).cumsum(1))`, times Z or with Z as a third operand). The proof is `passes.core.linear_roles`, the
same one FX uses; this module says how ONNX spells einsums, views (Transpose, Unsqueeze, Identity),
ReduceSum, CumSum (inclusive, forward), `1/(x + ε)`, `x + ε`, Mul and Div. The block then goes through
`linear_block.finish_block` with the permutations that take q, k, v to (B, H, L, D) and the output
back; the canonical node gets Transposes around it. φ must be elementwise (elu + 1 or ReLU without a
projection): a projection or a FAVOR+ stabiliser over another layout is not proven here.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from passes.core.linear_roles import LinearFormError, match_linear_form
from passes.onnx.graph_values import attribute, producer_op
from passes.onnx.labelled_ops import axes_of, einsum_labels, rank_of
from passes.onnx.linear_block import OnnxLinearAttentionMatch, finish_block, key_sum_epsilon_of, reciprocal_of
from passes.onnx.onnx_match import AnalysisContext, Rejected

__all__ = ["is_product_times_normaliser", "match_sequence_major"]

logger = logging.getLogger(__name__)

_VIEWS = ("Transpose", "Unsqueeze", "Identity")


class _OnnxGraph:
    """ONNX's spelling of the ops `match_linear_form` reads (`passes.core.linear_roles.LinearGraph`)."""

    def __init__(self, ctx: AnalysisContext):
        self.ctx = ctx

    def einsum(self, value: ir.Value):
        return einsum_labels(self.ctx, producer_op(value, "Einsum"))

    def unview(self, value: ir.Value, nodes: list[ir.Node]):
        rank = rank_of(self.ctx, value)
        if rank is None:
            raise Rejected(f"the rank of '{value.name}' is unknown (shape inference gave none)")
        axes: list[int | None] = list(range(rank))
        while (node := producer_op(value, *_VIEWS)) is not None:
            if node.op_type == "Transpose":
                perm = list(attribute(node, "perm", range(rank - 1, -1, -1)))
                axes = [None if a is None else perm[a] for a in axes]
            elif node.op_type == "Unsqueeze":
                added = axes_of(self.ctx, node, rank)
                if added is None:
                    raise Rejected(f"the axes of '{node.name}' are not constant")
                axes = [None if a is None or a in added else a - sum(x < a for x in added) for a in axes]
                rank -= len(added)
            nodes.append(node)
            value = node.inputs[0]
        return value, axes

    def prefix_sum(self, value: ir.Value):
        node = producer_op(value, "CumSum")
        rank = rank_of(self.ctx, value) if node is not None else None
        axes = axes_of(self.ctx, node, rank) if rank is not None else None
        if node is None or axes is None:
            return None
        if attribute(node, "exclusive", 0) or attribute(node, "reverse", 0):
            raise Rejected(f"'{node.name}' is an exclusive or reversed prefix sum, not Σ_{{j≤n}}")
        return node.inputs[0], next(iter(axes))

    def key_sum(self, value: ir.Value):
        node = producer_op(value, "ReduceSum")
        rank = rank_of(self.ctx, node.inputs[0]) if node is not None else None
        axes = axes_of(self.ctx, node, rank) if rank is not None else None
        if node is None or axes is None or attribute(node, "keepdims", 1):
            return None
        return node.inputs[0], axes

    def reciprocal(self, value: ir.Value, nodes: list[ir.Node]):
        return self.shifted(reciprocal_of(self.ctx, value, nodes), nodes)

    def shifted(self, value: ir.Value, nodes: list[ir.Node]):
        return key_sum_epsilon_of(self.ctx, value, nodes)

    def factors(self, value: ir.Value):
        node = producer_op(value, "Mul")
        if node is None or any(self.ctx.folder.scalar(x) is not None for x in node.inputs):
            return None
        return node.inputs[0], node.inputs[1]

    def quotient(self, value: ir.Value):
        node = producer_op(value, "Div")
        if node is None or any(self.ctx.folder.scalar(x) is not None for x in node.inputs):
            return None
        return node.inputs[0], node.inputs[1]

    @staticmethod
    def node(value: ir.Value) -> ir.Node:
        return value.producer()

    @staticmethod
    def name(value: ir.Value) -> str:
        return value.name or "a value"


def match_sequence_major(ctx: AnalysisContext, anchor: ir.Node) -> OnnxLinearAttentionMatch:
    """Prove a linear-attention block in any layout at `anchor` (a three-operand Einsum, or `num * Z`);
    `Rejected` with the reason otherwise."""
    try:
        form = match_linear_form(_OnnxGraph(ctx), anchor.outputs[0])
    except LinearFormError as error:
        raise Rejected(str(error)) from error
    return finish_block(ctx, anchor, form.nodes, form.causal, form.phi_q, form.phi_k, form.value,
                        normalizer_epsilon=form.normalizer_epsilon, permutations=form.permutations)


def is_product_times_normaliser(ctx: AnalysisContext, node: ir.Node) -> bool:
    """`Mul(view(Einsum(φq, CumSum(·))), Z)` or `Div(view(Einsum(φq, CumSum(·))), D)`: the causal
    numerator times its normaliser, or over its denominator."""
    graph = _OnnxGraph(ctx)
    if graph.factors(node.outputs[0]) is not None:
        sides = node.inputs
    elif graph.quotient(node.outputs[0]) is not None:
        sides = node.inputs[:1]
    else:
        return False
    for side in sides:
        while (view := producer_op(side, *_VIEWS)) is not None:
            side = view.inputs[0]
        einsum = producer_op(side, "Einsum")
        if einsum is not None and len(einsum.inputs) == 2 and \
                any(producer_op(operand, "CumSum") is not None for operand in einsum.inputs):
            return True
    return False
