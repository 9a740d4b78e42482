"""Replace each accepted softmax-attention match with one `rewriter::attention` call.

Operands are brought into the op's layout with views only (unsqueeze / permute, and K/V taken
from before a grouped-head expansion), so the rewrite adds no copies::

    Q ─ permute ─┐
    K ─ permute ─┼─ rewriter::attention(q, k, v, bias, mask, …)[0] ─ permute back ─ (cast) ─ users
    V ─ permute ─┘
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from collections.abc import Callable

import onnx_ir.passes
import torch
from torch.fx import Graph, GraphModule, Node

import rewriter.kernels.attention_op  # noqa: F401  (registers torch.ops.rewriter.attention)
from passes.core.attention_spec import ChunkSizes
from passes.core.score_algebra import ConstantBias
from passes.core.program_terms import ProgramTerm, combined_bias, compact_leaves
from passes.fx import aten_vocabulary as ops
from passes.core.attention_labels import FINE
from passes.fx.batch_views import unflatten_sizes
from passes.fx.detect_softmax_attention import FxAttentionMatch, Operand

__all__ = ["RewriteSoftmaxAttention"]

logger = logging.getLogger(__name__)
aten = torch.ops.aten


def _arrange(graph: Graph, operand: Operand) -> Node:
    """`operand` as a 4-D (batch, heads, rows, cols) view: absent labels become size-1 axes."""
    node, labels = operand.node, operand.labels
    if operand.view_shape is not None:  # a merged (batch·heads) axis, split as `labels` name it
        position = labels.index(FINE[0])
        parts = unflatten_sizes(operand.view_shape[position:position + 2])
        node = graph.call_function(aten.unflatten.int, (node, position, parts))
    for label in operand.order:
        if label not in labels:
            node = graph.call_function(aten.unsqueeze.default, (node, len(labels)))
            labels += label
    order = [labels.index(label) for label in operand.order]
    if order != list(range(len(order))):
        node = graph.call_function(aten.permute.default, (node, order))
    for _ in range(4 - len(operand.order)):  # a fused (batch·heads) axis, or none, gets heads of 1
        node = graph.call_function(aten.unsqueeze.default, (node, _padding_axis(operand.order)))
    return node


def _padding_axis(canonical: str) -> int:
    """Where size-1 axes go to make `canonical` (rows, cols plus 0–2 batch axes) four-dimensional."""
    return 1 if len(canonical) == 3 else 0


def _combined_bias(graph: Graph, biases: list[tuple[Operand | ConstantBias, float]]) -> Node | None:
    """Σ factor · bias, 4-D; several half-precision terms are summed in fp32, as the op adds each to
    fp32 scores (`passes.core.program_terms.sum_steps`). A `ConstantBias` (a constant added before a
    finite-fill mask) is added to the tensor terms, of which there is at least one."""
    constants = [(operand, factor) for operand, factor in biases if isinstance(operand, ConstantBias)]
    tensors = [(operand, factor) for operand, factor in biases if not isinstance(operand, ConstantBias)]
    total = None
    half = len(biases) > 1 and any(ops.tensor_meta(operand.node).dtype in (torch.float16, torch.bfloat16)
                                   for operand, _ in tensors)
    for operand, factor in tensors:
        term = _arrange(graph, operand)
        if half:
            term = graph.call_function(aten._to_copy.default, (term,), {"dtype": torch.float32})
        if factor != 1.0:
            term = graph.call_function(aten.mul.Tensor, (term, factor))
        total = term if total is None else graph.call_function(aten.add.Tensor, (total, term))
    for constant, factor in constants:
        total = graph.call_function(aten.add.Tensor, (total, constant.value * factor))
    return total


def _restore_layout(graph: Graph, node: Node, match: FxAttentionMatch) -> Node:
    """The op's (batch, heads, rows, value-dim) output in the layout of the node it replaces."""
    canonical = match.out_canonical
    for _ in range(4 - len(canonical)):
        node = graph.call_function(aten.squeeze.dim, (node, _padding_axis(canonical)))
    order = [canonical.index(label) for label in match.out_labels]
    if order != list(range(len(order))):
        node = graph.call_function(aten.permute.default, (node, order))
    original = ops.tensor_meta(match.output)
    if len(match.out_labels) != original.dim():  # the model's output merges (batch, heads)
        position = match.out_labels.index(FINE[0])
        node = graph.call_function(aten.flatten.using_ints, (node, position, position + 1))
    else:
        node = _with_memory_order_of(graph, node, order, original)
    if match.cast_output_to is not None:
        node = graph.call_function(aten._to_copy.default, (node,), {"dtype": match.cast_output_to})
    return node


