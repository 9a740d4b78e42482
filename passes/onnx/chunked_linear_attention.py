"""performer-pytorch's chunked causal linear attention in ONNX, proven as one Performer block.

`causal_linear_attention_noncuda(q, k, v, chunk_size)` cuts φ(q), φ(k) and v along the sequence
and continues each chunk's prefix sums from the last row of the previous chunk's::

    φq, φk, v ─ Split(seq) / Slice… ─┬─ chunk 0: CumSum(φk₀), CumSum(φk₀·v₀ᵀ) … Einsum(ctx₀, φq₀, D⁻¹₀) ─┐
                                     ├─ chunk i: Slice(run_{i−1}, −1:) + CumSum(…)  …  out_i ───────── Concat(seq) ─ out
                                     └─ …                                                               ┘

Together that is exactly causal linear attention over the whole sequence, so the whole group,
anchored at its ``Concat``, becomes one candidate. Each chunk is proven like the unchunked causal
block; chunk i's carries must be the last rows (along the sequence) of chunk i−1's running sums, chunk
0 must start from zero, and the chunks must tile the sequence in order: outputs 0, 1, … of one
``Split`` along it, ``SequenceAt(SplitToSequence(x, split), i)`` for i = 0, 1, … (TorchScript) whose
split sizes read by those pieces, evaluated at the model's sizes, are positive and sum to the length,
or ``Slice``s whose bounds, evaluated at the model's sizes, run from 0 to the end without gap or
overlap. (TorchScript writes `chunk(x, 128)` as 128 split sizes whatever the length, the last one
negative when fewer chunks exist, which ONNX Runtime refuses; the pieces the block reads still tile
the sequence, and the replacement reads no split at all.) performer-pytorch adds its ε to every prefix-summed feature
(φ(q)·(Σφ(k) + ε)): the replacement's `key_sum_epsilon`; every chunk must add the same ε. A Concat
of one piece is one only for a causal piece; around a bidirectional product (SelfAttention joining
its global heads to no local heads) it is an identity and the product is the candidate.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from passes.onnx.graph_values import attribute, is_op, producer_op
from passes.onnx.labelled_ops import axes_of, rank_of
from passes.onnx.linear_block import (
    OnnxLinearAttentionMatch,
    finish_block,
    output_product,
    prefix_sum_of,
    reciprocal_of,
    key_sum_epsilon_of,
    two_operand_einsum,
)
from passes.onnx.onnx_match import AnalysisContext, Rejected

__all__ = ["is_chunked_anchor", "match_chunked"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Piece:
    """One chunk: its operands, the carries it continues, and the running sums it leaves."""

    phi_q: ir.Value
    phi_k: ir.Value
    value: ir.Value
    key_carry: ir.Value | None
    context_carry: ir.Value | None
    key_running: ir.Value
    context_running: ir.Value
    nodes: list[ir.Node]
    key_sum_epsilon: float


def is_chunked_anchor(node: ir.Node) -> bool:
    """A Concat of three-operand einsums, the outputs of chunks (one input: only a causal chunk's)."""
    products = [x.producer() if x is not None else None for x in node.inputs]
    if not is_op(node, "Concat") or not products or not all(
            is_op(p, "Einsum") and len(p.inputs) == 3 for p in products):
        return False
    return len(products) > 1 or _prefix_summed(products[0])


def _prefix_summed(einsum: ir.Node) -> bool:
    """The output product's context has one more labelled axis than its output: the query axis."""
    equation = str(einsum.attributes["equation"].value).replace(" ", "").replace("...", "")
    inputs, _, out = equation.partition("->")
    return len(inputs.split(",")[0]) == len(out) + 1


def _running_sum(ctx: AnalysisContext, value: ir.Value, axis: int, what: str, nodes: list[ir.Node]):
    """(x, carry or None, value) for `carry + CumSum(x, axis)` or `CumSum(x, axis)`."""
    carry, summed = None, value
    add = producer_op(value, "Add")
    if add is not None:
        left, right = add.inputs
        summed, carry = (left, right) if producer_op(left, "CumSum") is not None else (right, left)
        if producer_op(carry, "CumSum") is not None and len(summed.uses()) > 1:
            # A one-row previous chunk: its running sum is a CumSum too, and read by that chunk as well.
            summed, carry = carry, summed
        if producer_op(summed, "CumSum") is None:
            raise Rejected(f"{what} is not a carried prefix sum")
        nodes.append(add)
        constant = ctx.folder.scalar(carry)
        if constant is not None and constant != 0.0:
            raise Rejected(f"{what} starts its prefix sum from {constant:g}, not 0")
        carry = None if constant is not None else carry
    return prefix_sum_of(ctx, summed, axis, what, nodes), carry, value


def _piece(ctx: AnalysisContext, anchor: ir.Node) -> _Piece:
    product = output_product(ctx, anchor, "a chunk's output product")
    context, phi_q, d_inv = product.context, product.phi_q, product.d_inv
    batch, n, e, d = product.batch, product.n, product.e, product.d
    seq = len(batch)
    if product.context_labels != batch + n + d + e:
        raise Rejected("a chunk's output is not Einsum(prefix-summed context, φ(q), D⁻¹)")
    nodes = [anchor]
    denominator = reciprocal_of(ctx, d_inv, nodes)
    (dq, key_sum), (dq_lab, ks_lab), dout = two_operand_einsum(ctx, denominator, "a chunk's normaliser")
    nodes.append(denominator.producer())
    if dq is not phi_q or len(dq_lab) != seq + 2 or ks_lab != dq_lab or dout != dq_lab[:-1]:
        raise Rejected("a chunk's normaliser is not φ(q_n)·Σ_{j≤n}φ(k_j)")
    key_sum, key_sum_epsilon = key_sum_epsilon_of(ctx, key_sum, nodes)
    phi_k, key_carry, key_running = _running_sum(ctx, key_sum, seq, "a chunk's key sum", nodes)
    kv, context_carry, context_running = _running_sum(ctx, context, seq, "a chunk's context", nodes)
    (kv_k, value), (k_lab, v_lab), kv_out = two_operand_einsum(ctx, kv, "a chunk's context")
    nodes.append(kv.producer())
    kb, kn, kd, ve = k_lab[:-2], k_lab[-2:-1], k_lab[-1:], v_lab[-1:]
    if kv_k is not phi_k or len(kb) != seq or v_lab != kb + kn + ve or kv_out != kb + kn + kd + ve:
        raise Rejected("a chunk's context is not φ(k_n)·v_nᵀ per key, prefix-summed over the keys")
    return _Piece(phi_q, phi_k, value, key_carry, context_carry, key_running, context_running, nodes, key_sum_epsilon)


def _slice_bounds(ctx: AnalysisContext, node: ir.Node, axis: int, assignment) -> tuple[int, int] | None:
    """(start, end) of a step-1 Slice over `axis` only, clamped to the sliced axis, at `assignment`."""
    rank = rank_of(ctx, node.inputs[0])
    dims = ctx.facts.dims(node.inputs[0])
    if rank is None or dims is None or len(node.inputs) < 4 or axes_of(ctx, node, rank, 3) != {axis}:
        return None
    starts, ends = (ctx.folder.evaluate(x, assignment) for x in node.inputs[1:3])
    steps = ctx.folder.evaluate(node.inputs[4], assignment) if len(node.inputs) > 4 and node.inputs[4] else None
    size = ctx.facts.resolve(dims[axis], assignment)
    if starts is None or ends is None or size is None or (steps is not None and steps.reshape(-1).tolist() != [1]):
        return None
    start, end, _ = slice(int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])).indices(size)
    return start, end


