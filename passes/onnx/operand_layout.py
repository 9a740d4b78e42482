"""Bring matched operands into the kernels' 4-D layouts and the result back into the model's.

Operands are rearranged with views only (Reshape of packed heads, Unsqueeze, Transpose), so a
rewrite adds no copies beyond what a transpose costs::

    Q ─(Reshape heads)─(Unsqueeze)─(Transpose)─┐
    K, V, bias, mask likewise ─────────────────┼─ attention ─ (Squeeze)─(Transpose)─(merge heads)─(Cast)─ users
                                               ┘

`NodeWriter` appends the new nodes to a tape with names under one unique prefix; values that
are passed through unchanged get their dtype/shape annotated only while a kernel is built.
"""

from __future__ import annotations

import contextlib
import itertools

import numpy as np
import onnx_ir as ir

from passes.onnx.axis_labels import Operand
from passes.onnx.onnx_match import AnalysisContext, OnnxAttentionMatch

__all__ = ["NodeWriter", "arrange", "arranged_dims", "restore_layout", "repeat_heads"]


class NodeWriter:
    """Appends nodes to a tape; every node and value is named `<prefix>/<op>_<n>`."""

    def __init__(self, tape: ir.tape.Tape, prefix: str):
        self.tape, self.prefix = tape, prefix
        self._counter = itertools.count()
        self._annotated: list[tuple[ir.Value, object, object]] = []

    def op(self, op_type: str, *inputs: ir.Value | None, domain: str = "", dtype=None, shape=None, **attributes):
        name = f"{self.prefix}/{op_type}_{next(self._counter)}"
        value = ir.Value(name=name)
        self.tape.op(op_type, list(inputs), attributes or None, domain=domain, name=name, output=value)
        if dtype is not None:
            value.dtype = dtype
        if shape is not None:
            value.shape = ir.Shape(list(shape))
        return value

    def const(self, values, dtype=np.int64) -> ir.Value:
        array = np.array(values, dtype=dtype)
        return self.op("Constant", value=ir.tensor(array), dtype=ir.DataType.from_numpy(array.dtype),
                       shape=array.shape)

    @contextlib.contextmanager
    def annotated(self):
        """Annotations made with `annotate` inside the block are undone when it ends."""
        try:
            yield
        finally:
            for value, type_, shape in reversed(self._annotated):
                value.type, value.shape = type_, shape
            self._annotated.clear()

    def annotate(self, value: ir.Value, dtype, dims) -> ir.Value:
        if value.producer() is None or not value.producer().name.startswith(self.prefix + "/"):
            self._annotated.append((value, value.type, value.shape))
        if dtype is not None:
            value.dtype = dtype
        if dims is not None:
            value.shape = ir.Shape(list(dims))
        return value


def _padding_axes(canonical: str) -> list[int]:
    """Where size-1 axes go to make `canonical` (rows, cols plus 0–2 batch axes) four-dimensional."""
    return {4: [], 3: [1], 2: [0, 1]}[len(canonical)]


def arranged_dims(ctx: AnalysisContext, operand: Operand) -> list:
    """The 4-D dims `arrange` gives `operand` (None where unknown)."""
    dims = ctx.operand_dims(operand)
    if dims is None or len(dims) != len(operand.labels):
        dims = (None,) * len(operand.labels)
    by_label = dict(zip(operand.labels, dims))
    arranged = [by_label.get(label, 1) for label in operand.target]
    for axis in _padding_axes(operand.target):
        arranged.insert(axis, 1)
    return arranged


def arrange(w: NodeWriter, ctx: AnalysisContext, operand: Operand, dtype=None) -> ir.Value:
    """`operand` as a 4-D (batch, heads, rows, cols) value: absent labels become size-1 axes."""
    value, labels = operand.value, operand.labels
    if operand.split_heads:
        value = w.op("Reshape", value, w.const([0, 0, operand.split_heads, -1]))
    missing = [label for label in operand.target if label not in labels]
    if missing:
        value = w.op("Unsqueeze", value, w.const(list(range(len(labels), len(labels) + len(missing)))))
        labels += "".join(missing)
    order = [labels.index(label) for label in operand.target]
    if order != list(range(len(labels))):
        value = w.op("Transpose", value, perm=order)
    padding = _padding_axes(operand.target)
    if padding:
        value = w.op("Unsqueeze", value, w.const(padding))
    return w.annotate(value, dtype or ctx.facts.dtype(operand.value), arranged_dims(ctx, operand))


def repeat_heads(w: NodeWriter, value: ir.Value, groups: int, kv_heads: int) -> ir.Value:
    """(B, Hkv, L, D) → (B, Hkv·G, L, D), head h reading h // G (repeat-interleave)."""
    if groups == 1:
        return value
    grouped = w.op("Unsqueeze", value, w.const([2]))
    shape = w.op("Concat", w.op("Shape", value, end=2), w.const([groups]), w.op("Shape", value, start=2), axis=0)
    merged = w.op("Concat", w.op("Shape", value, end=1), w.const([kv_heads * groups]), w.op("Shape", value, start=2),
                  axis=0)
    return w.op("Reshape", w.op("Expand", grouped, shape), merged)


def restore_layout(w: NodeWriter, value: ir.Value, match: OnnxAttentionMatch, dtype, out_dtype) -> ir.Value:
    """A (B, H, rows, value-dim) result of `dtype` in the layout and dtype of the value it replaces."""
    canonical = match.out_canonical
    padding = _padding_axes(canonical)
    if padding:
        value = w.op("Squeeze", value, w.const(padding))
    order = [canonical.index(label) for label in match.out_labels]
    if order != list(range(len(order))):
        value = w.op("Transpose", value, perm=order)
    if match.out_merged:
        value = w.op("Reshape", value, w.const([0, 0, -1]))
    if out_dtype is not None and dtype is not None and out_dtype != dtype:
        value = w.op("Cast", value, to=out_dtype)
    return value
