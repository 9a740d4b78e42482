"""Symbolic shapes of every value in a model, read without changing the model.

Exporters annotate few intermediate shapes (the TorchScript exporter almost none), so the model is
shape-inferred on a copy: ONNX Runtime's symbolic shape inference when it succeeds (it follows
Shape → Gather → Concat → Reshape arithmetic), else ONNX's own inference with data propagation.
A dim is an int, a symbol or expression string (``"seq"``, ``"2*seq"``), or None when unknown.
Two dims are known equal only when both are the same int or the same string.

Free symbols are the names used in the main graph's input shapes; an `assignment` gives them values
(`resolve` then evaluates expression dims such as ``"seq + 1"``); any other name stays unknown.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import logging
import math
import operator
import os
import re

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_ir as ir

__all__ = ["Dim", "ShapeFacts"]

logger = logging.getLogger(__name__)

Dim = int | str | None
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Div: operator.truediv, ast.Mod: operator.mod}
_CALLS = {"floor": math.floor, "ceil": math.ceil, "Max": max, "Min": min, "max": max, "min": min,
          "FloorDiv": operator.floordiv, "CeilDiv": lambda a, b: -(-a // b)}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


_WEIGHT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
_WEIGHT_ELEMENTS = 4096


def _without_weights(proto: onnx.ModelProto) -> None:
    """Turn large float initializers of the copy into typed inputs: inference needs their shapes only,
    and a model over 2 GiB cannot be handed to shape inference at all."""
    graph = proto.graph
    inputs = {info.name for info in graph.input}
    kept = []
    for init in graph.initializer:
        if init.data_type in _WEIGHT_TYPES and int(np.prod(init.dims)) >= _WEIGHT_ELEMENTS:
            if init.name not in inputs:
                graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            kept.append(init)
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _vector_axes(proto: onnx.ModelProto) -> None:
    """Give (Un)Squeeze 1-D axes where the copy has 0-d ones: ORT's symbolic inference needs 1-D."""
    initializers = {init.name: init for init in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type not in ("Squeeze", "Unsqueeze") or len(node.input) < 2:
            continue
        axes = initializers.get(node.input[1])
        if axes is not None and len(axes.dims) == 0:
            vector = onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(axes).reshape(1), f"{axes.name}__vector")
            proto.graph.initializer.append(vector)
            initializers[vector.name] = vector
            node.input[1] = vector.name


@functools.cache
def _symbolic_shape_inference():
    """ONNX Runtime's `SymbolicShapeInference`, loaded from its file: importing it as
    `onnxruntime.tools.symbolic_shape_infer` runs `onnxruntime/tools/__init__.py`, which imports
    torch (seconds) whenever torch is installed, and ONNX-only commands need no torch."""
    package = importlib.util.find_spec("onnxruntime")
    if package is None or package.origin is None:
        raise ModuleNotFoundError("onnxruntime is not installed", name="onnxruntime")
    path = os.path.join(os.path.dirname(package.origin), "tools", "symbolic_shape_infer.py")
    spec = importlib.util.spec_from_file_location("_rewriter_ort_symbolic_shape_infer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SymbolicShapeInference


def _infer(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    _without_weights(proto)
    try:
        _vector_axes(proto)
        return _symbolic_shape_inference().infer_shapes(proto, auto_merge=True)
    except Exception as error:  # noqa: BLE001 - any failure falls back to ONNX's inference
        logger.debug("symbolic shape inference failed (%s); using onnx shape inference", error)
    try:
        return onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as error:  # noqa: BLE001
        logger.debug("onnx shape inference failed: %s", error)
        return None


def _proto_dims(type_proto: onnx.TypeProto) -> tuple[tuple[Dim, ...] | None, int | None]:
    if not type_proto.HasField("tensor_type"):
        return None, None
    tensor = type_proto.tensor_type
    elem = tensor.elem_type or None
    if not tensor.HasField("shape"):
        return None, elem
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim)
    return dims, elem


def _graph_value_infos(graph: onnx.GraphProto):
    yield from list(graph.input) + list(graph.output) + list(graph.value_info)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graph_value_infos(attr.g)
            for sub in attr.graphs:
                yield from _graph_value_infos(sub)


class ShapeFacts:
    """Dims and element types by value name, from an inferred copy of the model."""

    def __init__(self, model: ir.Model):
        self._dims: dict[str, tuple[Dim, ...]] = {}
        self._types: dict[str, ir.DataType] = {}
        inferred = _infer(ir.serde.serialize_model(model))
        if inferred is not None:
            for info in _graph_value_infos(inferred.graph):
                dims, elem = _proto_dims(info.type)
                if dims is not None:
                    self._dims[info.name] = dims
                if elem:
                    self._types[info.name] = ir.DataType(elem)
        self.free_symbols: list[str] = []
        for value in model.graph.inputs:
            for dim in self.dims(value) or ():
                if isinstance(dim, str) and _IDENTIFIER.fullmatch(dim) and dim not in self.free_symbols:
                    self.free_symbols.append(dim)

    def dims(self, value: ir.Value | None) -> tuple[Dim, ...] | None:
        if value is None:
            return None
        own = None
        if value.shape is not None:
            own = tuple(d if isinstance(d, int) else d.value for d in value.shape)
        inferred = self._dims.get(value.name) if value.name else None
        if own is None or inferred is None or len(own) != len(inferred):
            return own if own is not None else inferred
        return tuple(a if isinstance(a, int) or (b is None and a is not None) else b for a, b in zip(own, inferred))

    def rank(self, value: ir.Value | None) -> int | None:
        dims = self.dims(value)
        return None if dims is None else len(dims)

    def dtype(self, value: ir.Value | None) -> ir.DataType | None:
        if value is None:
            return None
        if value.dtype is not None:
            return value.dtype
        return self._types.get(value.name)

    @staticmethod
    def same(a: Dim, b: Dim) -> bool:
        return a is not None and a == b

    def resolve(self, dim: Dim, assignment: dict[str, int] | None) -> int | None:
        """The dim's value under `assignment` (free symbol → int), or None when unknown."""
        if isinstance(dim, int) or dim is None:
            return dim
        if not assignment:
            return None
        try:
            result = _evaluate(ast.parse(dim, mode="eval").body, assignment)
        except (SyntaxError, KeyError, TypeError, ValueError, ZeroDivisionError):
            return None
        return int(result) if result is not None and float(result).is_integer() else None


def _evaluate(node: ast.AST, names: dict[str, int]):
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name):
        return names[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand, names)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_evaluate(node.left, names), _evaluate(node.right, names))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _CALLS:
        return _CALLS[node.func.id](*(_evaluate(arg, names) for arg in node.args))
    raise ValueError(f"unsupported dim expression {ast.dump(node)}")
