"""The ATen operators the FX attention passes reason about, grouped by what they mean.

Graphs reach the passes through `torch.export`, so every operator is an ATen overload; this
module is the one place that knows their names and argument positions.
"""

from __future__ import annotations

import numbers

import torch
from torch.fx import Node

__all__ = [
    "CASTS", "PASSTHROUGH", "SAFE_SOFTMAX", "SOFTMAX", "PRODUCTS", "is_call", "scalar_value", "tensor_meta",
    "value_users",
]

aten = torch.ops.aten

SAFE_SOFTMAX = {aten._safe_softmax.default}  # 0, not NaN, for a row whose every input is −∞
SOFTMAX = {aten.softmax.int, aten._softmax.default} | SAFE_SOFTMAX
LOG_SOFTMAX = {aten.log_softmax.int, aten._log_softmax.default}
PRODUCTS = {aten.matmul.default, aten.bmm.default, aten.baddbmm.default, aten.einsum.default}
CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default}
# Ops that return their (first) input's values unchanged.
PASSTHROUGH = {aten.clone.default, aten.contiguous.default, aten.alias.default, aten.lift_fresh_copy.default}
DROPOUT = {aten.dropout.default, aten.feature_dropout.default}
MUL = {aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor, aten.mul_.Scalar}
DIV = {aten.div.Tensor, aten.div.Scalar, aten.div_.Tensor, aten.div_.Scalar}
ADD = {aten.add.Tensor, aten.add.Scalar, aten.add_.Tensor, aten.add_.Scalar}
SUB = {aten.sub.Tensor, aten.sub.Scalar, aten.sub_.Tensor, aten.sub_.Scalar}
MASKED_FILL = {aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.masked_fill_.Scalar, aten.masked_fill_.Tensor}
WHERE = {aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar}
TANH = {aten.tanh.default}
EXP = {aten.exp.default}
SDPA = {aten.scaled_dot_product_attention.default}
TRANSPOSE = {aten.transpose.int}
PERMUTE = {aten.permute.default}
REPEAT_INTERLEAVE = {aten.repeat_interleave.self_int}
EXPAND = {aten.expand.default}
UNSQUEEZE = {aten.unsqueeze.default}
RESHAPE = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}
# In-place forms (`scores += bias`): fine on the score path when the scores are what they mutate.
IN_PLACE = {aten.mul_.Tensor, aten.mul_.Scalar, aten.div_.Tensor, aten.div_.Scalar, aten.add_.Tensor,
            aten.add_.Scalar, aten.sub_.Tensor, aten.sub_.Scalar, aten.masked_fill_.Scalar,
            aten.masked_fill_.Tensor}
# Users that only observe a value (exporter assertions) and never consume it.
OBSERVERS = {aten._assert_tensor_metadata.default, aten.sym_constrain_range_for_size.default}


def is_call(node, targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def value_users(node: Node) -> list[Node]:
    """Users that consume the value: not exporter assertions, nor `x.type_as(node)` (dtype only)."""
    return [
        user for user in node.users
        if not is_call(user, OBSERVERS) and not (user.target is aten.type_as.default and user.args[0] is not node)
    ]


def tensor_meta(node) -> torch.Tensor | None:
    """The fake tensor export recorded for `node`, if any."""
    value = node.meta.get("val") if isinstance(node, Node) else None
    return value if isinstance(value, torch.Tensor) else None


def scalar_value(arg) -> float | None:
    """A Python number, or None when `arg` is not a plain numeric literal."""
    if isinstance(arg, bool) or not isinstance(arg, numbers.Number):
        return None
    return float(arg)