def _sequence_chunks(ctx: AnalysisContext, values: list[ir.Value], axis: int, what: str) -> tuple[ir.Value, list[ir.Node]]:
    """The tensor cut by `SplitToSequence` whose elements 0, 1, … are `values` (via `SequenceAt`)."""
    reads = [producer_op(value, "SequenceAt") for value in values]
    if None in reads or len({node.inputs[0] for node in reads}) != 1:
        raise Rejected(f"the chunks of {what} are not elements of one sequence")
    split = producer_op(reads[0].inputs[0], "SplitToSequence")
    rank = rank_of(ctx, split.inputs[0]) if split is not None else None
    if rank is None or attribute(split, "axis", 0) % rank != axis or not attribute(split, "keepdims", 1):
        raise Rejected(f"{what} is not split to a sequence along the sequence axis")
    for index, node in enumerate(reads):
        position = ctx.folder.evaluate(node.inputs[1])
        if position is None or position.reshape(-1).tolist() != [index]:
            raise Rejected(f"the chunks of {what} are not taken in order")
    size = ctx.facts.dims(split.inputs[0])[axis] if ctx.facts.dims(split.inputs[0]) else None
    for assignment in ctx.assignments:
        sizes = ctx.folder.evaluate(split.inputs[1], assignment) if len(split.inputs) > 1 and split.inputs[1] else None
        length = ctx.facts.resolve(size, assignment)
        if sizes is None or sizes.ndim != 1 or length is None:
            raise Rejected(f"cannot evaluate the split sizes of {what}")
        read = sizes[:len(reads)].tolist()
        if len(read) != len(reads) or min(read) < 1 or sum(read) != length:
            raise Rejected(f"the chunks of {what} do not tile the sequence")
    return split.inputs[0], [split, *reads]


