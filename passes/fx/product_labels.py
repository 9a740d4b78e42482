"""Axis labels of a two-operand tensor product (matmul, bmm, baddbmm, einsum).

Every product is described the way einsum would write it: one label per axis of each operand and
of the result. Attention matching then reasons about labels (which axis is contracted, which one
softmax normalises, which ones are batch axes) instead of about op-specific argument positions.
"""

from __future__ import annotations

import dataclasses
import string

from torch.fx import Node

from passes.fx.aten_vocabulary import aten, is_call, scalar_value, tensor_meta

__all__ = ["LabeledProduct", "label_product"]


@dataclasses.dataclass(frozen=True)
class LabeledProduct:
    left: Node
    right: Node
    left_labels: str
    right_labels: str
    out_labels: str
    alpha: float = 1.0  # baddbmm's scale on the product
    added: Node | None = None  # baddbmm's `input`, added with factor `beta`
    beta: float = 0.0

    def operand(self, node: Node) -> tuple[Node, str]:
        return (self.left, self.left_labels) if node is self.left else (self.right, self.right_labels)


def _matmul_labels(left_rank: int, right_rank: int) -> tuple[str, str, str] | None:
    """Labels of a batched matmul with broadcasting batch axes aligned from the right."""
    if left_rank < 2 or right_rank < 2:
        return None
    batch = string.ascii_lowercase[: max(left_rank, right_rank) - 2]
    left_batch = batch[len(batch) - (left_rank - 2):]
    right_batch = batch[len(batch) - (right_rank - 2):]
    return left_batch + "MN", right_batch + "NP", batch + "MP"


def _einsum_labels(equation: str, left_rank: int, right_rank: int) -> tuple[str, str, str] | None:
    equation = equation.replace(" ", "")
    if "->" not in equation:
        return None
    inputs, out = equation.split("->")
    operands = inputs.split(",")
    if len(operands) != 2:
        return None
    spare = [c for c in string.ascii_letters if c not in equation]
    ellipsis_rank = max(
        (rank - len(spec.replace("...", "")) for spec, rank in zip(operands, (left_rank, right_rank)) if "..." in spec),
        default=0,
    )
    broadcast = "".join(spare[:ellipsis_rank])

    def expand(spec: str, rank: int) -> str:
        if "..." not in spec:
            return spec
        own = rank - len(spec.replace("...", ""))
        return spec.replace("...", broadcast[ellipsis_rank - own:])

    left, right = expand(operands[0], left_rank), expand(operands[1], right_rank)
    out = out.replace("...", broadcast)
    if len(left) != left_rank or len(right) != right_rank:
        return None
    if any(len(set(labels)) != len(labels) for labels in (left, right, out)):
        return None  # repeated labels take diagonals: not a plain product
    return left, right, out


def label_product(node: Node) -> LabeledProduct | None:
    """Labels for a matmul / bmm / baddbmm / einsum node of two tensors, else None."""
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    if node.target is aten.einsum.default:
        equation, operands = node.args[0], node.args[1]
        if len(operands) != 2:
            return None
        metas = [tensor_meta(operand) for operand in operands]
        if any(meta is None for meta in metas):
            return None
        labels = _einsum_labels(equation, metas[0].dim(), metas[1].dim())
        return None if labels is None else LabeledProduct(operands[0], operands[1], *labels)
    if is_call(node, {aten.matmul.default, aten.bmm.default}):
        left, right = node.args[0], node.args[1]
    elif is_call(node, {aten.baddbmm.default}):
        added, left, right = node.args[:3]
        beta = scalar_value(node.kwargs.get("beta", node.args[3] if len(node.args) > 3 else 1))
        alpha = scalar_value(node.kwargs.get("alpha", node.args[4] if len(node.args) > 4 else 1))
        if beta is None or alpha is None:
            return None
        return LabeledProduct(left, right, "aMN", "aNP", "aMP", alpha, None if beta == 0 else added, beta)
    else:
        return None
    metas = [tensor_meta(left), tensor_meta(right)]
    if any(meta is None for meta in metas):
        return None
    labels = _matmul_labels(metas[0].dim(), metas[1].dim())
    return None if labels is None else LabeledProduct(left, right, *labels)
