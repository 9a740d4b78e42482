"""Recover a mask or bias operand of an ONNX attention block as a score program (never n×n).

`ProgramTranslator.translate(value, positions)` writes into a `ProgramBuilder` the steps that give
`value` at the given position of each of its axes (program steps, or -1 for position 0 of a
size-1 axis), following producers back: index propagation, the same design as the FX side.
Broadcasting ops pass positions to their inputs (size-1 axes read position 0); views move them
(``Unsqueeze``/``Squeeze``, ``Reshape`` that only adds or removes size-1 axes, ``Transpose``,
``Slice`` with constant starts and steps); ``Range`` and constant aranges become arithmetic on the
position; lookups (``Gather``, ``GatherElements``, ``GatherND``: `program_lookups`) turn an index
tensor into the position of the table they read; ``Trilu`` compares its last two positions::

    am (B, L) ─Cast→ GatherND[batch_arange, kv_arange] ─And─ LessOrEqual(kv, q) ─Where(0, −inf)→ bias
      ⇒ where(cast(load(am, [batch, key])) ∧ (key ≤ query), 0, −inf)

A symbolic size is taken as never 1 unless it is one of shape inference's ``unk__`` placeholders
(exporters name sizes that torch.export proved ≥ 2), so its axis is read at the output's position.

Leaves are graph inputs and initializers (any size; they exist already) and computed values that
do not vary along both a query-reading and a key-reading axis; anything else raises
`ProgramError` and the operand stays a dense tensor (still exact). Nothing is evaluated.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from passes.core.program_folding import compare_branches, negation, where
from passes.core.score_programs import ProgramBuilder, ProgramError
from passes.onnx.graph_values import attribute, const_array
from passes.onnx.program_lookups import LookupTranslations
from passes.onnx.shape_facts import ShapeFacts
from rewriter.kernels.onnx_score_program import program_type

__all__ = ["ProgramTranslator"]

logger = logging.getLogger(__name__)

_ELEMENTWISE = {
    "Add": "add", "Sub": "sub", "Mul": "mul", "Neg": "neg", "Abs": "abs", "Log": "log", "Exp": "exp",
    "Floor": "floor", "Ceil": "ceil", "Min": "minimum", "Max": "maximum", "Equal": "eq", "Less": "lt",
    "LessOrEqual": "le", "Greater": "gt", "GreaterOrEqual": "ge", "And": "logical_and", "Or": "logical_or",
    "Xor": "logical_xor", "Not": "logical_not", "Where": "where", "Div": "div", "Mod": "remainder",
}
_FLOATS = ("float32", "float16", "bfloat16", "float64")
_COMPARISONS = ("eq", "lt", "le", "gt", "ge")


class ProgramTranslator(LookupTranslations):
    """Translates values of one graph into steps of `builder`; results are shared per (value, positions)."""

    def __init__(self, facts: ShapeFacts, builder: ProgramBuilder, graph: ir.Graph):
        self.facts, self.builder, self.graph = facts, builder, graph
        self._done: dict[tuple[ir.Value, tuple[int, ...]], int] = {}
        self._reads: dict[int, frozenset[str]] = {}

    def translate(self, value: ir.Value, positions: list[int]) -> int:
        """The step giving `value` at `positions` (one per axis). Raises ProgramError."""
        key = (value, tuple(positions))
        if key not in self._done:
            self._done[key] = self._translate(value, list(positions))
        return self._done[key]

    # -- helpers ---------------------------------------------------------------------------------
    def _dtype(self, value: ir.Value) -> str:
        name = program_type(self.facts.dtype(value))
        if name is None:
            raise ProgramError(f"'{value.name}' has a type score programs do not take ({self.facts.dtype(value)})")
        return name

    def _dims(self, value: ir.Value) -> tuple:
        dims = self.facts.dims(value)
        if dims is None or any(dim is None for dim in dims):
            raise ProgramError(f"the shape of '{value.name}' is unknown")
        return dims

    def _position(self, entry: int) -> int:
        return entry if entry >= 0 else self.builder.const(0, "int64")

    def _affine(self, position: int, step, start, dtype: str = "int64") -> int:
        """start + step · position for numbers `step` and `start` (× 1 and + 0 left out)."""
        if step != 1:
            position = self.builder.add("mul", (position, self.builder.const(step, dtype)), dtype=dtype)
        if start != 0:
            position = self.builder.add("add", (self.builder.const(start, dtype), position), dtype=dtype)
        return position

    def _constant(self, value: ir.Value | None):
        array = const_array(value)
        if array is None:
            raise ProgramError(f"'{getattr(value, 'name', None)}' is not a constant")
        return array

    def _optional(self, node: ir.Node, index: int, default: list) -> list:
        """The constant input `index` of `node` as a list, `default` when it is absent."""
        value = node.inputs[index] if len(node.inputs) > index else None
        return default if value is None else self._constant(value).reshape(-1).tolist()

    def reads(self, step: int) -> frozenset[str]:
        """The index axes a step depends on."""
        if step < 0:
            return frozenset()
        if step not in self._reads:
            s = self.builder.steps[step]
            found = {s.attr} if s.op == "index" else set()
            self._reads[step] = frozenset(found.union(*(self.reads(arg) for arg in s.args)))
        return self._reads[step]

    def _broadcast(self, x: ir.Value, positions: list[int]) -> list[int]:
        """Positions in `x` of an output position of a broadcasting op (size-1 axes read 0)."""
        dims = self._dims(x)
        lead = len(positions) - len(dims)
        if lead < 0:
            raise ProgramError(f"'{x.name}' has more axes than its broadcast result")
        for dim in dims:
            if isinstance(dim, str) and dim.startswith("unk__"):
                # Shape inference's placeholder: the axis may be 1 and broadcast, or not.
                raise ProgramError(f"the shape of '{x.name}' is not known well enough to broadcast it")
        return [-1 if dim == 1 else positions[lead + axis] for axis, dim in enumerate(dims)]

    def spans_both(self, positions: list[int]) -> bool:
        """Whether one axis is read at a query-dependent position and another at a key-dependent one."""
        query = [axis for axis, p in enumerate(positions) if "query" in self.reads(p)]
        key = [axis for axis, p in enumerate(positions) if "key" in self.reads(p)]
        return any(a != b for a in query for b in key)

    def _leaf(self, value: ir.Value, positions: list[int]) -> int:
        computed = value.producer() is not None and const_array(value) is None
        if computed and (value.graph is not self.graph or self.spans_both(positions)):
            raise ProgramError(f"'{value.name}' ({value.producer().op_type}) varies along both sequence axes")
        return self.builder.load(value, positions, self._dtype(value))

    # -- the ops -----------------------------------------------------------------------------------
    def _translate(self, value: ir.Value, positions: list[int]) -> int:
        array = const_array(value)
        if array is not None:
            return self._from_constant(value, array, positions)
        node = value.producer()
        if node is None:
            return self._leaf(value, positions)
        if node.domain not in ("", "ai.onnx"):
            raise ProgramError(f"'{value.name}' comes from {node.domain}::{node.op_type}")
        handler = getattr(self, f"_op_{node.op_type}", None)
        try:
            if handler is not None:
                return handler(node, value, positions)
            if node.op_type in _ELEMENTWISE:
                return self._elementwise(node, value, positions)
        except ProgramError:
            if node.op_type in ("Gather", "GatherND", "GatherElements") or len(positions) == 0:
                raise
            return self._leaf(value, positions)  # an O(n) value the vocabulary does not spell
        return self._leaf(value, positions)

    def _from_constant(self, value: ir.Value, array: np.ndarray, positions: list[int]) -> int:
        dtype = self._dtype(value)
        if array.size == 1:
            return self.builder.const(array.reshape(()).item(), dtype)
        wide = [axis for axis, size in enumerate(array.shape) if size != 1]
        if len(wide) == 1 and dtype == "int64" and positions[wide[0]] >= 0:
            line = array.reshape(-1)
            start, step = int(line[0]), int(line[1] - line[0])
            if np.array_equal(line, start + step * np.arange(line.size)):
                return self._affine(positions[wide[0]], step, start)
        return self._leaf(value, positions)

    def _elementwise(self, node: ir.Node, value: ir.Value, positions: list[int]) -> int:
        op, dtype = _ELEMENTWISE[node.op_type], self._dtype(value)
        args = [self.translate(x, self._broadcast(x, positions)) for x in node.inputs]
        if node.op_type == "Mod" and (attribute(node, "fmod", 0) or dtype in _FLOATS):
            raise ProgramError("Mod with fmod=1 is not in the program vocabulary")
        if node.op_type == "Div" and dtype not in _FLOATS:  # ONNX truncates integer division
            wide = [self.builder.add("cast", (arg,), dtype="float64") for arg in args]
            return self.builder.add("cast", (self.builder.add("div", tuple(wide), dtype="float64"),), dtype=dtype)
        if op == "where":
            return where(self.builder, *args, dtype)
        if op == "logical_not":
            return negation(self.builder, args[0])
        if op in _COMPARISONS:
            folded = compare_branches(self.builder, op, *args)
            if folded is not None:
                return folded
        result = args[0]
        if op in ("minimum", "maximum") and len(args) > 2:
            for arg in args[1:]:
                result = self.builder.add(op, (result, arg), dtype=dtype)
            return result
        return self.builder.add(op, tuple(args), dtype=dtype)

    def _op_Identity(self, node, value, positions):
        return self.translate(node.inputs[0], positions)

    def _op_Cast(self, node, value, positions):
        inner, dtype = self.translate(node.inputs[0], positions), self._dtype(value)
        if dtype == "bool":  # cast(where(c, 1, 0), bool) is c: what the causal proofs read
            step = self.builder.steps[inner]
            if step.op == "const":
                return self.builder.const(bool(step.attr), "bool")
            if step.op == "where":
                return where(self.builder, *step.args, "bool", cast=True)
        return self.builder.add("cast", (inner,), dtype=dtype)

    def _op_Expand(self, node, value, positions):
        return self.translate(node.inputs[0], self._broadcast(node.inputs[0], positions))

    def _axes(self, node: ir.Node, rank: int) -> list[int]:
        axes = attribute(node, "axes", None)
        if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            axes = self._constant(node.inputs[1]).reshape(-1).tolist()
        return None if axes is None else sorted(int(a) % rank for a in axes)

    def _op_Unsqueeze(self, node, value, positions):
        axes = self._axes(node, len(positions))
        return self.translate(node.inputs[0], [p for axis, p in enumerate(positions) if axis not in axes])

    def _op_Squeeze(self, node, value, positions):
        dims = self._dims(node.inputs[0])
        axes = self._axes(node, len(dims)) or [axis for axis, dim in enumerate(dims) if dim == 1]
        inner = list(positions)
        for axis in axes:
            inner.insert(axis, -1)
        return self.translate(node.inputs[0], inner)

    def _op_Reshape(self, node, value, positions):
        """Only a reshape that adds or removes size-1 axes: the other axes keep their order and sizes."""
        inner_dims, outer_dims = self._dims(node.inputs[0]), self._dims(value)
        inner = [axis for axis, dim in enumerate(inner_dims) if dim != 1]
        outer = [axis for axis, dim in enumerate(outer_dims) if dim != 1]
        if len(inner) != len(outer) or not all(ShapeFacts.same(inner_dims[a], outer_dims[b])
                                               for a, b in zip(inner, outer)):
            raise ProgramError(f"Reshape '{value.name}' does more than add or remove size-1 axes")
        moved = [-1] * len(inner_dims)
        for a, b in zip(inner, outer):
            moved[a] = positions[b]
        return self.translate(node.inputs[0], moved)

    def _op_Transpose(self, node, value, positions):
        perm = attribute(node, "perm", None) or list(range(len(positions)))[::-1]
        inner = [-1] * len(positions)
        for axis, source in enumerate(perm):
            inner[source] = positions[axis]
        return self.translate(node.inputs[0], inner)

    def _op_Slice(self, node, value, positions):
        data = node.inputs[0]
        dims = self._dims(data)
        starts = self._constant(node.inputs[1]).reshape(-1).tolist()
        axes = self._optional(node, 3, list(range(len(starts))))
        steps = self._optional(node, 4, [1] * len(starts))
        inner = list(positions)
        for start, axis, step in zip(starts, axes, steps):
            axis = int(axis) % len(dims)
            if step <= 0 or (start < 0 and not isinstance(dims[axis], int)):
                raise ProgramError(f"Slice '{value.name}' has a negative step or a negative start on a dynamic axis")
            if start < 0:
                start = max(start + dims[axis], 0)
            if isinstance(dims[axis], int):
                start = min(start, dims[axis])
            if start == 0 and step == 1:
                continue
            inner[axis] = self._affine(self._position(positions[axis]), int(step), int(start))
        return self.translate(data, inner)

    def _op_Range(self, node, value, positions):
        start, delta = (self._constant(x).reshape(()).item() for x in (node.inputs[0], node.inputs[2]))
        dtype = self._dtype(value)
        position = self._position(positions[0])
        if dtype != "int64":
            position = self.builder.add("cast", (position,), dtype=dtype)
        return self._affine(position, delta, start, dtype)

    def _op_ConstantOfShape(self, node, value, positions):
        tensor = attribute(node, "value", None)
        fill = tensor.numpy().reshape(-1)[0].item() if tensor is not None else 0.0
        return self.builder.const(fill, self._dtype(value))

    def _op_Trilu(self, node, value, positions):
        if len(positions) < 2:
            raise ProgramError("Trilu of fewer than two axes")
        diagonal = int(self._optional(node, 1, [0])[0])
        rows, cols = self._position(positions[-2]), self._position(positions[-1])
        offset = self.builder.add("sub", (cols, rows), dtype="int64")
        compare = "ge" if attribute(node, "upper", 1) else "le"
        keep = self.builder.add(compare, (offset, self.builder.const(diagonal, "int64")), dtype="bool")
        dtype = self._dtype(value)
        zero = self.builder.const(False if dtype == "bool" else 0, dtype)
        return where(self.builder, keep, self.translate(node.inputs[0], positions), zero, dtype)