def _size_computation(ctx: AnalysisContext, cut: list[ir.Node]) -> list[ir.Node]:
    """The non-Constant nodes computing the split sizes / slice bounds of the `cut` nodes from shapes
    (Shape, Gather, Div, …) that die with them: read by nothing else. TorchScript computes chunk sizes
    from the Shape of φ itself, and shares them between the cuts of φ(q), φ(k) and v."""
    found, stack = [], [x for node in cut for x in node.inputs[1:] if x is not None]
    while stack:
        node = stack.pop().producer()
        if node is None or node in found or is_op(node, "Constant") or node.op_type != "Shape" and \
                not all(ctx.folder.depends_only_on_shapes(out) for out in node.outputs):
            continue
        found.append(node)
        stack += [] if node.op_type == "Shape" else [x for x in node.inputs if x is not None]
    kept = set(found)
    while True:
        dying = kept | set(cut)
        leaking = {node for node in kept for out in node.outputs
                   if out.is_graph_output() or any(user not in dying for user in out.consumers())}
        if not leaking:
            return [node for node in found if node in kept]
        kept -= leaking


def _chunks_of(ctx: AnalysisContext, values: list[ir.Value], axis: int, what: str) -> tuple[ir.Value, list[ir.Node]]:
    """The tensor whose consecutive pieces along `axis` are `values`, and the nodes that cut it."""
    if producer_op(values[0], "SequenceAt") is not None:
        return _sequence_chunks(ctx, values, axis, what)
    split = producer_op(values[0], "Split")
    if split is not None:
        rank = rank_of(ctx, split.inputs[0])
        if rank is None or (split.attributes.get("axis").value if "axis" in split.attributes else 0) % rank != axis:
            raise Rejected(f"{what} is split along an axis other than the sequence")
        if list(split.outputs) != values:
            raise Rejected(f"the chunks of {what} are not all the pieces of one Split, in order")
        return split.inputs[0], [split]
    slices = [producer_op(value, "Slice") for value in values]
    if None in slices or len({node.inputs[0] for node in slices}) != 1:
        raise Rejected(f"the chunks of {what} are not pieces of one tensor")
    source = slices[0].inputs[0]
    size = ctx.facts.dims(source)[axis] if ctx.facts.dims(source) else None
    for assignment in ctx.assignments:
        bounds = [_slice_bounds(ctx, node, axis, assignment) for node in slices]
        if None in bounds:
            raise Rejected(f"cannot evaluate where the chunks of {what} start and end")
        ends = [0] + [end for _, end in bounds]
        if [start for start, _ in bounds] != ends[:-1] or ends[-1] != ctx.facts.resolve(size, assignment) or \
                any(end <= start for start, end in bounds):
            raise Rejected(f"the chunks of {what} do not tile the sequence in order")
    return source, slices


