"""Walk from a softmax's input up to the Q·Kᵀ product and reduce the ops between to one form.

Accepted between the product and softmax (in any order the algebra allows):

    scores ──(mul|div by a scalar constant)──(+ bias | − bias | + constant)──
           ──(masked_fill | where with a scalar fill)──(c·tanh(scores/c))──(casts, clones)── softmax

and views that only split or merge batch and head axes (`passes.fx.batch_views`), anywhere.

The ops are reduced to the `rewriter::attention` order ``scale → softcap → +bias → mask`` by
`passes.core.score_algebra`, which refuses the orders that would change a result.

A factor that is not a constant (a parameter such as a learned temperature, an input, a per-head
vector) is never read as a number: when it multiplies or divides the scores before any bias, mask
or soft-cap, it is kept as a tensor (`ScoreChain.query_factors`) that the rewrite applies to Q,
since ``(Q·Kᵀ)·t = (Q·t)·Kᵀ`` for a `t` constant along the key axis; elsewhere it is refused.
"""

from __future__ import annotations

import dataclasses

from torch.fx import GraphModule, Node

from passes.fx import aten_vocabulary as ops
from passes.fx.batch_views import is_batch_view
from passes.fx.constant_values import scalar_constant
from passes.fx.product_labels import LabeledProduct, label_product
from passes.core.score_algebra import ChainError, MaskStep, reduce_score_steps, scores_side_of_sum

__all__ = ["ScoreChain", "trace_score_chain"]

_TENSOR_FACTOR = "tensor_factor"  # a step local to this walker: scores ·|÷ a non-constant tensor


@dataclasses.dataclass
class ScoreChain:
    product_node: Node
    product: LabeledProduct
    nodes: list[Node]  # between product and softmax, bottom-up, product excluded
    scale: float = 1.0
    softcap: float = 0.0
    biases: list[tuple[Node, float]] = dataclasses.field(default_factory=list)
    masks: list[MaskStep] = dataclasses.field(default_factory=list)
    query_factors: list[tuple[Node, bool]] = dataclasses.field(default_factory=list)  # (tensor, divides)


def _dtype(node: Node) -> str | None:
    """The node's dtype as score programs spell it ("float32", …), None when not recorded."""
    meta = ops.tensor_meta(node)
    return None if meta is None else str(meta.dtype).removeprefix("torch.")


def _single_user(node: Node, user: Node) -> None:
    users = ops.value_users(node)
    if users != [user]:
        raise ChainError(f"intermediate '{node.name}' has other users ({len(users)} in all)")


def _scalar_operand(gm, node: Node) -> tuple[Node, float]:
    """(tensor operand, scalar operand) of a binary op with one scalar-constant side."""
    left, right = node.args[0], node.args[1]
    right_value = scalar_constant(gm, right)
    if right_value is not None and isinstance(left, Node):
        return left, right_value
    left_value = scalar_constant(gm, left)
    if left_value is not None and isinstance(right, Node) and node.target in ops.MUL:
        return right, left_value
    raise ChainError(f"'{node.name}' scales the scores by a non-scalar or non-constant value")


def _walk(gm: GraphModule, node: Node, steps: list, nodes: list[Node]):
    """Collect steps bottom-up from `node` to the product; returns (product node, labels)."""
    product = label_product(node)
    if product is not None:
        return node, product
    if node.op != "call_function":
        raise ChainError(f"no Q·Kᵀ product above softmax (reached '{node.name}')")
    nodes.append(node)
    target = node.target
    if target in ops.IN_PLACE and not _mutates_scores(gm, node):
        raise ChainError(f"'{node.name}' updates a tensor other than the scores in place")
    if target in ops.CASTS or target in ops.PASSTHROUGH:
        return _walk_to(gm, node.args[0], node, steps, nodes)
    if target in ops.DROPOUT:
        _check_dropout(node)
        return _walk_to(gm, node.args[0], node, steps, nodes)
    if target in ops.MUL or target in ops.DIV:
        try:
            operand, value = _scalar_operand(gm, node)
        except ChainError:
            return _walk_tensor_factor(gm, node, steps, nodes)
        steps.append(("scale", value if target in ops.MUL else 1.0 / value))
        return _walk_to(gm, operand, node, steps, nodes)
    if target in ops.ADD or target in ops.SUB:
        return _walk_sum(gm, node, steps, nodes)
    if target in ops.MASKED_FILL:
        fill = scalar_constant(gm, node.args[2])
        if fill is None:
            raise ChainError(f"'{node.name}' fills masked scores with a non-constant value")
        steps.append(("mask", MaskStep(node.args[1], keep_when_true=False, fill=fill, dtype=_dtype(node))))
        return _walk_to(gm, node.args[0], node, steps, nodes)
    if target in ops.WHERE:
        return _walk_where(gm, node, steps, nodes)
    if target in ops.TANH:
        steps.append(("tanh", None))
        return _walk_to(gm, node.args[0], node, steps, nodes)
    if target in ops.RESHAPE:
        if is_batch_view(node):  # (B·H, Lq, Lk) ↔ (B, H, Lq, Lk): moves no score
            return _walk_to(gm, node.args[0], node, steps, nodes)
        raise ChainError(f"scores are reshaped between the product and softmax ('{node.name}')")
    raise ChainError(f"unsupported op '{target}' between the product and softmax ('{node.name}')")


