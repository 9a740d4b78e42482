"""Static estimate of an ONNX model's peak live activation bytes at chosen dimension sizes.

Symbolic input dims are bound to sizes; shapes are then inferred with ONNX shape inference (with
data propagation) and, node by node, with integer shape arithmetic folded (`shape_arithmetic`), so
intermediate shapes become concrete. A liveness sweep over the nodes in topological order (onnx-ir's stable sort) sums the
bytes alive at each node: a value lives from its producer to its last consumer, a graph output to
the end. Only activations count: graph inputs, initializers and Constant outputs do not.

    bytes │        ┌┐ ← a node with subgraphs (Loop/Scan body, If branches): the live set at
          │   ┌──┐ ││   its step plus the largest subgraph peak (sized the same way, recursively)
          │ ┌─┘  └─┘└─┐
          └─┴─────────┴──→ nodes in topological order

Loop bodies are sized at their first iteration: the iteration number is pinned to 0, loop-carried
inputs take the shapes of their initial values, and scan outputs are trip count × one iteration's
value, so a chunked-attention Loop counts one block, never n × n. Values whose size stays unknown
count 0 and are reported in `MemoryEstimate.unknown_values`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from passes.onnx.graph_values import const_array
from rewriter.tools.shape_arithmetic import fold_shape_arithmetic

__all__ = ["MemoryEstimate", "estimate_peak_activation_bytes", "format_bytes", "sequence_dims", "symbolic_input_dims"]

logger = logging.getLogger(__name__)

_SEQUENCE_WORDS = ("seq", "len", "tokens")  # "sequence", "q_len", "kv_length", "num_tokens", ...
_MAX_ROUNDS = 8  # a round sizes one more step into nested loops (chunked attention needs 4)
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak live activation bytes, the node where the peak occurs, values of unknown size."""

    peak_bytes: int
    peak_node: str | None
    unknown_values: int

    def __str__(self) -> str:
        where = f" at {self.peak_node}" if self.peak_node else ""
        return f"{format_bytes(self.peak_bytes)}{where} ({self.unknown_values} values of unknown size)"


def format_bytes(n: int) -> str:
    """Human-readable binary size: '512 B', '12.3 MiB', '4.0 GiB'."""
    if abs(n) < 1024:
        return f"{n} B"
    exponent = min(int(math.log(abs(n), 1024)), len(_UNITS) - 1)
    return f"{n / 1024**exponent:.1f} {_UNITS[exponent]}"


def sequence_dims(model: onnx.ModelProto, length: int, attention_symbols=()) -> dict[str, int]:
    """Map to `length` every symbolic input dim in `attention_symbols` (the query/key lengths of attention
    blocks, as `passes.onnx.sequence_symbols` proves them) and every one whose name looks like a sequence
    length (seq, len, tokens); attention symbols first, then the others in sorted order."""
    named = {dim.dim_param for dim in _input_dims(model)
             if any(word in dim.dim_param.lower() for word in _SEQUENCE_WORDS)}
    return dict.fromkeys([*attention_symbols, *sorted(named - set(attention_symbols))], length)


def symbolic_input_dims(model: onnx.ModelProto) -> list[str]:
    """The names of the model's symbolic input dims, in input order."""
    return list(dict.fromkeys(dim.dim_param for dim in _input_dims(model)))


def _input_dims(model: onnx.ModelProto) -> Iterator[onnx.TensorShapeProto.Dimension]:
    for value in model.graph.input:
        yield from (dim for dim in value.type.tensor_type.shape.dim if dim.dim_param)


def estimate_peak_activation_bytes(
    model: onnx.ModelProto, dims: Mapping[str, int] | None = None, default_dim: int = 1
) -> MemoryEstimate:
    """Peak live activation bytes of `model` with symbolic input dims bound by name.

    A dim named in `dims` takes that size, any other symbolic dim `default_dim`. `model` is not
    modified.
    """
    work = ir.from_proto(model)
    try:
        work.graph.sort()  # shape inference and the sweep read nodes in order; a sorted graph stays as it is
    except ValueError as error:
        raise ValueError("the ONNX graph has a cycle") from error
    _bind_inputs(work.graph, dims or {}, default_dim)
    _pin_first_iteration(work.graph)
    work = _infer_shapes(work)
    for _ in range(_MAX_ROUNDS):
        fold_shape_arithmetic(work)
        if not _seed_loop_shapes(work.graph):
            break
    unknown: set[ir.Value] = set()
    peak, node = _graph_peak(work.graph, unknown, count_inputs=False)
    if unknown:
        logger.debug("%d values of unknown size, e.g. %s", len(unknown), sorted(v.name or "" for v in unknown)[:5])
    logger.debug("peak activation %s at %s", format_bytes(peak), node)
    return MemoryEstimate(peak, node, len(unknown))


def _bind_inputs(graph: ir.Graph, dims: Mapping[str, int], default_dim: int) -> None:
    names = {d.value for v in graph.inputs for d in (v.shape or ()) if not isinstance(d, int)}
    if set(dims) - names:
        logger.warning("no input dims named %s (symbolic dims: %s)", sorted(set(dims) - names), sorted(map(str, names)))
    for value in graph.inputs:
        if value.shape is not None:
            value.shape = ir.Shape([d if isinstance(d, int) else dims.get(d.value, default_dim) for d in value.shape])
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for value in node.outputs:  # exporters' symbolic shapes would only hide what inference finds
            if value.shape is not None and not value.shape.is_static():
                value.shape = None


