"""Axis labels of ONNX tensor products, and operands traced back through views.

A product (``MatMul``, two-input ``Einsum``) is described the way einsum writes it: one label per
axis of each operand and of the result. Matching then reasons about labels (which axis is
contracted, which one softmax normalises) instead of argument positions.

`trace_to_source` follows an operand up through ``Transpose`` (any permutation) and ``Reshape``
(only where it provably splits or merges whole axes) to the earliest value whose axes still carry
one label each. Torch's SDPA decomposition stores Kᵀ as
``Reshape(-1, L, D) → Transpose(0, 2, 1) → Reshape(B, H, D, L)`` of K; traced back, that operand is
K itself with labels ``B H L D``, so no transpose is needed at all.
"""

from __future__ import annotations

import dataclasses
import string

import onnx_ir as ir

from passes.onnx.graph_values import attribute, is_op
from passes.onnx.shape_facts import Dim, ShapeFacts

__all__ = ["LabeledProduct", "Operand", "label_product", "trace_to_source"]


@dataclasses.dataclass(frozen=True)
class LabeledProduct:
    node: ir.Node
    left: ir.Value
    right: ir.Value
    left_labels: str
    right_labels: str
    out_labels: str


@dataclasses.dataclass(frozen=True)
class Operand:
    """A value whose axes carry `labels`, to be arranged as `target` (labels it lacks = size 1).

    `split_heads` > 0: the value's last axis packs (heads, dim) and is split before arranging;
    `labels` then name the axes after that split.
    """

    value: ir.Value
    labels: str
    target: str
    split_heads: int = 0


def _matmul_labels(left_rank: int, right_rank: int) -> tuple[str, str, str] | None:
    if left_rank < 2 or right_rank < 2:
        return None  # a vector operand is not a batched matrix product
    batch = string.ascii_lowercase[: max(left_rank, right_rank) - 2]
    return batch[len(batch) - (left_rank - 2):] + "MN", batch[len(batch) - (right_rank - 2):] + "NP", batch + "MP"


def _einsum_labels(equation: str, left_rank: int, right_rank: int) -> tuple[str, str, str] | None:
    equation = equation.replace(" ", "")
    if "->" not in equation or "..." in equation:
        return None
    inputs, out = equation.split("->")
    operands = inputs.split(",")
    if len(operands) != 2 or (len(operands[0]), len(operands[1])) != (left_rank, right_rank):
        return None
    if any(len(set(labels)) != len(labels) for labels in (*operands, out)):
        return None  # a repeated label takes a diagonal: not a plain product
    if any(label not in operands[0] + operands[1] for label in out):
        return None
    return operands[0], operands[1], out


def label_product(node: ir.Node | None, facts: ShapeFacts) -> LabeledProduct | None:
    """Labels of a MatMul or two-operand Einsum node, else None."""
    if is_op(node, "MatMul"):
        labels = _matmul_labels(facts.rank(node.inputs[0]) or 0, facts.rank(node.inputs[1]) or 0)
    elif is_op(node, "Einsum") and len(node.inputs) == 2:
        labels = _einsum_labels(attribute(node, "equation", ""), facts.rank(node.inputs[0]) or 0,
                                facts.rank(node.inputs[1]) or 0)
    else:
        return None
    return None if labels is None else LabeledProduct(node, node.inputs[0], node.inputs[1], *labels)


# While tracing, each axis is a tuple of (label, dim) atoms: one atom, or several for merged axes.
_Axis = tuple[tuple[str, Dim], ...]


def _through_transpose(node: ir.Node, axes: list[_Axis]) -> list[_Axis] | None:
    perm = attribute(node, "perm", list(range(len(axes)))[::-1])
    if sorted(perm) != list(range(len(axes))):
        return None
    source: list[_Axis] = [()] * len(axes)
    for position, axis in enumerate(perm):
        source[axis] = axes[position]
    return source


def _reshape_groups(in_dims, out_dims) -> tuple[int, int, int]:
    """Strip provably equal dims from both ends: the middle is in_dims[left:in_stop] → out[left:out_stop]."""
    left = 0
    while left < min(len(in_dims), len(out_dims)) and ShapeFacts.same(in_dims[left], out_dims[left]):
        left += 1
    in_stop, out_stop = len(in_dims), len(out_dims)
    while in_stop > left and out_stop > left and ShapeFacts.same(in_dims[in_stop - 1], out_dims[out_stop - 1]):
        in_stop, out_stop = in_stop - 1, out_stop - 1
    return left, in_stop, out_stop


def _through_reshape(node: ir.Node, axes: list[_Axis], facts: ShapeFacts) -> list[_Axis] | None:
    """Input axes of a reshape that splits or merges whole axes (row-major), else None."""
    in_dims, out_dims = facts.dims(node.inputs[0]), facts.dims(node.outputs[0])
    if in_dims is None or out_dims is None or len(out_dims) != len(axes):
        return None
    left, in_stop, out_stop = _reshape_groups(in_dims, out_dims)
    head, middle, tail = axes[:left], axes[left:out_stop], axes[out_stop:]
    in_middle = in_dims[left:in_stop]
    if not in_middle and not middle:
        return axes
    if len(in_middle) == 1 and len(middle) >= 1:  # a merge, seen from above: one axis of all atoms
        return head + [tuple(atom for axis in middle for atom in axis)] + tail
    if len(middle) == 1 and len(in_middle) == len(middle[0]) > 1:  # a split of a merged axis
        atoms = middle[0]
        if all(ShapeFacts.same(dim, atom_dim) for dim, (_, atom_dim) in zip(in_middle, atoms)):
            return head + [(atom,) for atom in atoms] + tail
    return None


def trace_to_source(operand: Operand, facts: ShapeFacts) -> Operand:
    """The earliest value before transposes and whole-axis reshapes, with its axes relabelled."""
    dims = facts.dims(operand.value)
    if dims is None or len(dims) != len(operand.labels):
        return operand
    axes: list[_Axis] = [((label, dim),) for label, dim in zip(operand.labels, dims)]
    value, best = operand.value, operand
    while True:
        node = value.producer()
        if is_op(node, "Transpose"):
            axes = _through_transpose(node, axes)
        elif is_op(node, "Reshape"):
            axes = _through_reshape(node, axes, facts)
        else:
            return best
        if axes is None:
            return best
        value = node.inputs[0]
        if all(len(axis) == 1 for axis in axes):
            best = Operand(value, "".join(axis[0][0] for axis in axes), operand.target)
