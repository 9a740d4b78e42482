"""Spell out einsum ellipses that stand for different ranks per operand, so ONNX Runtime accepts them.

performer-pytorch writes ``einsum('...id,...jd->...ij', x, Ω)`` with x 4-D and Ω 2-D: the ellipsis
is two axes in x and none in Ω (numpy right-aligns and broadcasts them). Torch's exporters keep the
equation, but ONNX Runtime's Einsum (and ONNX shape inference) require every ellipsis to cover the
same number of axes, so such a file neither loads in ONNX Runtime nor gets shapes inferred past that
node. This pass replaces each ellipsis by explicit labels, right-aligned as numpy does::

    ...id,...jd->...ij   (x 4-D, Ω 2-D)   →   ABid,jd->ABij

The computation is unchanged. Ranks come from the shape facts, or from producers where inference
gave none (`labelled_ops.rank_of`); an einsum whose ranks stay unknown is left as it is.
"""

from __future__ import annotations

import logging
import string

import onnx
import onnx_ir as ir
import onnx_ir.passes

from passes.onnx.graph_values import attribute, is_op
from passes.onnx.labelled_ops import rank_of
from passes.onnx.onnx_match import AnalysisContext

__all__ = ["SpellOutEinsumEllipsis", "explicit_equation", "spelt_out"]

logger = logging.getLogger(__name__)


def explicit_equation(equation: str, ranks: list[int]) -> str | None:
    """`equation` with each ellipsis as explicit right-aligned labels, or None when it has no uneven one."""
    equation = equation.replace(" ", "")
    if "..." not in equation or "->" not in equation:
        return None
    inputs, out = equation.split("->")
    specs = inputs.split(",")
    if len(specs) != len(ranks):
        return None
    own = [rank - len(spec.replace("...", "")) for spec, rank in zip(specs, ranks) if "..." in spec]
    if len(set(own)) <= 1 or min(own) < 0:
        return None
    width = max(own)
    spare = "".join(c for c in string.ascii_letters if c not in equation)[:width]

    def expand(spec: str, count: int) -> str:
        return spec.replace("...", spare[width - count:]) if "..." in spec else spec

    labels = [expand(spec, rank - len(spec.replace("...", ""))) for spec, rank in zip(specs, ranks)]
    return ",".join(labels) + "->" + expand(out, width)


class SpellOutEinsumEllipsis(onnx_ir.passes.InPlacePass):
    """Rewrites uneven einsum ellipses in place (main graph and subgraphs); `count` says how many."""

    def __init__(self, ctx: AnalysisContext):
        super().__init__()
        self.ctx, self.count = ctx, 0

    def call(self, model: ir.Model) -> onnx_ir.passes.PassResult:
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if not is_op(node, "Einsum"):
                continue
            ranks = [rank_of(self.ctx, value) for value in node.inputs]
            equation = None if None in ranks else explicit_equation(attribute(node, "equation", ""), ranks)
            if equation is None:
                continue
            logger.info("einsum %s: %s -> %s", node.name, attribute(node, "equation"), equation)
            node.attributes["equation"] = ir.AttrString("equation", equation)
            self.count += 1
        return onnx_ir.passes.PassResult(model, self.count > 0)


def spelt_out(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `proto` with its uneven einsum ellipses spelt out (`proto` itself when it has none).

    What to hand ONNX Runtime or shape-based estimates when the original must run as it is, e.g. the
    "before" side of a verification or a memory comparison of an exported Performer model.
    """
    model = ir.from_proto(proto)
    if not SpellOutEinsumEllipsis(AnalysisContext(model))(model).modified:
        return proto
    return ir.to_proto(model)