def _with_memory_order_of(graph: Graph, node: Node, order: list[int], original: torch.Tensor) -> Node:
    """`node` laid out in memory like the value it replaces, which later views may rely on.

    `node` holds the op's contiguous output viewed through `order` (its axis i is the op's axis
    order[i]); when that memory order differs from the original's, one copy re-lays it out.
    """
    shape, strides = original.shape, original.stride()
    def significant(axes):
        return [axis for axis in axes if shape[axis] != 1]

    original_order = sorted(range(len(shape)), key=lambda axis: (-strides[axis], axis))
    current_order = sorted(range(len(order)), key=lambda axis: order[axis])
    if significant(original_order) == significant(current_order):
        return node
    node = graph.call_function(aten.permute.default, (node, original_order))
    node = graph.call_function(aten.clone.default, (node,), {"memory_format": torch.contiguous_format})
    inverse = sorted(range(len(original_order)), key=lambda axis: original_order[axis])
    return graph.call_function(aten.permute.default, (node, inverse))


def _with_query_factors(graph: Graph, query: Node, key: Node, value: Node,
                        match: FxAttentionMatch) -> tuple[Node, Node, Node, torch.dtype | None]:
    """Q times (or divided by) each tensor factor of the scores: (Q, K, V, the dtype to cast the
    op's output back to, or None).

    Like eager's `scores * tau`, the product is formed at the factor's precision (an fp32 tau is not
    rounded to bf16 first). A half-precision product is not rounded back: Q, K and V reach the op in
    fp32 (which forms fp16/bf16 scores in fp32 anyway), since a dQ rounded to half precision leaves
    the factor's gradient, a sum over every query element, far from fp32's (the fuzzer found 6.5% on
    an fp16 temperature where eager is 0.6% off). Full-precision products keep Q's dtype.
    """
    if not match.query_factors:
        return query, key, value, None
    dtype = ops.tensor_meta(match.query.node).dtype
    half = dtype in (torch.float16, torch.bfloat16)
    if half:
        query, key, value = (graph.call_function(aten._to_copy.default, (node,), {"dtype": torch.float32})
                             for node in (query, key, value))
    for operand, divides in match.query_factors:
        scaled = graph.call_function(aten.div.Tensor if divides else aten.mul.Tensor, (query, _arrange(graph, operand)))
        query = graph.call_function(aten.type_as.default, (scaled, query))
    return query, key, value, dtype if half else None


def _score_terms(graph: Graph, match: FxAttentionMatch, replaced: dict[Node, Node]) -> tuple:
    """(bias, mask, leaves, bias program, mask program, fill program): recovered programs where every
    term of a kind has one (a bias program and a dense bias are not mixed), else the dense operands."""
    biases = match.biases
    programs = [None, None, None if match.fill_program is None else match.fill_program.program]
    if biases and all(isinstance(operand, ProgramTerm) for operand, _ in biases):
        programs[0], biases = biases[0][0].builder.program(combined_bias(biases)), []
    biases = [(_current(operand.dense, replaced) if isinstance(operand, ProgramTerm) else operand, factor)
              for operand, factor in biases]
    bias, mask = _combined_bias(graph, biases), None
    if isinstance(match.mask, ProgramTerm):
        programs[1] = match.mask.program
    elif match.mask is not None:
        mask = _arrange(graph, match.mask)
        if not match.mask_keep_when_true:
            mask = graph.call_function(aten.logical_not.default, (mask,))
    terms = [term for term in [match.mask, match.fill_program, *(operand for operand, _ in match.biases)]
             if isinstance(term, ProgramTerm)]
    if not terms:
        return bias, mask, [], "", "", ""
    programs, leaves = compact_leaves(programs, terms[0].builder.leaves)
    leaves = [replaced.get(leaf, leaf) for leaf in leaves]
    return bias, mask, leaves, *(program.to_json() if program is not None else "" for program in programs)


