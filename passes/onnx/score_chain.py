"""Walk from a Softmax's input up to the Q·Kᵀ product and reduce the ops between to one form.

Accepted between the product and Softmax (in any order the algebra allows)::

    scores ──(Mul | Div by a scalar)──(Add | Sub bias, or a scalar)──
           ──(Where(cond, scores, fill) | Where(cond, fill, scores))──(c·Tanh(scores/c))──
           ──(Cast between float types, Identity, inference Dropout)── Softmax

and, anywhere between, Reshapes that only split or merge the leading batch and head axes
(`batch_views`; the detector proves the block's split from them).

A scalar is any one-element value that depends on no input except through static shapes (the
TorchScript exporter computes ``1/sqrt(head_dim)`` from ``Shape``). The ops are reduced to the
kernel's order ``scale → softcap → +bias → mask`` (a bias after a finite-fill mask gives the mask a
per-entry fill, `passes.core.fill_programs`); rewrites that would change a result are refused with
the reason (a bias before soft-capping, a non-positive scale, scores negated).
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from passes.onnx.axis_labels import LabeledProduct, label_product
from passes.onnx.batch_views import view_reason
from passes.onnx.constant_folding import ShapeOnlyFolder
from passes.onnx.graph_values import FLOAT_TYPES, attribute, const_array, value_consumers
from passes.core.score_algebra import ChainError, MaskStep, reduce_score_steps, scores_side_of_sum
from rewriter.kernels.onnx_score_program import program_type

__all__ = ["ScoreChain", "trace_score_chain", "check_inference_dropout"]


@dataclasses.dataclass
class ScoreChain:
    product: LabeledProduct
    nodes: list[ir.Node]  # between product and Softmax, bottom-up, product excluded
    scale: float = 1.0
    softcap: float = 0.0
    biases: list[tuple[ir.Value, float]] = dataclasses.field(default_factory=list)
    masks: list[MaskStep] = dataclasses.field(default_factory=list)


def check_inference_dropout(node: ir.Node) -> str | None:
    """None when a Dropout node is the identity (inference, mask unused), else why not."""
    training = node.inputs[2] if len(node.inputs) > 2 else None
    flag = const_array(training) if training is not None else False
    if flag is None or bool(flag):
        return f"dropout '{node.name}' may run in training mode"
    if len(node.outputs) > 1 and value_consumers(node.outputs[1]):
        return f"the dropout mask of '{node.name}' is used"
    return None


def _dtype(value: ir.Value) -> str | None:
    """The value's element type as score programs spell it ("float32", …), None when unknown."""
    return program_type(value.dtype) if value.dtype is not None else None


