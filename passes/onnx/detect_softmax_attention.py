"""Find softmax attention in an ONNX graph and prove each match, axis by axis.

Anchored at each ``Softmax`` (or ``Exp(LogSoftmax(·))``), in the main graph and in every
subgraph (If / Loop / Scan bodies)::

      Q ─(Mul √s)─┐                                    (Cast, Identity, inference Dropout,
                  ├─ MatMul ─ [score chain] ─ Softmax ── Where(IsNaN(P), 0, P)) ── MatMul ─ out
      K ─(Mul √s)─┘   (or Einsum)                                             V ──┘
      Kᵀ by Transpose, by Reshape/Transpose/Reshape, or stored transposed

A match is accepted only when the labels prove it: Softmax runs over the axis that comes from K
alone, Q·K contracts exactly one axis (the head dim), P·V contracts exactly that key axis, Q is
not broadcast, biases and masks broadcast to the scores without enlarging them, and no
intermediate has another user. Everything else becomes a rejected `AttentionSpec` with the reason.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from passes.core.attention_labels import (MERGED, LabelError, QkAxes, ScoreAxes, compact_labels, expand,
                                          prove_pv_axes, prove_qk_axes)
from passes.core.attention_spec import AttentionSpec
from passes.onnx.axis_labels import Operand, label_product, trace_to_source
from passes.onnx.batch_views import BatchSplit, block_split, merged_operand, split_dims, view_reason
from passes.onnx.graph_values import FLOAT_TYPES, attribute, const_array, is_op, value_consumers
from passes.onnx.grouped_heads import repeat_interleave_source
from passes.onnx.onnx_match import AnalysisContext, OnnxAttentionMatch, Rejected
from passes.onnx.score_chain import check_inference_dropout, trace_score_chain
from passes.onnx.score_operands import fill_masks
from passes.onnx.shape_facts import ShapeFacts
from passes.onnx.spec_fields import spec_fields
from passes.core.score_algebra import ChainError

__all__ = ["detect_softmax_attention", "anchor_softmax"]

logger = logging.getLogger(__name__)

# Ops between the probabilities and P·V that keep them a candidate (the walk then says what fails).
_ELEMENTWISE = {"Cast", "Identity", "Dropout", "IsNaN", "Where", "Mul", "Div", "Add", "Reshape"}


def anchor_softmax(node: ir.Node) -> ir.Node | None:
    """The Softmax an anchor stands for: Softmax itself, or Exp over LogSoftmax."""
    if is_op(node, "Softmax"):
        return node
    if is_op(node, "Exp") and is_op(node.inputs[0].producer(), "LogSoftmax"):
        return node.inputs[0].producer()
    return None


def _softmax_axis(ctx: AnalysisContext, softmax: ir.Node) -> int:
    rank = ctx.facts.rank(softmax.inputs[0])
    if rank is None:
        raise Rejected(f"the rank of the scores at '{softmax.name}' is unknown")
    if ctx.opsets.get("", 21) < 13:  # older Softmax flattens axes [axis:] into one
        axis = attribute(softmax, "axis", 1) % rank
        if axis != rank - 1:
            raise Rejected(f"softmax (opset < 13) normalises over axes {axis}..{rank - 1} together")
        return axis
    return attribute(softmax, "axis", -1) % rank


def _is_nan_guard(value: ir.Value) -> ir.Node | None:
    """The Where of ``Where(IsNaN(P), 0, P)`` (torch's safe softmax) when that is what reads P."""
    consumers = value_consumers(value)
    isnan = next((n for n in consumers if is_op(n, "IsNaN")), None)
    where = next((n for n in consumers if is_op(n, "Where")), None)
    if len(consumers) != 2 or isnan is None or where is None:
        return None
    if where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not value:
        return None
    zero = const_array(where.inputs[1])
    if value_consumers(isnan.outputs[0]) != [where] or zero is None or zero.size != 1:
        return None
    return where if not zero.any() else None


class _Builder:
    def __init__(self, ctx: AnalysisContext):
        self.ctx = ctx
        self.split: BatchSplit | None = None  # the current candidate's batch views, if any

    def find_split(self, chain, probability_nodes: list) -> BatchSplit | None:
        """The block's (batch·heads) split (`batch_views`), None without batch views."""
        try:
            return block_split(self.ctx.facts, self.ctx.folder, chain.product.node,
                               chain.nodes[::-1] + probability_nodes)
        except ValueError as error:
            raise Rejected(str(error)) from None

    def operand(self, value, labels: str, order: str) -> Operand:
        """An operand of a product (labels in `compact_labels` form), its merged axis split."""
        if MERGED not in labels:
            return Operand(value, labels, order)
        try:
            return merged_operand(value, labels, order, self.split, self.ctx.facts.dims(value))
        except (ValueError, TypeError) as error:
            raise Rejected(str(error)) from None

    def follow_probabilities(self, anchor: ir.Node, nodes: list, match: OnnxAttentionMatch | None):
        """From Softmax down through casts/dropout/NaN guard to the P·V product: (P, product)."""
        current = anchor.outputs[0]
        while True:
            guard = _is_nan_guard(current)
            if guard is not None:
                nodes.extend(dict.fromkeys(current.consumers()))
                if match is not None:
                    match.zero_masked_rows = True
                current = guard.outputs[0]
                continue
            consumers = value_consumers(current)
            if None in consumers:
                raise Rejected(f"attention probabilities '{current.name}' are a graph output")
            if len(consumers) != 1:
                raise Rejected(f"attention probabilities '{current.name}' have {len(consumers)} users")
            user = consumers[0]
            product = label_product(user, self.ctx.facts)
            if product is not None:
                return current, product
            if is_op(user, "Dropout"):
                reason = check_inference_dropout(user)
                if reason:
                    raise Rejected(reason)
            elif is_op(user, "Cast"):
                if attribute(user, "to") not in FLOAT_TYPES:
                    raise Rejected(f"probabilities are cast to a non-float type ('{user.name}')")
            elif is_op(user, "Reshape"):
                reason = view_reason(user, self.ctx.facts, self.ctx.folder)
                if reason:
                    raise Rejected(reason)
            elif not is_op(user, "Identity"):
                raise Rejected(f"probabilities feed '{user.op_type}' ('{user.name}'), not a product with V")
            nodes.append(user)
            current = user.outputs[0]

    def feeds_product(self, anchor: ir.Node) -> bool:
        """Whether some use of the probabilities reaches a tensor product within a few elementwise ops."""
        frontier, seen = [anchor.outputs[0]], set()
        for _ in range(4):
            users = [n for value in frontier for n in value_consumers(value) if n is not None and n not in seen]
            if any(label_product(n, self.ctx.facts) is not None for n in users):
                return True
            seen.update(users)
            frontier = [out for n in users if n.op_type in _ELEMENTWISE for out in n.outputs]
        return False

    def from_softmax(self, anchor: ir.Node) -> OnnxAttentionMatch | None:
        softmax = anchor_softmax(anchor)
        nodes = [anchor] + ([softmax] if softmax is not anchor else [])
        names = tuple(n.name for n in nodes)
        match = OnnxAttentionMatch(AttentionSpec("softmax", names), graph=anchor.graph)
        try:
            axis = _softmax_axis(self.ctx, softmax)
            chain = trace_score_chain(softmax.inputs[0], softmax, self.ctx.facts, self.ctx.folder)
        except (ChainError, Rejected) as error:
            match.spec = match.spec.rejected(str(error))
            return match if self.feeds_product(anchor) else None
        if softmax is not anchor and len(value_consumers(softmax.outputs[0])) != 1:
            match.spec = match.spec.rejected(f"log-probabilities '{softmax.outputs[0].name}' have other users")
            return match
        if not self.feeds_product(anchor):
            return None  # e.g. a classifier's softmax: no product reads its probabilities
        try:
            probabilities, pv = self.follow_probabilities(anchor, nodes, match)
            self.split = self.find_split(chain, nodes)
            if self.split is None and self.ctx.facts.rank(softmax.inputs[0]) != len(chain.product.out_labels):
                raise Rejected("the scores change rank between the product and softmax")
            axis -= self.ctx.facts.rank(softmax.inputs[0])  # counted from the end: views change the rank
            scores = self.fill_from_products(match, chain, axis, probabilities, pv)
            fill_masks(self.ctx, match, scores, chain.biases, chain.masks, self.split)
            self.find_grouped_sources(match)
        except (Rejected, LabelError) as error:
            match.spec = match.spec.rejected(str(error))
            return match
        match.scale *= chain.scale
        match.softcap = chain.softcap
        match.nodes = [pv.node] + nodes[::-1] + chain.nodes + [chain.product.node]
        match.spec = dataclasses.replace(match.spec, nodes=tuple(n.name for n in match.nodes[::-1]),
                                         **spec_fields(self.ctx, match))
        return match

    def peel(self, operand: Operand) -> tuple[Operand, float]:
        """The operand before scalar multiplications and views, and the factor peeled off."""
        factor = 1.0
        while True:
            operand = trace_to_source(operand, self.ctx.facts)
            node = operand.value.producer()
            if not (is_op(node, "Mul", "Div") and node.inputs[0] is not None):
                return operand, factor
            scalar = self.ctx.folder.scalar(node.inputs[1])
            other = node.inputs[0]
            if scalar is None and node.op_type == "Mul":
                scalar, other = self.ctx.folder.scalar(node.inputs[0]), node.inputs[1]
            if scalar is None or not scalar > 0 or self.ctx.facts.dims(other) != self.ctx.facts.dims(operand.value):
                return operand, factor
            factor *= scalar if node.op_type == "Mul" else 1.0 / scalar
            operand = dataclasses.replace(operand, value=other)

    def fill_from_products(self, match, chain, axis: int, probabilities, pv) -> ScoreAxes:
        """`axis`: the one softmax normalises over, counted from the end."""
        facts, qk = self.ctx.facts, compact_labels(chain.product, self.split is not None)
        if self.split is not None and axis not in (-1, -2):
            raise Rejected("softmax runs over a batch or head axis")
        scores = expand(qk.out_labels)
        scores_dims = facts.dims(qk.node.outputs[0])
        if scores_dims is None or len(scores_dims) != len(qk.out_labels):
            raise Rejected("the shape of the scores is unknown")
        if MERGED in qk.out_labels:
            scores_dims = split_dims(self.operand(qk.node.outputs[0], qk.out_labels, scores), scores_dims)
        axes = prove_qk_axes(scores, expand(qk.left_labels), expand(qk.right_labels), scores[axis])
        if self.split is not None and {axes.query, axes.key} != set(scores[-2:]):
            raise Rejected("batch views in a block whose query and key axes are not the last two")
        key_value, key_labels = (qk.left, qk.left_labels) if axes.key_on_left else (qk.right, qk.right_labels)
        query_value, query_labels = (qk.right, qk.right_labels) if axes.key_on_left else (qk.left, qk.left_labels)
        key_label, query_label, batch = axes.key, axes.query, axes.batch
        query = self.operand(query_value, query_labels, axes.query_order)
        key = self.operand(key_value, key_labels, axes.key_order)
        self.check_broadcast(query, key, scores, scores_dims, batch)
        match.query, query_scale = self.peel(query)
        match.key, key_scale = self.peel(key)
        match.scale = query_scale * key_scale
        self.fill_value(match, pv, probabilities, scores, axes, scores_dims)
        match.equal_lengths = ShapeFacts.same(scores_dims[scores.index(query_label)], scores_dims[axis])
        return ScoreAxes(scores, scores_dims, batch, query_label, key_label)

    def check_broadcast(self, query: Operand, key: Operand, scores: str, scores_dims, batch: str) -> None:
        for label in batch:
            full = scores_dims[scores.index(label)]
            if label not in query.labels or not ShapeFacts.same(self.ctx.dim_of(query, label), full):
                raise Rejected("cannot prove that the query is not broadcast over a batch axis")
            key_dim = self.ctx.dim_of(key, label)
            heads_axis = len(batch) == 2 and label == batch[1]
            if not ShapeFacts.same(key_dim, full) and not (heads_axis and key_dim == 1):
                raise Rejected("cannot prove that K is not broadcast over a batch axis")

    def fill_value(self, match, pv, probabilities, scores, axes: QkAxes, scores_dims) -> None:
        if pv.left is not probabilities and not (is_op(pv.node, "Einsum") and pv.right is probabilities):
            raise Rejected("probabilities are not the left operand of the P·V product")
        on_left = pv.left is probabilities
        pv = compact_labels(pv, self.split is not None)
        p_labels = pv.left_labels if on_left else pv.right_labels
        value_value, value_labels = (pv.right, pv.right_labels) if on_left else (pv.left, pv.left_labels)
        pv_axes = prove_pv_axes(axes, scores, expand(p_labels), expand(value_labels), expand(pv.out_labels))
        pv_batch, batch = pv_axes.value_order[:-2], axes.batch
        value = self.operand(value_value, value_labels, pv_axes.value_order)
        for label, scores_label in zip(pv_batch, batch):
            dim, full = self.ctx.dim_of(value, label), scores_dims[scores.index(scores_label)]
            if not ShapeFacts.same(dim, full) and not (len(batch) == 2 and label == pv_batch[1] and dim == 1):
                raise Rejected("cannot prove that V is not broadcast over a batch axis")
        match.value = trace_to_source(value, self.ctx.facts)
        match.output, match.out_canonical, match.out_labels = pv.node.outputs[0], pv_axes.out_canonical, expand(
            pv.out_labels)
        match.out_merged_batch = MERGED in pv.out_labels

    def find_grouped_sources(self, match: OnnxAttentionMatch) -> None:
        """K and V from before a repeat-interleave over heads; both, or neither."""
        heads = match.query.order[-3] if len(match.query.order) == 4 else None
        match.num_heads = self.ctx.static_dim(match.query, heads) if heads else 1
        if heads is None:
            match.num_kv_heads = 1
            return
        key_heads = match.key.order[-3]
        value_heads = match.value.order[-3]
        key = repeat_interleave_source(match.key, key_heads, self.ctx.facts, self.ctx.folder)
        value = repeat_interleave_source(match.value, value_heads, self.ctx.facts, self.ctx.folder)
        if key is not None and value is not None and key[1] == value[1]:
            match.key_source, match.value_source = key[0], value[0]
            match.num_kv_heads = key[1]
        else:
            match.num_kv_heads = self.ctx.static_dim(match.key, key_heads)


def detect_softmax_attention(ctx: AnalysisContext) -> list[OnnxAttentionMatch]:
    """Every softmax-attention candidate in the model and its subgraphs, accepted or with a reason."""
    builder = _Builder(ctx)
    matches = []
    for node in ir.traversal.RecursiveGraphIterator(ctx.model.graph):
        if anchor_softmax(node) is None:
            continue
        try:
            match = builder.from_softmax(node)
        except Exception as error:  # noqa: BLE001 - one unanalysable block must not stop the others
            logger.exception("analysing %s failed", node.name)
            match = OnnxAttentionMatch(AttentionSpec("softmax", (node.name,), reason=f"not analysed: {error!r}"))
        if match is not None:
            matches.append(match)
    for match in matches:
        logger.info("%s: %s", match.spec.nodes[0], "match" if match.spec.accepted else match.spec.reason)
    return matches
