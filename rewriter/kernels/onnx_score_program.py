"""Score programs as ONNX ops: a mask or bias block computed from O(n) leaves inside a Loop body.

`ScoreProgramEmitter` writes one `rewriter.kernels.score_program.Program` as standard ONNX ops
(default domain, opset 13+), step by step, for the index ranges of one block:

- ``index``: the caller's int64 position tensor of that axis (a Range over the block's rows or
  keys, or over the whole batch/head axis), shaped to broadcast against the scores;
- ``load``: ``Gather`` on the leaf flattened once outside the loop, at the flat index
  ``Σ index_a · stride_a`` (strides from the leaf's run-time shape; a computed index is wrapped with
  ``Mod`` so negative positions read from the end, as torch's indexing does);
- elementwise ops map one to one; ONNX takes equal input types, so operands are cast to the type
  torch computes in (`compute_type`: bool < integer < floating point, wider wins within a kind, a
  constant takes the other operand's type unless it is of a higher kind), and the result to the
  step's dtype. ``floor_divide`` and ``remainder`` follow torch's flooring, not ONNX's truncation.

Values are dropped by ONNX Runtime after their last use, so a block costs a few block-sized
temporaries, never Lq × Lk.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from rewriter.kernels.onnx_emitter import Emitter
from rewriter.kernels.program_proofs import ancestors
from rewriter.kernels.score_program import Program

__all__ = ["ScoreProgramEmitter", "compute_type", "onnx_type", "program_type"]

logger = logging.getLogger(__name__)

_TYPES = {"float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16,
          "float64": ir.DataType.DOUBLE, "int64": ir.DataType.INT64, "int32": ir.DataType.INT32,
          "int16": ir.DataType.INT16, "int8": ir.DataType.INT8, "uint8": ir.DataType.UINT8, "bool": ir.DataType.BOOL}
_NAMES = {dtype: name for name, dtype in _TYPES.items()}
_WIDTH = {"bool": 0, "uint8": 1, "int8": 1, "int16": 2, "int32": 3, "int64": 4, "float16": 1, "bfloat16": 1,
          "float32": 2, "float64": 3}
_UNARY = {"neg": "Neg", "abs": "Abs", "log": "Log", "exp": "Exp", "floor": "Floor", "ceil": "Ceil"}
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "minimum": "Min", "maximum": "Max"}
_COMPARE = {"lt": "Less", "le": "LessOrEqual", "gt": "Greater", "ge": "GreaterOrEqual", "eq": "Equal"}
_LOGIC = {"logical_and": "And", "logical_or": "Or", "logical_xor": "Xor"}


def onnx_type(name: str) -> ir.DataType:
    """The ONNX type of a program dtype name ("float32", "int64", "bool", …); KeyError for others."""
    return _TYPES[name]


def program_type(dtype: ir.DataType) -> str | None:
    """The program dtype name of an ONNX type, None for types programs do not use."""
    return _NAMES.get(dtype)


def _kind(name: str) -> int:
    return 0 if name == "bool" else 2 if name.startswith(("float", "bfloat")) else 1


def compute_type(names: Sequence[str]) -> str:
    """The type torch computes a mix of operands in: the highest kind among tensors (bool < integer
    < floating point), the widest of that kind (float16 with bfloat16 → float32, uint8 with int8 →
    int16); a constant (its name prefixed ``const:``) counts only when its kind is higher (then
    int64 or float32, torch's defaults) or when every operand is a constant."""
    tensors = [name for name in names if not name.startswith("const:")]
    consts = [name[len("const:"):] for name in names if name.startswith("const:")]
    if not tensors:
        tensors, consts = consts, []
    kind = max(_kind(name) for name in tensors)
    widest = max(_WIDTH[name] for name in tensors if _kind(name) == kind)
    candidates = {name for name in tensors if _kind(name) == kind and _WIDTH[name] == widest}
    best = candidates.pop() if len(candidates) == 1 else ("float32" if kind == 2 else "int16")
    if any(_kind(const) > kind for const in consts):
        best = "float32" if max(_kind(const) for const in consts) == 2 else "int64"
    return best


class ScoreProgramEmitter:
    """One program over fixed leaves; `emit` writes its value for one block into a (loop body) emitter.

    Leaves are flattened and their strides computed once, with `outer` (the graph that holds the
    Loop); the body reads them as outer-scope values.
    """

    def __init__(self, outer: Emitter, program: Program, leaves: Sequence[ir.Value]):
        self.program = program
        self._leaves: dict[int, tuple[ir.Value, list[ir.Value], list[ir.Value]]] = {}
        for step in program.steps:
            if step.op == "load" and step.attr not in self._leaves:
                self._leaves[step.attr] = _flattened(outer, leaves[step.attr], len(step.args))

    @property
    def axes(self) -> set[str]:
        return {step.attr for step in self.program.steps if step.op == "index"}

    def emit(self, e: Emitter, index: dict[str, ir.Value], rank: int) -> ir.Value:
        """The program's value for the block whose position tensors are `index` (axis name → int64
        value broadcastable to the block), of rank `rank` (size-1 axes where it reads no index)."""
        return self.emit_addends(e, index, rank, [len(self.program.steps) - 1])[0]

    def emit_addends(self, e: Emitter, index: dict[str, ir.Value], rank: int,
                     outputs: Sequence[int] | None = None) -> list[ir.Value]:
        """`emit` for the values of the steps `outputs` (default: the addends the model adds to the
        scores in turn, `score_program.addend_steps`), each of rank `rank` where it reads no index."""
        steps = self.program.steps
        outputs = list(self.program.addends if outputs is None else outputs)
        values: list[ir.Value | None] = [None] * len(steps)
        types: list[str] = [""] * len(steps)
        needed = [ancestors(steps, output) for output in outputs]
        wanted = set().union(*needed)
        for position, step in enumerate(steps):
            if position not in wanted:
                continue
            if step.op == "index":
                values[position], types[position] = index[step.attr], "int64"
                continue
            if step.op == "const":
                types[position] = "const:" + step.dtype
                continue
            if step.op == "load":
                values[position], types[position] = self._load(e, step, values, steps), step.dtype
            else:
                values[position], types[position] = self._elementwise(e, step, values, types, steps)
            if types[position] != step.dtype:
                values[position], types[position] = e("Cast", values[position], to=_TYPES[step.dtype]), step.dtype
        results = []
        for output, read in zip(outputs, needed):
            out = values[output] if values[output] is not None else _const(e, steps[output].attr, steps[output].dtype)
            if not any(steps[position].op == "index" for position in read):
                out = e("Reshape", out, e.const([1] * rank))
            out.dtype = _TYPES[steps[output].dtype]
            results.append(out)
        return results

    def _load(self, e: Emitter, step, values, steps) -> ir.Value:
        flat, strides, sizes = self._leaves[step.attr]
        if not step.args:
            return flat
        offset = None
        for axis, arg in enumerate(step.args):
            if arg < 0:
                continue
            position = values[arg]
            if position is None:  # a constant index (constants are written where they are used)
                position = _const(e, steps[arg].attr, "int64")
            if steps[arg].dtype != "int64":
                position = e("Cast", position, to=ir.DataType.INT64)
            if steps[arg].op != "index":
                position = e("Mod", position, sizes[axis])
            if axis < len(strides):
                position = e("Mul", position, strides[axis])
            offset = position if offset is None else e("Add", offset, position)
        return e("Gather", flat, offset if offset is not None else e.const(0), axis=0)

    def _elementwise(self, e: Emitter, step, values, types, steps) -> tuple[ir.Value, str]:
        op = step.op
        args = list(step.args)
        if op == "cast":
            value = values[args[0]]
            return (value, types[args[0]]) if value is not None else (_const(e, steps[args[0]].attr, step.dtype),
                                                                       step.dtype)
        if op in _LOGIC or op == "logical_not":
            inputs = [_as(e, values, types, steps, arg, "bool") for arg in args]
            return (e("Not", *inputs) if op == "logical_not" else e(_LOGIC[op], *inputs)), "bool"
        if op == "where":
            condition = _as(e, values, types, steps, args[0], "bool")
            kind = compute_type([types[arg] for arg in args[1:]])
            return e("Where", condition, *(_as(e, values, types, steps, arg, kind) for arg in args[1:])), kind
        if op in _COMPARE or op == "ne":
            kind = compute_type([types[arg] for arg in args])
            left, right = (_as(e, values, types, steps, arg, kind) for arg in args)
            if op == "ne":
                return e("Not", e("Equal", left, right)), "bool"
            return e(_COMPARE[op], left, right), "bool"
        kind = step.dtype  # torch's result type of an arithmetic op is the type it computes in
        inputs = [_as(e, values, types, steps, arg, kind) for arg in args]
        if op in ("floor", "ceil") and _kind(kind) != 2:
            return inputs[0], kind  # identity on integers, as in torch
        if op in _UNARY:
            return e(_UNARY[op], *inputs), kind
        if op in _BINARY:
            return e(_BINARY[op], *inputs), kind
        if op == "floor_divide":
            if _kind(kind) == 2:
                return e("Floor", e("Div", *inputs)), kind
            wide = [e("Cast", x, to=ir.DataType.DOUBLE) for x in inputs]
            return e("Cast", e("Floor", e("Div", *wide)), to=_TYPES[kind]), kind
        if op == "remainder":
            if _kind(kind) != 2:
                return e("Mod", *inputs, fmod=0), kind  # sign of the divisor, as torch.remainder
            rest = e("Mod", *inputs, fmod=1)
            zero = _const(e, 0, kind)
            wrong_sign = e("And", e("Not", e("Equal", rest, zero)),
                           e("Xor", e("Less", rest, zero), e("Less", inputs[1], zero)))
            return e("Where", wrong_sign, e("Add", rest, inputs[1]), rest), kind
        raise ValueError(f"score program op {op!r} has no ONNX form")


def _const(e: Emitter, value, dtype: str) -> ir.Value:
    if dtype == "bfloat16":
        return e("Cast", e.const(value, np.float32), to=ir.DataType.BFLOAT16)
    return e.const(value, np.dtype(dtype))


def _as(e: Emitter, values, types, steps, arg: int, dtype: str) -> ir.Value:
    """Step `arg`'s value in `dtype` (a constant is written in that type)."""
    if values[arg] is None:
        return _const(e, steps[arg].attr, dtype)
    return values[arg] if types[arg] == dtype else e("Cast", values[arg], to=_TYPES[dtype])


def _flattened(e: Emitter, leaf: ir.Value, rank: int) -> tuple[ir.Value, list[ir.Value], list[ir.Value]]:
    """(leaf as 1-D, the stride of each of its axes but the last, each axis's size as [1])."""
    if rank <= 1:
        sizes = [e.shape(leaf)] if rank else []
        return leaf, [], sizes
    flat = e("Reshape", leaf, e.const([-1]))
    flat.dtype = leaf.dtype
    strides = [e("ReduceProd", e.shape(leaf, start=axis + 1), keepdims=1) for axis in range(rank - 1)]
    sizes = [e.shape(leaf, start=axis, end=axis + 1) for axis in range(rank)]
    return flat, strides, sizes
