"""Values in an FX graph that do not depend on the graph's inputs, and what they prove.

Masks built from buffers, `tril`/`triu`, `arange` comparisons or `full` tensors depend only on
shapes known at export time; evaluating them is how a causal mask is *proven* causal (instead of
guessing from the ops that built it).
"""

from __future__ import annotations

import math
import operator

import torch
from torch.fx import GraphModule, Node

from passes.fx.aten_vocabulary import scalar_value

__all__ = ["constant_value", "scalar_constant"]


def _ancestors_are_constant(gm: GraphModule, node: Node, seen: dict[Node, bool]) -> bool:
    if node in seen:
        return seen[node]
    if node.op == "placeholder":
        result = False
    elif node.op == "get_attr":
        # Buffers and lifted literals are constants; a parameter is trained and updated, never one.
        result = not isinstance(operator.attrgetter(node.target)(gm), torch.nn.Parameter)
    elif node.op == "call_function":
        seen[node] = False  # guards against cycles; fx graphs have none
        result = all(_ancestors_are_constant(gm, arg, seen) for arg in node.all_input_nodes)
    else:
        result = False
    seen[node] = result
    return result


def constant_value(gm: GraphModule, node) -> torch.Tensor | float | None:
    """The value of `node` when it depends on no graph input and no parameter, else None."""
    if not isinstance(node, Node):
        return node
    if not _ancestors_are_constant(gm, node, {}):
        return None
    values: dict[Node, object] = {}

    def evaluate(current: Node):
        if current not in values:
            if current.op == "get_attr":
                values[current] = operator.attrgetter(current.target)(gm)
            else:
                args = torch.fx.node.map_arg(current.args, evaluate)
                kwargs = torch.fx.node.map_arg(current.kwargs, evaluate)
                values[current] = current.target(*args, **kwargs)
        return values[current]

    with torch.no_grad():
        return evaluate(node)


def scalar_constant(gm: GraphModule, arg) -> float | None:
    """A number, or a one-element tensor that depends on no input and no parameter; else None."""
    number = scalar_value(arg)
    if number is not None:
        return number
    value = constant_value(gm, arg) if isinstance(arg, Node) else None
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype.is_floating_point:
        return float(value.item())
    return None
