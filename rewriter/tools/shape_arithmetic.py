"""Shapes inside an ONNX model's shape arithmetic and Loop bodies, for the memory estimate.

ONNX shape inference sizes a ``Slice``, ``Reshape`` or ``Expand`` only when the integer tensors that
give its bounds are known. In exported models and in the chunked-attention Loop those integers are
computed from ``Shape`` (``start = i · block``, ``end = min(start + block, n)``), and whole-model
inference does not read the ``Constant`` values of a Loop body. Once the model's input dims are bound,
`fold_shape_arithmetic` walks every node in graph order (subgraphs included) and

- infers the node's output shapes on its own (``onnx.shape_inference.infer_node_outputs``, from its
  inputs' shapes and constant inputs), and
- replaces it by ``Constant`` nodes when all its outputs are int32/int64 and computable: ``Shape``
  and ``Size`` from their input's static shape, any other default-domain op on ONNX's reference
  evaluator. Only small ones (at most 8192 elements per input and 512 × 512 per output,
  onnxscript's constant-folding defaults): an index tensor as long as the sequence stays an
  activation.

This is what ``onnxscript.optimizer.fold_constants(onnx_shape_inference=True)`` did for the estimate,
with the same figures (tests/test_memory_estimate.py compares them), without importing onnxscript,
which costs a sixth of a second of every `rewriter inspect`.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_ir as ir

from passes.onnx.constant_folding import run_node
from passes.onnx.graph_values import const_array

__all__ = ["fold_shape_arithmetic"]

logger = logging.getLogger(__name__)

_INDEX_TYPES = frozenset({ir.DataType.INT64, ir.DataType.INT32})
_INPUT_LIMIT, _OUTPUT_LIMIT = 8192, 512 * 512  # elements; onnxscript's DEFAULT_CONSTANT_FOLD_*_SIZE_LIMIT
_RANDOM = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                     "Bernoulli"})


def fold_shape_arithmetic(model: ir.Model) -> bool:
    """Replace each foldable integer node of `model` (its subgraphs included) by ``Constant`` nodes.

    Nodes are visited in graph order, so a chain folds in one call when its start is known. Returns
    True if any node was replaced.
    """
    opsets = dict(model.opset_imports)
    changed = False
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        changed |= _infer_outputs(node, opsets)
        arrays = _evaluate(node, opsets)
        if arrays is None:
            continue
        constants = [ir.node("Constant", [], {"value": ir.tensor(array)}, name=f"{node.name}_folded{i}")
                     for i, array in enumerate(arrays)]
        ir.convenience.replace_nodes_and_values(node.graph, node, [node], constants, list(node.outputs),
                                                [constant.outputs[0] for constant in constants])
        changed = True
    return changed


def _infer_outputs(node: ir.Node, opsets: dict[str, int]) -> bool:
    """Give the node's outputs the shapes ONNX's inference of this one node finds from its inputs' shapes
    and constant inputs; True if any output's shape became static. Whole-model inference cannot do this
    inside a Loop body, where it does not read the body's ``Constant`` values."""
    if (all(v.shape is not None and v.shape.is_static() for v in node.outputs) or node.domain not in ("", "ai.onnx")
            or any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values())):
        return False
    types, data = {}, {}
    for value in (x for x in node.inputs if x is not None):
        if value.type is None:
            return False
        types[value.name] = ir.serde.serialize_type(value.type)
        if value.shape is not None:
            ir.serde.serialize_shape_into(types[value.name], value.shape)
        array = const_array(value)
        if array is not None and array.size <= _INPUT_LIMIT:
            data[value.name] = onnx.numpy_helper.from_array(array, value.name)
    try:
        schema = onnx.defs.get_schema(node.op_type, opsets[node.domain], node.domain)
        inferred = onnx.shape_inference.infer_node_outputs(schema, ir.serde.serialize_node(node), types, data)
    except Exception as error:  # noqa: BLE001 - a node inference cannot size stays unknown
        logger.debug("no shape inference for %s (%s): %s", node.name, node.op_type, error)
        return False
    changed = False
    for value in node.outputs:
        if value.name not in inferred:
            continue
        shape = ir.serde.deserialize_type_proto_for_shape(inferred[value.name])
        if shape is not None and shape.is_static():
            value.shape = shape
            value.type = value.type or ir.serde.deserialize_type_proto_for_type(inferred[value.name])
            changed = True
    return changed


def _evaluate(node: ir.Node, opsets: dict[str, int]) -> list[np.ndarray] | None:
    """The node's outputs, when it is small integer arithmetic on known values; else None."""
    if (node.op_type == "Constant" or node.domain not in ("", "ai.onnx") or node.op_type in _RANDOM
            or not node.outputs or not all(v.dtype in _INDEX_TYPES for v in node.outputs)
            or any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values())):
        return None
    if node.op_type in ("Shape", "Size"):
        shape = node.inputs[0].shape if node.inputs and node.inputs[0] is not None else None
        if shape is None or not shape.is_static():
            return None
        # the evaluator reads only the shape: a broadcast scalar holds no memory
        inputs = [np.broadcast_to(np.zeros((), np.float32), tuple(shape.numpy()))]
    else:
        inputs = [None if x is None else const_array(x) for x in node.inputs]
        if any(array is None for array, x in zip(inputs, node.inputs) if x is not None):
            return None
        if any(array is not None and array.size > _INPUT_LIMIT for array in inputs):
            return None
    outputs = run_node(node, inputs, opsets)
    if outputs is None or any(math.prod(array.shape) > _OUTPUT_LIMIT for array in outputs):
        return None
    return [array.astype(value.dtype.numpy()) for array, value in zip(outputs, node.outputs)]
