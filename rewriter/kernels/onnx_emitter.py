"""The one node-writing layer of the ONNX builders and passes.

`Emitter` appends nodes to an onnx_ir tape and names every value `<prefix>/<op>_<n>` from one
counter shared with its Loop/If bodies; `annotate` gives a value its dtype and shape while a
builder reads them (`undo_annotations` takes that back for values the model owns);
`standalone_model` wraps a builder's output into a model of its own (used by tests, benchmarks and
the memory estimate).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
import onnx_ir as ir

__all__ = ["Emitter", "standalone_model", "typed"]


class Emitter:
    """Appends nodes to one tape, naming every value from a counter shared with its subgraphs."""

    def __init__(self, tape: ir.tape.Tape, prefix: str, counter: Iterator[int] | None = None, opset: int = 18):
        self.tape = tape
        self.prefix = prefix
        self.opset = opset  # the default-domain opset the nodes must be valid in (13 or newer)
        self._counter = counter if counter is not None else itertools.count()
        self._annotated: list[tuple[ir.Value, object, object]] = []

    def name(self, tag: str) -> str:
        return f"{self.prefix}/{tag}_{next(self._counter)}"

    def __call__(self, op_type: str, *inputs: ir.Value | None, outputs: int = 1, domain: str = "", **attributes):
        name = self.name(op_type)
        values = [ir.Value(name=name if outputs == 1 else f"{name}_{i}") for i in range(outputs)]
        self.tape.op_multi_out(op_type, inputs, attributes or None, domain=domain, outputs=values, name=name)
        return values[0] if outputs == 1 else values

    def op(self, op_type: str, *inputs: ir.Value | None, domain: str = "", dtype=None, shape=None, **attributes):
        """One node with one output, that output given `dtype` and `shape` when they are known."""
        value = self(op_type, *inputs, domain=domain, **attributes)
        if dtype is not None:
            value.dtype = dtype
        if shape is not None:
            value.shape = ir.Shape(list(shape))
        return value

    def const(self, values, dtype=np.int64) -> ir.Value:
        array = np.array(values, dtype=dtype)
        return self.op("Constant", value=ir.tensor(array), dtype=ir.DataType.from_numpy(array.dtype),
                       shape=array.shape)

    def shape(self, x: ir.Value, start: int | None = None, end: int | None = None) -> ir.Value:
        """Shape(x)[start:end], with Shape's own start/end from opset 15 and a Slice before."""
        if self.opset >= 15 or (start is None and end is None):
            bounds = {name: bound for name, bound in (("start", start), ("end", end)) if bound is not None}
            return self("Shape", x, **bounds)
        stop = np.iinfo(np.int64).max if end is None else end
        return self("Slice", self("Shape", x), self.const([start or 0]), self.const([stop]))

    def reduce_max(self, x: ir.Value, axes: list[int], axes_value: ir.Value | None = None, keepdims: int = 1):
        """ReduceMax over `axes`: an axes input from opset 18 (`axes_value` when one is made already),
        the attribute before."""
        if self.opset >= 18:
            return self("ReduceMax", x, axes_value if axes_value is not None else self.const(axes), keepdims=keepdims)
        return self("ReduceMax", x, axes=axes, keepdims=keepdims)

    def lower_triangle(self, x: ir.Value, dtype: ir.DataType) -> ir.Value:
        """x (of `dtype`) with the entries above the diagonal of its last two axes set to 0: Trilu from
        opset 14, a Where over a Range comparison before."""
        if self.opset >= 14:
            return self("Trilu", x, upper=0)
        zero, one = self.const(0), self.const(1)
        rows = self("Unsqueeze", self("Range", zero, self("Squeeze", self.shape(x, -2, -1)), one), self.const([1]))
        cols = self("Range", zero, self("Squeeze", self.shape(x, -1)), one)
        return self("Where", self("LessOrEqual", cols, rows), x, self.const(0, dtype.numpy()))

    def subgraph(self) -> Emitter:
        return Emitter(ir.tape.Tape(), self.prefix, self._counter, self.opset)

    def graph(self, inputs: Sequence[ir.Value], outputs: Sequence[ir.Value], tag: str) -> ir.Graph:
        return ir.Graph(inputs, outputs, nodes=self.tape.nodes, name=self.name(tag))

    def undo_annotations(self) -> None:
        """Give the values the model owns back the dtype and shape they had before `annotate`."""
        for value, type_, shape in reversed(self._annotated):
            value.type, value.shape = type_, shape
        self._annotated.clear()

    def annotate(self, value: ir.Value, dtype, dims) -> ir.Value:
        """`value` with `dtype` and `dims` (None leaves either as it is)."""
        if value.producer() is None or not value.producer().name.startswith(self.prefix + "/"):
            self._annotated.append((value, value.type, value.shape))
        if dtype is not None:
            value.dtype = dtype
        if dims is not None:
            value.shape = ir.Shape(list(dims))
        return value


def typed(value: ir.Value, dtype: ir.DataType) -> ir.Value:
    """`value` with its dtype set (subgraph outputs need one)."""
    value.dtype = dtype
    return value


def standalone_model(inputs: Sequence[ir.Value | None], out: ir.Value, tape: ir.tape.Tape, name: str,
                     opset_imports: dict[str, int]) -> onnx.ModelProto:
    """A model whose graph is `tape`'s nodes, reading the given inputs (None skipped), returning `out`."""
    out.name = "out"
    graph = ir.Graph([x for x in inputs if x is not None], [out], nodes=tape.nodes, opset_imports=opset_imports,
                     name=name)
    return ir.to_proto(ir.Model(graph, ir_version=10))
