"""What an ONNX attention detector hands to the emitters: one record per candidate.

`OnnxAttentionMatch` holds the `AttentionSpec` (the IR-neutral part, shared with FX) plus the
values an emitter needs: Q, K, V (and the grouped-head sources of K and V) as labelled operands,
biases, the boolean mask, the output to replace and the matched nodes. `AnalysisContext` holds
what every detector in one model shares: shape facts, the shape-only folder and the shapes at
which masks are evaluated.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from passes.core.attention_spec import AttentionSpec
from passes.core.mask_semantics import ScoreSemantics
from passes.onnx.axis_labels import Operand
from passes.onnx.batch_views import split_dims
from passes.onnx.constant_folding import ShapeOnlyFolder
from passes.onnx.shape_facts import ShapeFacts
from rewriter.kernels.score_program import Program

__all__ = ["AnalysisContext", "OnnxAttentionMatch", "Rejected"]

# Symbol values at which shape-only masks are evaluated: all symbols equal (twice), then all distinct.
_EQUAL_SIZES = (6, 11)
_DISTINCT_START, _DISTINCT_STEP = 5, 3


class Rejected(Exception):
    """A candidate that is not taken; the text says why, in words a user can act on."""


@dataclasses.dataclass
class OnnxAttentionMatch(ScoreSemantics):
    """One candidate: its spec, the ONNX operands, and (inherited) what it does to its scores."""

    spec: AttentionSpec
    graph: ir.Graph | None = None
    output: ir.Value | None = None  # the value the rewrite replaces
    query: Operand | None = None
    key: Operand | None = None  # as the model computes it (grouped heads already repeated)
    value: Operand | None = None
    key_source: Operand | None = None  # K and V before a proven repeat-interleave of heads
    value_source: Operand | None = None
    out_canonical: str = ""  # labels of the attention result: batch…, query, value-dim
    out_labels: str = ""  # labels of `output`
    out_merged: bool = False  # `output` packs its last two labelled axes into one
    out_merged_batch: bool = False  # `output` packs its (batch, heads) axes, labelled `FINE`, into one
    num_heads: int | None = None
    num_kv_heads: int | None = None  # of key_source / value_source
    nodes: list[ir.Node] = dataclasses.field(default_factory=list)  # dead once `output` is replaced
    fused: ir.Node | None = None  # an Attention / MultiHeadAttention node already in the graph
    equal_lengths: bool = False  # query and key lengths are provably the same
    # Score programs (`rewriter.kernels.score_program`) that replace the bias / mask tensors, and
    # the values they read, in leaf-number order (`passes.onnx.program_operands`).
    bias_program: Program | None = None
    mask_program: Program | None = None
    leaves: list[ir.Value] = dataclasses.field(default_factory=list)


class AnalysisContext:
    """Shape facts, the folder, and the free-symbol assignments masks are evaluated at."""

    def __init__(self, model: ir.Model):
        self.model = model
        self.facts = ShapeFacts(model)
        self.opsets = dict(model.opset_imports)
        self.folder = ShapeOnlyFolder(self.facts, {"": self.opsets.get("", 21)})
        symbols = self.facts.free_symbols
        if not symbols:
            self.assignments: list[dict[str, int]] = [{}]
        else:
            assignments = [{s: size for s in symbols} for size in _EQUAL_SIZES]
            distinct = {s: _DISTINCT_START + _DISTINCT_STEP * i for i, s in enumerate(symbols)}
            self.assignments = assignments + ([distinct] if len(symbols) > 1 else [])

    def operand_dims(self, operand: Operand) -> tuple | None:
        """Dims of the operand's labelled axes (after splitting packed heads, or packed batch and heads)."""
        dims = self.facts.dims(operand.value)
        if dims is not None and operand.merged:
            return split_dims(operand, dims)
        if dims is None or not operand.split_heads:
            return dims
        packed = dims[-1]
        size = packed // operand.split_heads if isinstance(packed, int) else None
        return dims[:-1] + (operand.split_heads, size)

    def dim_of(self, operand: Operand, label: str):
        dims = self.operand_dims(operand)
        if dims is None or label not in operand.labels or len(dims) != len(operand.labels):
            return None
        return dims[operand.labels.index(label)]

    def static_dim(self, operand: Operand, label: str) -> int | None:
        dim = self.dim_of(operand, label)
        return dim if isinstance(dim, int) else None
