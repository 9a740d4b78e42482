"""Axis labels, ranks and reduction axes of the ops Performer blocks are written with, in ONNX.

`einsum_labels` spells an einsum's ellipsis out (``…nd,…ne->…nde`` over 4-D operands becomes
``ABnd,ABne->ABnde``), so a matcher can prove which axis is which by position. `rank_of` answers from
the shape facts and, where inference gave nothing (ONNX's and ORT's shape inference both stop at the
ellipsis einsum ``…id,…jd->…ij`` of a 4-D input against the 2-D projection, so everything after it
in a TorchScript export is unshaped), from the producer: elementwise ops broadcast to their largest
input, reductions keep or drop their axes, an einsum has its output labels. `axes_of` reads the axes
of a Reduce*, Unsqueeze or CumSum node from its input or attribute.
"""

from __future__ import annotations

import logging
import string

import onnx_ir as ir

from passes.onnx.graph_values import attribute, is_op, producer_op
from passes.onnx.onnx_match import AnalysisContext

__all__ = ["axes_of", "einsum_labels", "rank_of"]

logger = logging.getLogger(__name__)


def einsum_labels(ctx: AnalysisContext, node: ir.Node | None) -> tuple[list[ir.Value], list[str], str] | None:
    """Operands, their labels and the output labels of an Einsum node, its ellipsis spelt out."""
    if not is_op(node, "Einsum"):
        return None
    equation = attribute(node, "equation", "").replace(" ", "")
    ranks = [rank_of(ctx, value) for value in node.inputs]
    if "->" not in equation or None in ranks:
        return None
    inputs, out = equation.split("->")
    specs = inputs.split(",")
    if len(specs) != len(ranks):
        return None
    spare = [c for c in string.ascii_uppercase if c not in equation]
    batch_rank = max((rank - len(spec.replace("...", "")) for spec, rank in zip(specs, ranks) if "..." in spec),
                     default=0)
    batch = "".join(spare[:batch_rank])

    def expand(spec: str, own: int) -> str:
        return spec.replace("...", batch[batch_rank - own:]) if "..." in spec else spec

    labels = [expand(spec, rank - len(spec.replace("...", ""))) for spec, rank in zip(specs, ranks)]
    if any(len(lab) != rank or len(set(lab)) != rank for lab, rank in zip(labels, ranks)):
        return None  # a rank mismatch, or a repeated label taking a diagonal
    return list(node.inputs), labels, expand(out, batch_rank)


# MatMul: in the blocks matched here both operands are at least matrices, so the output has the larger rank.
_SAME_RANK = {"Add", "Sub", "Mul", "Div", "Pow", "Exp", "Relu", "Elu", "Reciprocal", "CumSum", "Cast", "Identity",
              "Transpose", "MatMul", "Concat", "Slice", "Split"}
_DATA_ONLY = {"CumSum", "Slice", "Split"}  # their other inputs are axes and bounds


def rank_of(ctx: AnalysisContext, value: ir.Value | None, depth: int = 0) -> int | None:
    """The rank from the shape facts or, where inference gave none (ONNX's and ORT's inference skip
    ellipsis einsums of TorchScript exports), from the producer: elementwise ops broadcast to their
    largest input, an einsum has its output labels."""
    rank = ctx.facts.rank(value)
    if rank is not None or value is None or depth > 64:
        return rank
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type in _SAME_RANK:
        ranks = [rank_of(ctx, x, depth + 1) for x in node.inputs[:1 if node.op_type in _DATA_ONLY else None]]
        return None if None in ranks else max(ranks)
    if node.op_type in ("ReduceMax", "ReduceSum", "Unsqueeze"):
        rank = rank_of(ctx, node.inputs[0], depth + 1)
        if rank is not None and node.op_type != "Unsqueeze" and attribute(node, "keepdims", 1):
            return rank
        axes = axes_of(ctx, node, rank) if rank is not None else None
        if axes is None:
            return None
        return rank + len(axes) if node.op_type == "Unsqueeze" else rank - len(axes)
    if node.op_type == "Gather":
        data, indices = (rank_of(ctx, x, depth + 1) for x in node.inputs[:2])
        return None if data is None or indices is None else data + indices - 1
    if node.op_type == "Expand":
        data, shape = rank_of(ctx, node.inputs[0], depth + 1), ctx.facts.dims(node.inputs[1])
        length = shape[0] if shape and isinstance(shape[0], int) else None
        source = producer_op(node.inputs[1], "Shape")
        if length is None and source is not None and not source.attributes:
            length = rank_of(ctx, source.inputs[0], depth + 1)  # Expand(x, Shape(y)): y's rank
        return None if data is None or length is None else max(data, length)
    if node.op_type == "Einsum":
        equation = attribute(node, "equation", "").replace(" ", "")
        ranks = [rank_of(ctx, x, depth + 1) for x in node.inputs]
        specs = equation.split("->")[0].split(",") if "->" in equation else []
        if None in ranks or len(specs) != len(ranks):
            return None
        ellipsis = max((r - len(s.replace("...", "")) for s, r in zip(specs, ranks) if "..." in s), default=0)
        out = equation.split("->")[1]
        return len(out.replace("...", "")) + ellipsis * ("..." in out)
    return None


def axes_of(ctx: AnalysisContext, node: ir.Node, rank: int, input_index: int = 1) -> set[int] | None:
    """The axes a Reduce*/Unsqueeze/CumSum node names (input or attribute), counted from 0; None: unknown.

    A reduction without axes reduces every axis (unless `noop_with_empty_axes`, then none).
    """
    if len(node.inputs) > input_index and node.inputs[input_index] is not None:
        array = ctx.folder.evaluate(node.inputs[input_index])
        if array is None:
            return None
        axes = [int(a) for a in array.reshape(-1)]
    elif "axes" in node.attributes:
        axes = list(attribute(node, "axes"))
    elif node.op_type.startswith("Reduce"):
        axes = []
    else:
        return None
    if not axes and node.op_type.startswith("Reduce") and not attribute(node, "noop_with_empty_axes", 0):
        axes = list(range(rank))  # no (or empty) axes: every axis
    return {a % rank for a in axes}
