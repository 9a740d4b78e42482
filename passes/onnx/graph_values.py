"""The ONNX operators the attention passes reason about, and small questions about one value.

Models reach the passes as `onnx_ir` graphs from any exporter: constants may be initializers,
`Constant` nodes or values with a `const_value`; casts and identities sit anywhere. This module is
the one place that knows op names, attribute defaults and how to read a constant.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

__all__ = ["FLOAT_TYPES", "attribute", "const_array", "is_op", "producer_op", "value_consumers"]

FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


def is_op(node: ir.Node | None, *op_types: str, domain: str = "") -> bool:
    if node is None or node.op_type not in op_types:
        return False
    return node.domain in ("", "ai.onnx") if domain == "" else node.domain == domain


def producer_op(value: ir.Value | None, *op_types: str, domain: str = "") -> ir.Node | None:
    """The node that produced `value` when its op is one of `op_types`, else None."""
    node = value.producer() if value is not None else None
    return node if is_op(node, *op_types, domain=domain) else None


def attribute(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def value_consumers(value: ir.Value) -> list[ir.Node]:
    """The distinct nodes that read `value` (a graph output counts as a consumer named None)."""
    consumers = list(dict.fromkeys(value.consumers()))
    return consumers + [None] * value.is_graph_output()


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's contents when it is an initializer, a `Constant` output or otherwise constant."""
    if value is None:
        return None
    if value.const_value is not None and not value.is_graph_input():
        return value.const_value.numpy()
    node = value.producer()
    if not is_op(node, "Constant"):
        return None
    for name, attr in node.attributes.items():
        if name == "value":
            return attr.value.numpy()
        if name in ("value_float", "value_int"):
            return np.array(attr.value, dtype=np.float32 if name == "value_float" else np.int64)
        if name in ("value_floats", "value_ints"):
            return np.array(list(attr.value), dtype=np.float32 if name == "value_floats" else np.int64)
    return None