class _Walker:
    def __init__(self, facts, folder: ShapeOnlyFolder):
        self.facts, self.folder = facts, folder

    def single_consumer(self, value: ir.Value, node: ir.Node) -> None:
        consumers = value_consumers(value)
        if consumers != [node]:
            raise ChainError(f"intermediate '{value.name}' has other users ({len(consumers)} in all)")

    def walk_to(self, value: ir.Value | None, user: ir.Node, steps: list, nodes: list) -> LabeledProduct:
        if value is None:
            raise ChainError(f"'{user.name}' has no tensor input on the score path")
        self.single_consumer(value, user)
        return self.walk(value, steps, nodes)

    def walk(self, value: ir.Value, steps: list, nodes: list) -> LabeledProduct:
        node = value.producer()
        product = label_product(node, self.facts)
        if product is not None:
            return product
        if node is None or node.domain not in ("", "ai.onnx"):
            raise ChainError(f"no Q·Kᵀ product above softmax (reached '{value.name}')")
        nodes.append(node)
        op = node.op_type
        if op == "Cast":
            if attribute(node, "to") not in FLOAT_TYPES:
                raise ChainError(f"scores are cast to a non-float type ('{node.name}')")
            return self.walk_to(node.inputs[0], node, steps, nodes)
        if op == "Identity":
            return self.walk_to(node.inputs[0], node, steps, nodes)
        if op == "Dropout":
            reason = check_inference_dropout(node)
            if reason:
                raise ChainError(reason)
            return self.walk_to(node.inputs[0], node, steps, nodes)
        if op in ("Mul", "Div"):
            return self.walk_scale(node, steps, nodes)
        if op in ("Add", "Sub"):
            return self.walk_sum(node, steps, nodes)
        if op == "Where":
            return self.walk_where(node, steps, nodes)
        if op == "Tanh":
            steps.append(("tanh", None))
            return self.walk_to(node.inputs[0], node, steps, nodes)
        if op == "Reshape":
            reason = view_reason(node, self.facts, self.folder)
            if reason:
                raise ChainError(reason)
            return self.walk_to(node.inputs[0], node, steps, nodes)  # a batch view (`batch_views`)
        if op in ("Transpose", "Squeeze", "Unsqueeze", "Expand"):
            raise ChainError(f"scores are reshaped between the product and softmax ('{node.name}')")
        raise ChainError(f"unsupported op '{op}' between the product and softmax ('{node.name}')")

    def walk_scale(self, node: ir.Node, steps, nodes) -> LabeledProduct:
        left, right = node.inputs[0], node.inputs[1]
        right_value, left_value = self.folder.scalar(right), self.folder.scalar(left)
        if right_value is not None and left_value is None:
            steps.append(("scale", right_value if node.op_type == "Mul" else 1.0 / right_value))
            return self.walk_to(left, node, steps, nodes)
        if left_value is not None and right_value is None and node.op_type == "Mul":
            steps.append(("scale", left_value))
            return self.walk_to(right, node, steps, nodes)
        names = " or ".join(f"'{value.name}'" for value in (left, right) if value is not None)
        raise ChainError(f"'{node.name}' scales the scores by {names}, a non-scalar or non-constant value")

    def walk_sum(self, node: ir.Node, steps, nodes) -> LabeledProduct:
        left, right = node.inputs[0], node.inputs[1]
        subtract = node.op_type == "Sub"
        for scores, other in ((left, right), (right, left)):
            constant = self.folder.scalar(other)
            if constant is not None and (scores is left or not subtract):
                steps.append(("shift", (-constant if subtract else constant, _dtype(node.outputs[0]) or "float32")))
                return self.walk_to(scores, node, steps, nodes)
        scores, bias, found, branch_steps, branch_nodes = scores_side_of_sum(
            node.name, left, right, lambda operand, *path: self.walk_to(operand, node, *path))
        if scores is right and subtract:
            raise ChainError(f"'{node.name}' negates the scores")
        steps.append(("bias", (bias, -1.0 if subtract else 1.0, _dtype(node.outputs[0]))))
        steps.extend(branch_steps)
        nodes.extend(branch_nodes)
        return found

    def walk_where(self, node: ir.Node, steps, nodes) -> LabeledProduct:
        condition, if_true, if_false = node.inputs
        true_fill, false_fill = self.folder.scalar(if_true), self.folder.scalar(if_false)
        if false_fill is not None and true_fill is None:
            steps.append(("mask", MaskStep(condition, keep_when_true=True, fill=false_fill,
                                           dtype=_dtype(node.outputs[0]))))
            return self.walk_to(if_true, node, steps, nodes)
        if true_fill is not None and false_fill is None:
            steps.append(("mask", MaskStep(condition, keep_when_true=False, fill=true_fill,
                                           dtype=_dtype(node.outputs[0]))))
            return self.walk_to(if_false, node, steps, nodes)
        raise ChainError(f"'{node.name}' selects between two tensors, not scores and a constant fill")


def trace_score_chain(softmax_input: ir.Value, softmax: ir.Node, facts, folder: ShapeOnlyFolder) -> ScoreChain:
    """The Q·Kᵀ product feeding `softmax` and the reduced ops in between; raises ChainError."""
    walker = _Walker(facts, folder)
    steps, nodes = [], []
    product = walker.walk_to(softmax_input, softmax, steps, nodes)
    reduced = reduce_score_steps(list(reversed(steps)))
    return ScoreChain(product, nodes, reduced.scale, reduced.softcap, reduced.biases, reduced.masks)