def _emit(graph: Graph, match: FxAttentionMatch, chunks: ChunkSizes, replaced: dict[Node, Node]) -> Node:
    query, key, value = (_arrange(graph, operand) for operand in (match.query, match.key, match.value))
    query, key, value, cast_back = _with_query_factors(graph, query, key, value, match)
    bias, mask, leaves, bias_program, mask_program, fill_program = _score_terms(graph, match, replaced)
    attention = graph.call_function(
        torch.ops.rewriter.attention.default,
        (query, key, value, bias, mask, leaves, match.scale, match.softcap, match.mask_fill,
         match.causal, match.causal_offset, chunks.query, chunks.key, match.zero_masked_rows,
         bias_program, mask_program, fill_program),
    )
    out = graph.call_function(operator.getitem, (attention, 0))
    if cast_back is not None:
        out = graph.call_function(aten._to_copy.default, (out,), {"dtype": cast_back})
    return _restore_layout(graph, out, match)


def _current(operand: Operand | None, replaced: dict[Node, Node]) -> Operand | None:
    if operand is None or isinstance(operand, ConstantBias) or operand.node not in replaced:
        return operand
    return dataclasses.replace(operand, node=replaced[operand.node])


def _follow_replacements(match: FxAttentionMatch, replaced: dict[Node, Node]) -> None:
    """Point the match's operands past outputs that earlier rewrites replaced (stacked layers)."""
    def current(operand):
        return operand if isinstance(operand, ProgramTerm) else _current(operand, replaced)

    match.query, match.key, match.value, match.mask = map(current, (match.query, match.key, match.value, match.mask))
    match.biases = [(current(operand), factor) for operand, factor in match.biases]
    match.query_factors = [(current(operand), divides) for operand, divides in match.query_factors]


def _erase_replaced(graph: Graph, replaced: list[Node]) -> None:
    """Erase the matched nodes (output first), with the exporter assertions that watch them.

    Done explicitly because dead-code elimination keeps ops it deems impure, such as dropout.
    """
    for node in replaced:
        for observer in [user for user in node.users if ops.is_call(user, ops.OBSERVERS)]:
            graph.erase_node(observer)
        if not node.users:
            graph.erase_node(node)


def _eliminate_dead_code(graph: Graph) -> None:
    """Dead-code elimination that also drops exporter assertions on values nothing else reads.

    The mask and bias producers a rewrite leaves unused (n×n for HF's masks) are often watched by
    an ``_assert_tensor_metadata``, or end in an in-place op on a temporary (T5's ``buckets +=``),
    which plain elimination keeps (and so the producers too).
    """
    while True:
        graph.eliminate_dead_code()
        dead = [node for node in graph.nodes if _observes_unused(node) or _updates_unused_temporary(node)]
        if not dead:
            return
        for node in dead:
            graph.erase_node(node)


def _observes_unused(node: Node) -> bool:
    return (ops.is_call(node, ops.OBSERVERS) and bool(node.args) and isinstance(node.args[0], Node)
            and not ops.value_users(node.args[0]))


def _updates_unused_temporary(node: Node) -> bool:
    """An unused in-place op whose updated tensor is a computed value that nothing else reads."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or node.users or schema is None or not schema.is_mutable:
        return False
    updated = node.args[0] if node.args else None
    fresh = isinstance(updated, Node) and updated.op == "call_function" and not any(  # not a view of another
        result.alias_info is not None for result in getattr(updated.target, "_schema", schema).returns)
    return (fresh and list(updated.users) == [node] and schema.arguments[0].alias_info is not None
            and schema.arguments[0].alias_info.is_write)


class RewriteSoftmaxAttention(onnx_ir.passes.InPlacePass):
    """Rewrites the accepted matches of `detect_softmax_attention` in place.

    `plan(spec)` gives the chunk sizes of each match (the planner lives outside the pass).
    """

    def __init__(self, matches: list[FxAttentionMatch], plan: Callable[..., ChunkSizes]):
        super().__init__()
        self.matches = [match for match in matches if match.spec.accepted]
        self.plan = plan

    def call(self, model: GraphModule) -> onnx_ir.passes.PassResult:
        graph = model.graph
        replaced: dict[Node, Node] = {}
        for match in self.matches:
            _follow_replacements(match, replaced)
            with graph.inserting_before(match.output):
                replacement = _emit(graph, match, self.plan(match.spec), replaced)
            match.output.replace_all_uses_with(replacement)
            replaced[match.output] = replacement
            _erase_replaced(graph, match.replaced)
            logger.info("rewrote attention at %s", match.output.name)
        if self.matches:
            _eliminate_dead_code(graph)
            graph.lint()
            model.recompile()
        return onnx_ir.passes.PassResult(model, bool(self.matches))