def _carry_slice(ctx: AnalysisContext, carry: ir.Value | None, previous: ir.Value, axis: int) -> ir.Node | None:
    """The Slice when `carry` is `previous[..., -1:, ...]` along `axis` (start −1, end past the last row).

    When the previous chunk has one row the dynamo exporter drops that Slice: `carry` is then
    `previous` itself, and its producer (already in the block) is returned.
    """
    if carry is previous and previous is not None:
        dims = ctx.facts.dims(previous)
        return previous.producer() if dims is not None and dims[axis] == 1 else None
    node = producer_op(carry, "Slice")
    rank = rank_of(ctx, previous)
    if node is None or node.inputs[0] is not previous or rank is None or len(node.inputs) < 4 or \
            axes_of(ctx, node, rank, 3) != {axis}:
        return None
    starts, ends = (ctx.folder.evaluate(x) for x in node.inputs[1:3])
    steps = ctx.folder.evaluate(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
    if starts is None or ends is None or (steps is not None and steps.reshape(-1).tolist() != [1]):
        return None
    size = ctx.facts.dims(previous)[axis] if ctx.facts.dims(previous) else None
    to_end = int(ends.reshape(-1)[0]) >= (size if isinstance(size, int) else np.iinfo(np.int32).max)
    return node if starts.reshape(-1).tolist() == [-1] and to_end else None


def match_chunked(ctx: AnalysisContext, concat: ir.Node) -> OnnxLinearAttentionMatch:
    """One causal Performer block from the Concat of performer-pytorch's chunk outputs."""
    rank = rank_of(ctx, concat.outputs[0])
    if rank is None or rank < 3 or len(concat.inputs) > 1 and int(concat.attributes["axis"].value) % rank != rank - 2:
        raise Rejected("chunk outputs are concatenated along an axis other than the sequence")
    seq = rank - 2
    pieces = [_piece(ctx, value.producer()) for value in concat.inputs]
    if len({piece.key_sum_epsilon for piece in pieces}) > 1:
        raise Rejected("the chunks add different ε to their prefix-summed keys")
    nodes = [concat]
    for index, piece in enumerate(pieces):
        nodes += piece.nodes
        if index == 0:
            carried = [] if piece.key_carry is None and piece.context_carry is None else [None]
        else:
            before = pieces[index - 1]
            carried = [_carry_slice(ctx, piece.key_carry, before.key_running, seq),
                       _carry_slice(ctx, piece.context_carry, before.context_running, seq)]
        if None in carried:
            raise Rejected(f"chunk {index} does not continue the previous chunk's prefix sums")
        nodes += carried
    phi_q, cut_q = _chunks_of(ctx, [p.phi_q for p in pieces], seq, "φ(q)")
    phi_k, cut_k = _chunks_of(ctx, [p.phi_k for p in pieces], seq, "φ(k)")
    value, cut_v = _chunks_of(ctx, [p.value for p in pieces], seq, "v")
    nodes += cut_q + cut_k + cut_v + _size_computation(ctx, cut_q + cut_k + cut_v)
    # The last chunk's carries may be taken but never used: they die with the block.
    for running in (pieces[-1].key_running, pieces[-1].context_running):
        nodes += [user for user in running.consumers() if is_op(user, "Slice") and
                  not any(out.uses() or out.is_graph_output() for out in user.outputs)]
    return finish_block(ctx, concat, list(dict.fromkeys(nodes)), True, phi_q, phi_k, value, pieces[0].key_sum_epsilon)