def _mutates_scores(gm, node: Node) -> bool:
    """Whether an in-place op's mutated operand (its first) is on the path to the product."""
    try:
        _walk_to(gm, node.args[0], node, [], [])
        return True
    except ChainError:
        return False


def _walk_to(gm, operand, user: Node, steps, nodes):
    if not isinstance(operand, Node):
        raise ChainError(f"'{user.name}' has no tensor input on the score path")
    _single_user(operand, user)
    return _walk(gm, operand, steps, nodes)


def _check_dropout(node: Node) -> None:
    probability = node.args[1] if len(node.args) > 1 else 0.0
    train = node.args[2] if len(node.args) > 2 else True
    if train and probability:
        raise ChainError(f"dropout p={probability} in training mode ('{node.name}')")


def _walk_sum(gm, node: Node, steps, nodes):
    left, right = node.args[0], node.args[1]
    alpha = ops.scalar_value(node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1))
    subtract = node.target in ops.SUB
    if alpha is None:
        raise ChainError(f"'{node.name}' adds with a non-constant alpha")
    for scores, other in ((left, right), (right, left)):
        scores_kept = scores is left or not (subtract or alpha != 1)
        constant = scalar_constant(gm, other)
        if constant is not None and isinstance(scores, Node) and scores_kept:
            shift = constant * alpha if scores is left else constant
            steps.append(("shift", (-shift if subtract else shift, _dtype(node) or "float32")))
            return _walk_to(gm, scores, node, steps, nodes)
    scores, bias, found, branch_steps, branch_nodes = scores_side_of_sum(
        node.name, left, right, lambda operand, *path: _walk_to(gm, operand, node, *path))
    if scores is right and (subtract or alpha != 1):
        raise ChainError(f"'{node.name}' negates or rescales the scores")
    steps.append(("bias", (bias, -alpha if subtract else alpha, _dtype(node))))
    steps.extend(branch_steps)
    nodes.extend(branch_nodes)
    return found


def _walk_tensor_factor(gm, node: Node, steps, nodes):
    """Scores multiplied or divided by a tensor that is not a constant: a `_TENSOR_FACTOR` step."""
    left, right = node.args[0], node.args[1]
    if not isinstance(left, Node) or not isinstance(right, Node):
        raise ChainError(f"'{node.name}' scales the scores by a non-scalar or non-constant value")
    scores, factor, found, branch_steps, branch_nodes = scores_side_of_sum(
        node.name, left, right, lambda operand, *path: _walk_to(gm, operand, node, *path))
    divides = node.target in ops.DIV
    if divides and scores is right:
        raise ChainError(f"'{node.name}' divides by the scores")
    steps.append((_TENSOR_FACTOR, (factor, divides)))
    steps.extend(branch_steps)
    nodes.extend(branch_nodes)
    return found


def _split_query_factors(steps_top_down: list) -> tuple[list, list[tuple[Node, bool]]]:
    """The tensor factors, which must come before every step but constant scales, and the rest."""
    rest, factors = [], []
    for kind, payload in steps_top_down:
        if kind != _TENSOR_FACTOR:
            rest.append((kind, payload))
            continue
        if any(earlier != "scale" for earlier, _ in rest):
            raise ChainError(
                f"the scores are scaled by the tensor '{payload[0].name}' after a bias, mask, shift or "
                "soft-cap; it is not a constant and cannot be moved onto Q")
        factors.append(payload)
    return rest, factors


def _walk_where(gm, node: Node, steps, nodes):
    condition, if_true, if_false = node.args[0], node.args[1], node.args[2]
    true_fill, false_fill = scalar_constant(gm, if_true), scalar_constant(gm, if_false)
    if false_fill is not None and isinstance(if_true, Node):
        steps.append(("mask", MaskStep(condition, keep_when_true=True, fill=false_fill, dtype=_dtype(node))))
        return _walk_to(gm, if_true, node, steps, nodes)
    if true_fill is not None and isinstance(if_false, Node):
        steps.append(("mask", MaskStep(condition, keep_when_true=False, fill=true_fill, dtype=_dtype(node))))
        return _walk_to(gm, if_false, node, steps, nodes)
    raise ChainError(f"'{node.name}' selects between two tensors, not scores and a constant fill")


def trace_score_chain(gm: GraphModule, softmax_input: Node, softmax: Node) -> ScoreChain:
    """The Q·Kᵀ product feeding `softmax` and the reduced ops in between; raises ChainError."""
    if not isinstance(softmax_input, Node):
        raise ChainError("softmax input is not a tensor")
    _single_user(softmax_input, softmax)
    steps, nodes = [], []
    product_node, product = _walk(gm, softmax_input, steps, nodes)
    if product.added is not None:  # baddbmm: beta·input + alpha·(Q·Kᵀ)
        steps.append(("bias", (product.added, product.beta)))
    steps.append(("scale", product.alpha))
    steps, query_factors = _split_query_factors(list(reversed(steps)))
    reduced = reduce_score_steps(steps)
    return ScoreChain(product_node, product, nodes, reduced.scale, reduced.softcap, reduced.biases, reduced.masks,
                      query_factors)
