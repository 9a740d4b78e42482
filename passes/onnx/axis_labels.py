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
from collections.abc import Callable

import onnx_ir as ir

from passes.core.attention_labels import FINE, MERGED
from passes.onnx.graph_values import attribute, is_op
from passes.onnx.shape_facts import Dim, ShapeFacts

__all__ = ["Axis", "LabeledProduct", "Operand", "label_product", "regroup_axes", "trace_to_source", "walk_views"]


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
    """A value whose axes carry `labels`, to be arranged as `order` (labels it lacks = size 1).

    `split_heads` > 0: the value's last axis packs (heads, dim) and is split before arranging;
    `labels` then name the axes after that split.
    `merged`: the (batch, heads) sizes ((1, 1) where it broadcasts) that the value's axis at the
    position of the labels `FINE` packs (`passes.onnx.batch_views`); `labels` name the split axes.
    """

    value: ir.Value
    labels: str
    order: str  # the labels in the order the kernel takes them (absent ones become size 1)
    split_heads: int = 0
    merged: tuple | None = None


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
Axis = tuple[tuple[str, Dim], ...]
# How one Reshape is crossed: (input dims, output dims, output axes) → input axes, or None.
ReshapeRule = Callable[[list | None, list | None, list[Axis]], list[Axis] | None]


def _through_transpose(node: ir.Node, axes: list[Axis]) -> list[Axis] | None:
    perm = attribute(node, "perm", list(range(len(axes)))[::-1])
    if sorted(perm) != list(range(len(axes))):
        return None
    source: list[Axis] = [()] * len(axes)
    for position, axis in enumerate(perm):
        source[axis] = axes[position]
    return source


def regroup_axes(in_dims, out_dims, axes: list[Axis]) -> list[Axis] | None:
    """Input axes of a row-major reshape `in_dims` → `out_dims` that splits or merges whole axes, else None."""
    left = 0
    while left < min(len(in_dims), len(out_dims)) and ShapeFacts.same(in_dims[left], out_dims[left]):
        left += 1
    in_stop, out_stop = len(in_dims), len(out_dims)
    while in_stop > left and out_stop > left and ShapeFacts.same(in_dims[in_stop - 1], out_dims[out_stop - 1]):
        in_stop, out_stop = in_stop - 1, out_stop - 1
    head, middle, tail, in_middle = axes[:left], axes[left:out_stop], axes[out_stop:], in_dims[left:in_stop]
    if not in_middle and not middle:
        return head + tail
    if len(in_middle) == 1 and middle:  # a merge, seen from above: one axis of all atoms
        return head + [tuple(atom for axis in middle for atom in axis)] + tail
    if len(middle) == 1 and len(in_middle) == len(middle[0]) > 1 and all(
            ShapeFacts.same(dim, atom_dim) for dim, (_, atom_dim) in zip(in_middle, middle[0])):
        return head + [(atom,) for atom in middle[0]] + tail  # a split of a merged axis
    return None


def _whole_axes(in_dims, out_dims, axes: list[Axis]) -> list[Axis] | None:
    if in_dims is None or out_dims is None or len(out_dims) != len(axes):
        return None
    return regroup_axes(in_dims, out_dims, axes)


def walk_views(operand: Operand, facts: ShapeFacts, through_reshape: ReshapeRule) -> Operand:
    """The earliest value up through Transposes and the Reshapes `through_reshape` can cross whose
    axes carry one label each, relabelled; `operand` itself when there is none."""
    dims = facts.dims(operand.value)
    packed = operand.labels.replace(FINE, MERGED) if operand.merged else operand.labels
    if dims is None or len(dims) != len(packed):
        return operand
    axes: list[Axis] = [((label, dim),) if label != MERGED else tuple(zip(FINE, operand.merged))
                        for label, dim in zip(packed, dims)]
    value, best = operand.value, operand
    while True:
        node = value.producer()
        if is_op(node, "Transpose"):
            axes = _through_transpose(node, axes)
        elif is_op(node, "Reshape"):
            axes = through_reshape(facts.dims(node.inputs[0]), facts.dims(node.outputs[0]), axes)
        else:
            return best
        if axes is None:
            return best
        value = node.inputs[0]
        if all(len(axis) == 1 for axis in axes):
            best = Operand(value, "".join(axis[0][0] for axis in axes), operand.order)


def trace_to_source(operand: Operand, facts: ShapeFacts) -> Operand:
    """The earliest value before transposes and whole-axis reshapes, with its axes relabelled."""
    return walk_views(operand, facts, _whole_axes)
