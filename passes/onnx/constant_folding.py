"""Values that depend on no graph input except through shapes, evaluated at chosen shapes.

A scale computed as ``1/sqrt(Shape(v)[-1])`` (TorchScript export), a causal mask built from
``Range``/``Trilu``/a sliced buffer and ``Shape(input_ids)``: these depend only on shapes. Evaluating
them is how a scale is proven constant and a mask is *proven* causal, instead of guessing from the
ops that built it. ``Shape`` nodes are answered from `ShapeFacts` under an assignment of the free
symbols; every other node runs on ONNX's reference evaluator, one node at a time. Without an
assignment, symbolic dims travel through shape arithmetic (Slice, Gather, Concat, …) as opaque
placeholders, so ``Shape(v)[-1:]`` of a ``(batch, heads, seq, 16)`` value folds to 16 exactly.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
from onnx.reference import ReferenceEvaluator

from passes.onnx.graph_values import attribute, const_array
from passes.onnx.shape_facts import ShapeFacts

__all__ = ["ShapeOnlyFolder", "run_node"]

logger = logging.getLogger(__name__)

_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                     "Bernoulli"}
_SYMBOLIC_OPS = {"Slice", "Gather", "Concat", "Squeeze", "Unsqueeze", "Identity", "Cast", "Reshape", "Mul"}


class _Symbol:
    """A dim whose value is not known (`name`: its symbolic name, if any); moved, never computed with."""

    def __init__(self, name: str | None = None):
        self.name = name

    def __repr__(self) -> str:
        return self.name or "?"


def _has_symbols(array: np.ndarray) -> bool:
    return array.dtype == object and any(isinstance(x, _Symbol) for x in array.flat)


class ShapeOnlyFolder:
    """Evaluates shape-only values of one model; results are cached per assignment."""

    def __init__(self, facts: ShapeFacts, opsets: dict[str, int]):
        self.facts = facts
        self.opsets = dict(opsets)
        self._shape_only: dict[ir.Value, bool] = {}
        self._cache: dict[tuple, dict[ir.Value, np.ndarray | None]] = {}

    def depends_only_on_shapes(self, value: ir.Value | None) -> bool:
        """True when `value` reads no graph input (or loop state) except through Shape/Size."""
        if value is None:
            return True
        if value in self._shape_only:
            return self._shape_only[value]
        self._shape_only[value] = False  # guards against cycles
        node = value.producer()
        if const_array(value) is not None:
            result = True
        elif node is None or node.op_type in _NONDETERMINISTIC or node.domain not in ("", "ai.onnx"):
            result = False
        elif node.op_type in ("Shape", "Size"):
            result = True
        elif any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values()):
            result = False
        else:
            result = all(self.depends_only_on_shapes(x) for x in node.inputs)
        self._shape_only[value] = result
        return result

    def evaluate(self, value: ir.Value, assignment: dict[str, int] | None = None) -> np.ndarray | None:
        """The value as a numpy array (None when it depends on inputs or on unknown dims)."""
        if not self.depends_only_on_shapes(value):
            return None
        cache = self._cache.setdefault(tuple(sorted((assignment or {}).items())), {})
        result = self._evaluate(value, assignment, cache)
        return None if result is None or _has_symbols(result) else result

    def shape_vector(self, value: ir.Value) -> list | None:
        """A 1-D int64 shape value as dims (int, symbol name, or None), without an assignment."""
        if not self.depends_only_on_shapes(value):
            return None
        result = self._evaluate(value, None, self._cache.setdefault((), {}))
        if result is None or result.ndim != 1:
            return None
        return [x.name if isinstance(x, _Symbol) else int(x) for x in result.tolist()]

    def scalar(self, value: ir.Value | None) -> float | None:
        """A one-element numeric value that depends on no input (static shapes allowed)."""
        if value is None:
            return None
        array = self.evaluate(value)
        if array is None or array.size != 1 or array.dtype == np.bool_:
            return None
        return float(array.reshape(()))

    def _evaluate(self, value, assignment, cache) -> np.ndarray | None:
        if value in cache:
            return cache[value]
        constant = const_array(value)
        if constant is not None:
            cache[value] = constant
            return constant
        node = value.producer()
        cache[value] = None  # guards against cycles
        if node is None:
            return None
        if node.op_type in ("Shape", "Size"):
            result = self._shape_of(node, assignment)
        else:
            inputs = [None if x is None else self._evaluate(x, assignment, cache) for x in node.inputs]
            if any(arr is None for arr, x in zip(inputs, node.inputs) if x is not None):
                result = None
            elif any(arr is not None and _has_symbols(arr) for arr in inputs):
                result = _symbolic(node, inputs, value)
                if result is not None and not _has_symbols(result):
                    result = np.asarray(result.tolist(), dtype=np.int64)
            else:
                result = self._run(node, inputs, value)
        cache[value] = result
        return result

    def _shape_of(self, node: ir.Node, assignment) -> np.ndarray | None:
        dims = self.facts.dims(node.inputs[0])
        if dims is None:
            return None
        values = [self.facts.resolve(dim, assignment) for dim in dims]
        if node.op_type == "Size":
            return None if None in values else np.array(int(np.prod(values)), dtype=np.int64)
        rank = len(values)
        start, end = attribute(node, "start", 0), attribute(node, "end", rank)
        start, end = (max(0, min(rank, x + rank if x < 0 else x)) for x in (start, end))
        chosen = values[start:end]
        if None not in chosen:
            return np.array(chosen, dtype=np.int64)
        names = dims[start:end]
        return np.array([_Symbol(n if isinstance(n, str) else None) if x is None else x
                         for x, n in zip(chosen, names)], dtype=object)

    def _run(self, node: ir.Node, inputs: list, value: ir.Value) -> np.ndarray | None:
        outputs = run_node(node, inputs, self.opsets)
        return None if outputs is None else outputs[list(node.outputs).index(value)]


def run_node(node: ir.Node, inputs: list, opsets: dict[str, int]) -> list[np.ndarray] | None:
    """`node`'s outputs on ONNX's reference evaluator from `inputs` (arrays, None for an absent input),
    or None when the evaluator cannot run it."""
    proto = ir.serde.serialize_node(node)
    feeds = {name: arr for name, arr in zip(proto.input, inputs) if name}
    try:
        outputs = ReferenceEvaluator(proto, opsets=opsets).run(None, feeds)
    except Exception as error:  # noqa: BLE001 - an op we cannot evaluate leaves the value unknown
        logger.debug("cannot evaluate %s (%s): %s", node.name, node.op_type, error)
        return None
    return [np.asarray(output) for output in outputs]


def _symbolic(node: ir.Node, inputs: list, value: ir.Value) -> np.ndarray | None:
    """Shape arithmetic on arrays holding unknown dims; anything else is unknown."""
    if node.op_type not in _SYMBOLIC_OPS or list(node.outputs).index(value) != 0:
        return None
    result = _symbolic_op(node, inputs)
    return None if result is None else np.asarray(result, dtype=object)


def _symbolic_product(left, right) -> np.ndarray:
    """Elementwise products; one with an unknown factor is a symbol named by the product expression
    (``(b)*(4)``: HF's ``batch_size * num_heads``), or unnamed when a factor has no name."""
    left, right = np.broadcast_arrays(np.asarray(left, dtype=object), np.asarray(right, dtype=object))
    products = []
    for first, second in zip(left.flat, right.flat):
        if isinstance(first, _Symbol) or isinstance(second, _Symbol):
            names = [x.name if isinstance(x, _Symbol) else str(int(x)) for x in (first, second)]
            products.append(_Symbol(None if None in names else f"({names[0]})*({names[1]})"))
        else:
            products.append(first * second)
    return np.array(products, dtype=object).reshape(left.shape)


def _symbolic_op(node: ir.Node, inputs: list):
    data, rest = inputs[0], inputs[1:]
    if node.op_type == "Mul":
        return _symbolic_product(data, rest[0])
    if any(arr is not None and _has_symbols(arr) for arr in rest) and node.op_type != "Concat":
        return None
    try:
        if node.op_type in ("Identity", "Cast"):
            to = attribute(node, "to")
            return data if node.op_type == "Identity" or to in (ir.DataType.INT64, ir.DataType.INT32) else None
        if node.op_type == "Concat":
            return np.concatenate([np.asarray(x, dtype=object) for x in inputs], axis=attribute(node, "axis"))
        if node.op_type == "Gather":
            return np.take(data, rest[0].astype(np.int64), axis=attribute(node, "axis", 0))
        if node.op_type == "Reshape":
            return data.reshape(tuple(int(x) for x in rest[0])) if data.size <= 1 or rest[0].size <= 1 else None
        if node.op_type == "Unsqueeze":
            axes = rest[0] if rest else attribute(node, "axes")
            return np.expand_dims(data, tuple(int(a) for a in axes))
        if node.op_type == "Squeeze":
            axes = rest[0] if rest else attribute(node, "axes")
            return np.squeeze(data, None if axes is None else tuple(int(a) for a in axes))
        return _slice(data, *rest, node=node)
    except (ValueError, IndexError, TypeError):
        return None


def _slice(data, starts=None, ends=None, axes=None, steps=None, *, node) -> np.ndarray | None:
    if starts is None:  # opset < 10 keeps them as attributes
        starts, ends, axes = attribute(node, "starts"), attribute(node, "ends"), attribute(node, "axes")
    if data.ndim != 1 or (axes is not None and [int(a) for a in axes] not in ([0], [-1])):
        return None
    step = 1 if steps is None else int(steps[0])
    return data[slice(*_clamp(int(starts[0]), int(ends[0]), step, len(data)), step)]


def _clamp(start: int, end: int, step: int, size: int) -> tuple[int, int]:
    return slice(start, end, step).indices(size)[:2]