def _pin_first_iteration(graph: ir.Graph) -> None:
    """Replace each Loop body's iteration number by 0, so slices of it fold to one block."""
    for node in [n for n in ir.traversal.RecursiveGraphIterator(graph) if _is_default_domain(n, "Loop")]:
        body = node.attributes["body"].as_graph()
        if body.inputs and body.inputs[0].uses():
            zero = ir.node("Constant", [], {"value": ir.tensor(np.array(0, dtype=np.int64))})
            body.insert_before(body[0], zero)
            body.inputs[0].replace_all_uses_with(zero.outputs[0])


def _infer_shapes(model: ir.Model) -> ir.Model:
    try:
        return ir.from_proto(onnx.shape_inference.infer_shapes(ir.to_proto(model), data_prop=True))
    except (onnx.shape_inference.InferenceError, ValueError) as error:
        logger.warning("ONNX shape inference failed (%s); sizing from folded shapes only", error)
        return model


def _seed_loop_shapes(graph: ir.Graph) -> bool:
    """Give Loop bodies and outputs their first iteration's shapes, If outputs their branches' shape.

    True if any shape changed. Shapes the folder cannot infer node by node: it has no subgraph context.
    """
    changed = False
    for node in [n for n in ir.traversal.RecursiveGraphIterator(graph) if _is_default_domain(n, "If")]:
        branches = [g.outputs for g in _subgraphs(node)]
        for out, *shapes in zip(node.outputs, *(tuple(v.shape for v in outs) for outs in branches)):
            if len(set(map(str, shapes))) == 1:  # both branches agree
                changed |= _adopt_shape(out, shapes[0])
    for node in [n for n in ir.traversal.RecursiveGraphIterator(graph) if _is_default_domain(n, "Loop")]:
        body = node.attributes["body"].as_graph()
        initial, carried_out = node.inputs[2:], body.outputs[1:len(node.inputs) - 1]
        for start, inner in zip(initial, body.inputs[2:]):
            changed |= _adopt_shape(inner, start.shape if start is not None else None)
        for start, inner, final in zip(initial, carried_out, node.outputs):
            if start is not None and inner.shape == start.shape:  # carried shape is stable
                changed |= _adopt_shape(final, start.shape)
        trips = _exact_trip_count(node)
        for per_iteration, stacked in zip(body.outputs[len(node.inputs) - 1:], node.outputs[len(initial):]):
            if trips is not None and per_iteration.shape is not None:
                changed |= _adopt_shape(stacked, ir.Shape([trips, *per_iteration.shape]))
    return changed


def _exact_trip_count(loop: ir.Node) -> int | None:
    """The constant trip count M of a Loop without a condition input (else it may stop early)."""
    if len(loop.inputs) < 2 or loop.inputs[0] is None or loop.inputs[1] is not None:
        return None
    trips = const_array(loop.inputs[0])
    return None if trips is None or trips.size != 1 else int(trips.reshape(-1)[0])


def _adopt_shape(value: ir.Value, shape: ir.Shape | None) -> bool:
    if shape is None or not shape.is_static() or value.shape == shape:
        return False
    value.shape = ir.Shape(list(shape))
    return True


def _is_default_domain(node: ir.Node, op_type: str) -> bool:
    return node.op_type == op_type and node.domain in ("", "ai.onnx")


def _subgraphs(node: ir.Node) -> Iterator[ir.Graph]:
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            yield attr.as_graph()
        elif attr.type == ir.AttributeType.GRAPHS:
            yield from attr.as_graphs()


def _reads(node: ir.Node) -> Iterator[ir.Value]:
    """The node's inputs and the outer values its subgraphs use (consumed at this node's step)."""
    yield from (v for v in node.inputs if v is not None)
    for graph in _subgraphs(node):
        for inner in ir.traversal.RecursiveGraphIterator(graph):
            yield from (v for v in inner.inputs if v is not None)


def _value_bytes(value: ir.Value, unknown: set[ir.Value]) -> int:
    dtype, shape = value.dtype, value.shape
    if (not isinstance(value.type, ir.TensorType) or dtype in (None, ir.DataType.STRING, ir.DataType.UNDEFINED)
            or shape is None or not shape.is_static()):
        unknown.add(value)
        return 0
    return math.ceil(math.prod(shape.numpy()) * dtype.itemsize)


def _graph_peak(graph: ir.Graph, unknown: set[ir.Value], *, count_inputs: bool) -> tuple[int, str | None]:
    """(peak bytes, node name) of one graph; subgraph inputs (loop-carried state) count too."""
    nodes = list(graph)
    producer = {v: i for i, node in enumerate(nodes) for v in node.outputs if v.name and node.op_type != "Constant"}
    consumers: dict[ir.Value, set[int]] = {}
    for i, node in enumerate(nodes):
        for value in _reads(node):
            consumers.setdefault(value, set()).add(i)
    outputs, last = set(graph.outputs), len(nodes) - 1
    delta = [0] * (len(nodes) + 1)
    counted = [*producer, *(graph.inputs if count_inputs else ())]
    for value in counted:
        start = producer.get(value, 0)
        end = last if value in outputs else max(consumers.get(value, ()), default=start)
        size = _value_bytes(value, unknown)
        delta[start] += size
        delta[end + 1] -= size
    live, peak, peak_node = 0, 0, None
    for i in range(len(nodes)):
        live += delta[i]
        inner, inner_node = max((_graph_peak(g, unknown, count_inputs=True) for g in _subgraphs(nodes[i])),
                                default=(0, None), key=lambda found: found[0])
        if live + inner > peak or peak_node is None:
            name = nodes[i].name or f"{nodes[i].op_type}_{i}"
            peak, peak_node = live + inner, f"{name} > {inner_node}" if inner_node else name
    return peak, peak_node
