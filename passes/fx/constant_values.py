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

__all__ = ["constant_value", "scalar_constant", "causal_offset_of_keep_mask", "causal_offset_of_bias"]


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


def _tril(query_len: int, key_len: int, offset: int, device) -> torch.Tensor:
    return torch.ones(query_len, key_len, dtype=torch.bool, device=device).tril(offset)


def causal_offset_of_keep_mask(keep: torch.Tensor, query_len: int, key_len: int) -> int | None:
    """`o` when `keep` (broadcast over leading axes) is exactly `key ≤ query + o`, else None."""
    if keep.dtype != torch.bool or keep.dim() < 2 or tuple(keep.shape[-2:]) != (query_len, key_len):
        return None
    if any(size != 1 for size in keep.shape[:-2]):
        return None
    keep = keep.reshape(query_len, key_len)
    offset = int(keep[-1].sum()) - query_len
    return offset if torch.equal(keep, _tril(query_len, key_len, offset, keep.device)) else None


def causal_offset_of_bias(bias: torch.Tensor, query_len: int, key_len: int) -> tuple[int, float] | None:
    """(offset, fill) when `bias` is 0 on and below a causal diagonal and one constant fill above."""
    if not bias.dtype.is_floating_point or bias.dim() < 2:
        return None
    if tuple(bias.shape[-2:]) != (query_len, key_len) or any(size != 1 for size in bias.shape[:-2]):
        return None
    bias = bias.reshape(query_len, key_len)
    offset = causal_offset_of_keep_mask(bias == 0, query_len, key_len)
    if offset is None:
        return None
    hidden = bias[~_tril(query_len, key_len, offset, bias.device)]
    if hidden.numel() == 0:
        return None
    fill = float(hidden[0])
    if not (fill < 0 and bool((hidden == fill).all())) or math.isnan(fill):
        return None
    return offset, fill
