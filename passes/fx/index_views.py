"""How positions move through FX view ops, for score-program recovery.

`source_positions(node, indices, builder)` answers: when `node` (a view) is read at `indices`
(one `ProgramBuilder` step per axis of `node`, -1 for an axis of size 1), which positions of its
source are read? Unsqueeze, squeeze and reshapes that only add or remove size-1 axes, permute and
transpose move steps between axes; ``slice(x, dim, start, end, step)`` reads index·step + start;
``select(x, dim, i)`` reads the constant i. Anything else raises `ProgramError`.
"""

from __future__ import annotations

import logging

import torch
from torch.fx import Node

from passes.core.score_programs import ProgramBuilder, ProgramError
from passes.fx import aten_vocabulary as ops

__all__ = ["constant_integer", "dtype_name", "is_one", "shape_of", "source_positions"]

logger = logging.getLogger(__name__)
aten = torch.ops.aten

_SQUEEZE = {aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default}


def dtype_name(node: Node) -> str:
    """The node's dtype as the program IR spells it ("float32", "bool", …)."""
    return str(ops.tensor_meta(node).dtype).removeprefix("torch.")


def shape_of(node: Node) -> tuple:
    """The node's recorded sizes (ints or SymInts); ProgramError when none was recorded."""
    meta = ops.tensor_meta(node)
    if meta is None:
        raise ProgramError(f"no shape recorded for '{node.name}'")
    return tuple(meta.shape)


def is_one(size) -> bool:
    return isinstance(size, int) and size == 1


def _same_size(first, second) -> bool:
    if isinstance(first, int) or isinstance(second, int):
        return isinstance(first, int) and isinstance(second, int) and first == second
    return first.node.expr == second.node.expr


def constant_integer(value) -> int:
    """A Python int from a literal or a graph value known at capture (a SymInt that simplified)."""
    if isinstance(value, Node):
        value = value.meta.get("val")
    if isinstance(value, torch.SymInt) and value.node.expr.is_number:
        value = int(value.node.expr)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProgramError(f"a slice or offset that is not a constant integer ({value!r})")
    return value


def _slice_position(node: Node, builder: ProgramBuilder, position: int, source_size) -> int:
    args = node.args
    start = constant_integer(args[2]) if len(args) > 2 and args[2] is not None else 0
    step = constant_integer(args[4]) if len(args) > 4 else 1
    if start < 0 or step < 1:
        raise ProgramError(f"'{node.name}' slices from the end or backwards")
    if is_one(source_size):
        return -1
    position = position if position >= 0 else builder.const(0, "int64")
    if step != 1:
        position = builder.add("mul", (position, builder.const(step, "int64")), None, "int64")
    if start != 0:
        position = builder.add("add", (position, builder.const(start, "int64")), None, "int64")
    return position


def source_positions(node: Node, indices: list[int], builder: ProgramBuilder) -> tuple[Node, list[int]]:
    """(source, its index steps) for a view `node` read at `indices`; raises ProgramError."""
    target, args = node.target, node.args
    source = args[0] if args else None
    if not isinstance(source, Node):
        raise ProgramError(f"unsupported op '{target}' ('{node.name}')")
    source_shape, rank = shape_of(source), len(shape_of(node))
    inner = list(indices)
    if target in ops.UNSQUEEZE:
        dim = args[1] % rank
        return source, inner[:dim] + inner[dim + 1:]
    if target in ops.PERMUTE:
        for position, axis in enumerate(args[1]):
            inner[axis % rank] = indices[position]
        return source, inner
    if target in ops.TRANSPOSE:
        first, second = args[1] % rank, args[2] % rank
        inner[first], inner[second] = inner[second], inner[first]
        return source, inner
    if target is aten.slice.Tensor:
        dim = (args[1] if len(args) > 1 else 0) % rank
        inner[dim] = _slice_position(node, builder, indices[dim], source_shape[dim])
        return source, inner
    if target is aten.select.int:
        dim, position = args[1] % len(source_shape), constant_integer(args[2])
        if position < 0:
            raise ProgramError(f"'{node.name}' selects from the end")
        return source, inner[:dim] + [builder.const(position, "int64")] + inner[dim:]
    if target in _SQUEEZE or target in ops.RESHAPE:
        return source, _unit_axes_view(node, source_shape, shape_of(node), indices)
    raise ProgramError(f"unsupported op '{target}' ('{node.name}')")


def _unit_axes_view(node: Node, source_shape: tuple, shape: tuple, indices: list[int]) -> list[int]:
    """The source's indices for a view that only adds or removes axes of size 1."""
    source_axes = [axis for axis, size in enumerate(source_shape) if not is_one(size)]
    axes = [axis for axis, size in enumerate(shape) if not is_one(size)]
    if len(source_axes) != len(axes) or not all(
            _same_size(source_shape[a], shape[b]) for a, b in zip(source_axes, axes)):
        raise ProgramError(f"'{node.name}' reshapes {source_shape} to {shape}, not only axes of size 1")
    inner = [-1] * len(source_shape)
    for a, b in zip(source_axes, axes):
        inner[a] = indices[b]
    return inner
