"""The small node-writing layer the ONNX kernel builders share.

`Emitter` appends nodes to an onnx_ir tape and names every value from one counter shared with its
Loop/If bodies; `standalone_model` wraps a builder's output into a model of its own (used by tests,
benchmarks and the memory estimate).
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

    def __init__(self, tape: ir.tape.Tape, prefix: str, counter: Iterator[int] | None = None):
        self.tape = tape
        self._prefix = prefix
        self._counter = counter if counter is not None else itertools.count()

    def name(self, tag: str) -> str:
        return f"{self._prefix}/{tag}_{next(self._counter)}"

    def __call__(self, op_type: str, *inputs: ir.Value | None, outputs: int = 1, **attributes):
        name = self.name(op_type)
        values = [ir.Value(name=name if outputs == 1 else f"{name}_{i}") for i in range(outputs)]
        self.tape.op_multi_out(op_type, inputs, attributes or None, outputs=values, name=name)
        return values[0] if outputs == 1 else values

    def const(self, value, dtype=np.int64) -> ir.Value:
        return self("Constant", value=ir.tensor(np.array(value, dtype=dtype)))

    def subgraph(self) -> Emitter:
        return Emitter(ir.tape.Tape(), self._prefix, self._counter)

    def graph(self, inputs: Sequence[ir.Value], outputs: Sequence[ir.Value], tag: str) -> ir.Graph:
        return ir.Graph(inputs, outputs, nodes=self.tape.nodes, name=self.name(tag))


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
