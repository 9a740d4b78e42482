"""Find softmax attention in an exported FX graph and prove each match, axis by axis.

Anchored at each softmax (or ``exp(log_softmax(·))``) whose input or output touches a tensor
product, and at each ``scaled_dot_product_attention`` call::

      Q ──┐                                       (casts, dropout in eval)
          ├─ product(Q, K) ─ [score chain] ─ softmax ──────────────── product(P, V) ─ out
      K ──┘   matmul | bmm | baddbmm | einsum                           V ──┘

A match is accepted only when the labels prove it: softmax runs over the axis that comes from K
alone, Q·K contracts exactly one axis (the head dim), P·V contracts exactly that key axis, bias
and masks broadcast to the scores without enlarging them, and no intermediate has another user.
Everything else becomes a rejected `AttentionSpec` whose reason says what failed.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import torch
from torch.fx import GraphModule, Node

from passes.core.attention_labels import LabelError, ScoreAxes, compact_labels, prove_pv_axes, prove_qk_axes
from passes.core.attention_spec import AttentionSpec, layout_name
from passes.fx import aten_vocabulary as ops
from passes.core.causal_proofs import causal_offset_of_bias, causal_offset_of_keep
from passes.fx import batch_views
from passes.core.attention_labels import FINE, MERGED, expand
from passes.fx.batch_views import BatchSplit, BatchViewError
from passes.fx.constant_values import constant_value, scalar_constant
from passes.fx.product_labels import label_product
from passes.fx.score_chain import ScoreChain, trace_score_chain
from passes.core.mask_semantics import ScoreSemantics, fill_is_neg_inf, mask_kind, sort_score_terms
from passes.core.score_algebra import ChainError, ConstantBias, MaskStep
from passes.core.fill_programs import aligned_fill_terms, fill_program_term, term_step, unexpressible
from passes.core.operand_forms import operand_fields
from passes.core.program_terms import (
    ProgramTerm,
    combined_bias,
    program_bias_offset,
    program_mask_offset,
    recover_terms,
)
from passes.core.score_programs import ProgramBuilder
from passes.fx.score_program_recovery import FxProgramTranslator

__all__ = ["Operand", "FxAttentionMatch", "detect_softmax_attention"]

logger = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class Operand:
    """A graph value whose axes carry `labels`, to be arranged as `order` (missing = size 1)."""

    node: Node
    labels: str
    order: str  # the labels in the order the kernel takes them (absent ones become size 1)
    view_shape: tuple | None = None  # the node viewed so (merged batch·heads split), which `labels` name

    def before_permutes(self) -> Operand:
        """The same operand seen before any transpose/permute views that produced it."""
        node, labels = self.node, self.labels
        while ops.is_call(node, ops.TRANSPOSE | ops.PERMUTE):
            rank = len(labels)
            if node.target in ops.TRANSPOSE:
                first, second = node.args[1] % rank, node.args[2] % rank
                order = list(range(rank))
                order[first], order[second] = second, first
            else:
                order = [axis % rank for axis in node.args[1]]
            source = [""] * rank
            for position, axis in enumerate(order):
                source[axis] = labels[position]
            node, labels = node.args[0], "".join(source)
        return Operand(node, labels, self.order)


@dataclasses.dataclass
class FxAttentionMatch(ScoreSemantics):
    """One candidate: its spec, the FX operands, and (inherited) what it does to its scores."""

    spec: AttentionSpec
    output: Node | None = None  # the node whose value the op replaces
    query: Operand | None = None
    key: Operand | None = None
    value: Operand | None = None
    out_canonical: str = ""  # labels of the op's output (batch…, query, value-dim)
    out_labels: str = ""  # labels of `output`
    # Non-constant factors of the scores (a learned temperature), applied to Q: (operand, divides).
    query_factors: list[tuple[Operand, bool]] = dataclasses.field(default_factory=list)
    replaced: list[Node] = dataclasses.field(default_factory=list)  # dead once `output` is replaced
    cast_output_to: torch.dtype | None = None  # the op returns q's dtype; the model's output may differ


class _Rejected(Exception):
    pass


def _softmax_dim(node: Node) -> int:
    return node.args[1]


def _anchor_softmax(node: Node) -> Node | None:
    """The softmax node an anchor stands for: softmax itself, or exp over log_softmax."""
    if ops.is_call(node, ops.SOFTMAX):
        return node
    if ops.is_call(node, ops.EXP) and ops.is_call(node.args[0], ops.LOG_SOFTMAX):
        return node.args[0]
    return None


def _follow_probabilities(anchor: Node, nodes: list[Node]) -> tuple[Node, Node]:
    """From the softmax output down through casts/dropout to the P·V product: (P node, product)."""
    current = anchor
    while True:
        users = ops.value_users(current)
        if len(users) != 1:
            raise _Rejected(f"attention probabilities '{current.name}' have {len(users)} users")
        user = users[0]
        if label_product(user) is not None:
            return current, user
        if ops.is_call(user, ops.DROPOUT):
            probability, train = user.args[1], user.args[2] if len(user.args) > 2 else True
            if train and probability:
                raise _Rejected(f"dropout p={probability} on probabilities in training mode")
        elif not ops.is_call(user, ops.CASTS | ops.PASSTHROUGH) and not batch_views.is_batch_view(user):
            raise _Rejected(f"probabilities feed '{user.target}', not a product with V")
        nodes.append(user)
        current = user


def _peel_scale(gm: GraphModule, operand: Operand) -> tuple[Operand, float]:
    """Q or K before a multiplication or division by a positive scalar constant, and that factor."""
    node = operand.node
    if not ops.is_call(node, ops.MUL | ops.DIV) or not isinstance(node.args[0], Node):
        return operand, 1.0
    factor = scalar_constant(gm, node.args[1])
    if factor is None or not factor > 0 or _shape(node.args[0]) != _shape(node):
        return operand, 1.0  # a factor that broadcasts Q or K to more axes stays part of the operand
    factor = factor if node.target in ops.MUL else 1.0 / factor
    return dataclasses.replace(operand, node=node.args[0]).before_permutes(), factor


def _before_head_expansion(operand: Operand) -> Operand:
    """K or V from before a repeat_interleave over heads (GQA/MQA), when that is what fed it."""
    heads_axis_label = operand.order[1] if len(operand.order) == 4 else None
    if heads_axis_label is None or operand.view_shape is not None or heads_axis_label not in operand.labels:
        return operand
    axis = operand.labels.index(heads_axis_label)
    node = operand.node
    if ops.is_call(node, ops.REPEAT_INTERLEAVE) and len(node.args) > 2 and node.args[2] % len(operand.labels) == axis:
        return dataclasses.replace(operand, node=node.args[0])
    # HF repeat_kv: x[:, :, None].expand(b, kv, groups, s, d).reshape(b, kv * groups, s, d)
    if ops.is_call(node, ops.RESHAPE) and ops.is_call(node.args[0], ops.EXPAND):
        unsqueeze = node.args[0].args[0]
        if ops.is_call(unsqueeze, ops.UNSQUEEZE) and unsqueeze.args[1] == axis + 1:
            return dataclasses.replace(operand, node=unsqueeze.args[0])
    return operand


def _unexpanded_key_value(key: Operand, value: Operand) -> tuple[Operand, Operand]:
    """K and V from before a grouped-head expansion: both or neither (the op needs equal heads)."""
    key_source, value_source = _before_head_expansion(key), _before_head_expansion(value)
    if (key_source is key) != (value_source is value):
        return key, value
    return key_source, value_source


def _shape(node: Node) -> tuple:
    """Sizes of `node` (`batch_views.sizes`); rejected when none was recorded."""
    shape = batch_views.sizes(node)
    if shape is None:
        raise _Rejected(f"no shape recorded for '{node.name}'")
    return shape


def _operand_shape(operand: Operand) -> tuple:
    """The sizes that `operand.labels` name: the node's, or its view's."""
    return operand.view_shape if operand.view_shape is not None else _shape(operand.node)


def _split_operand(operand: Operand, split: BatchSplit | None) -> Operand:
    """An operand with a merged (batch·heads) axis, viewed as (batch, heads) (see batch_views)."""
    if split is None or MERGED not in operand.labels:
        return dataclasses.replace(operand, order=expand(operand.order))
    try:
        view = batch_views.split_shape(_shape(operand.node), operand.labels.index(MERGED), split)
        batch_views.unflatten_sizes(view[operand.labels.index(MERGED):][:2])
    except BatchViewError as error:
        raise _Rejected(str(error)) from None
    return Operand(operand.node, expand(operand.labels), expand(operand.order), view)


def _static(size) -> int | None:
    return size if isinstance(size, int) else None


def _aligned(node: Node, scores_labels: str, scores_shape, what: str) -> Operand:
    """A bias or mask operand, its axes aligned from the right with the scores' axes."""
    shape = _shape(node)
    if len(shape) > len(scores_labels):
        raise _Rejected(f"{what} '{node.name}' has more axes than the scores")
    labels = scores_labels[len(scores_labels) - len(shape):]
    for size, full in zip(shape, scores_shape[len(scores_shape) - len(shape):]):
        if size not in (1, full):
            raise _Rejected(f"{what} '{node.name}' of shape {shape} enlarges the scores {scores_shape}")
    return Operand(node, labels, "")


def _query_factor(operand: Operand, scores: ScoreAxes) -> Operand:
    """A tensor factor of the scores, arranged like a bias; it must be constant along the key axis."""
    if scores.key in operand.labels and _operand_shape(operand)[operand.labels.index(scores.key)] != 1:
        raise _Rejected(f"the scale '{operand.node.name}' varies along the key axis")
    return dataclasses.replace(operand, order=scores.batch + scores.query + scores.key)


def _canonical_shape(operand: Operand) -> tuple:
    """The operand's sizes once arranged as the op's 4-D (batch, heads, rows, cols) input."""
    shape = _operand_shape(operand)
    sizes = tuple(shape[operand.labels.index(label)] if label in operand.labels else 1 for label in operand.order)
    padding = 4 - len(sizes)
    return sizes[:1] + (1,) * padding + sizes[1:] if len(sizes) == 3 else (1,) * padding + sizes


def _check_operand_shapes(match: FxAttentionMatch) -> None:
    """Q, K and V as the op takes them: K/V batch 1 or Q's, equal K/V heads dividing Q's heads."""
    q, k, v = (_canonical_shape(operand) for operand in (match.query, match.key, match.value))
    if k[0] not in (1, q[0]) or v[0] not in (1, q[0]):
        raise _Rejected(f"the query of batch {q[0]} broadcasts against keys/values of batch {k[0]}/{v[0]}")
    if k[1] != v[1]:
        raise _Rejected(f"keys and values have different head counts ({k[1]} and {v[1]})")
    divides = k[1] == 1 or q[1] == k[1] or isinstance(q[1], int) and isinstance(k[1], int) and q[1] % k[1] == 0
    if not divides:
        raise _Rejected(f"{q[1]} query heads are not a multiple of {k[1]} key/value heads")


class _Builder:
    """Turns one anchor into an `FxAttentionMatch` (accepted, or rejected with a reason)."""

    def __init__(self, gm: GraphModule, score_programs: bool = True):
        self.gm = gm
        self.score_programs = score_programs
        self.split: BatchSplit | None = None  # the current candidate's batch views, if any
        self.segments: dict[Node, tuple | None] = {}  # bias/mask → the scores' shape where applied

    def from_softmax(self, anchor: Node) -> FxAttentionMatch | None:
        softmax = _anchor_softmax(anchor)
        nodes = [anchor] + ([softmax] if softmax is not anchor else [])
        names = tuple(n.name for n in nodes)
        try:
            chain = trace_score_chain(self.gm, softmax.args[0], softmax)
        except ChainError as error:
            if not self._feeds_product(anchor):
                return None  # a softmax that touches no product is not an attention candidate
            return FxAttentionMatch(AttentionSpec("softmax", names, reason=str(error)))
        match = FxAttentionMatch(AttentionSpec("softmax", names))
        try:
            probabilities, pv_node = _follow_probabilities(anchor, nodes)
            self._find_batch_views(chain, nodes)
            scores = self._fill_from_products(match, chain, softmax, probabilities, pv_node)
            match.zero_masked_rows = ops.is_call(softmax, ops.SAFE_SOFTMAX)
            self._fill_masks(match, scores, chain.biases, chain.masks)
            match.query_factors = [(_query_factor(self._score_operand(node, scores, "scale"), scores), divides)
                                   for node, divides in chain.query_factors]
            _check_operand_shapes(match)
        except (_Rejected, LabelError, BatchViewError) as error:
            return FxAttentionMatch(self._spec(match, nodes, str(error)))
        match.scale, match.softcap = chain.scale, chain.softcap
        match.replaced = [pv_node] + nodes[::-1] + chain.nodes + [chain.product_node]
        match.spec = self._spec(match, match.replaced[::-1], None)
        return match

    def _feeds_product(self, anchor: Node) -> bool:
        try:
            _follow_probabilities(anchor, [])
            return True
        except _Rejected:
            return False

    def _find_batch_views(self, chain: ScoreChain, probability_nodes: list[Node]) -> None:
        """The block's batch split (None without batch views) and where each score operand applies."""
        block = [chain.product_node, *chain.nodes]
        self.split = batch_views.batch_split([_shape(node) for node in block + probability_nodes])
        self.segments = {}
        on_path = set(block)
        for node in block:
            scores_side = [arg for arg in node.all_input_nodes if arg in on_path]
            shape = _shape(scores_side[0]) if scores_side else _shape(node)
            for arg in node.all_input_nodes:
                if arg not in on_path:
                    self.segments[arg] = shape if self.segments.get(arg, shape) == shape else None

    def _key_label(self, scores: str, softmax: Node) -> str:
        """The label softmax normalises over, counted from the end when views change the rank."""
        rank = len(_shape(softmax.args[0]))
        from_end = _softmax_dim(softmax) % rank - rank
        if self.split is not None and from_end not in (-1, -2):
            raise _Rejected("softmax runs over a batch or head axis")
        return scores[from_end]

    def _fill_from_products(self, match, chain: ScoreChain, softmax, probabilities, pv_node):
        qk = compact_labels(chain.product, self.split is not None)
        scores = expand(qk.out_labels)
        axes = prove_qk_axes(scores, expand(qk.left_labels), expand(qk.right_labels), self._key_label(scores, softmax))
        if self.split is not None and {axes.query, axes.key} != set(scores[-2:]):
            raise _Rejected("batch views in a block whose query and key axes are not the last two")
        key_node, query_node = (qk.left, qk.right) if axes.key_on_left else (qk.right, qk.left)
        key_labels, query_labels = (qk.left_labels, qk.right_labels) if axes.key_on_left else (
            qk.right_labels, qk.left_labels)
        query, query_scale = _peel_scale(self.gm, Operand(query_node, query_labels, axes.query_order).before_permutes())
        key, key_scale = _peel_scale(self.gm, Operand(key_node, key_labels, axes.key_order).before_permutes())
        match.query, match.key = _split_operand(query, self.split), _split_operand(key, self.split)
        chain.scale *= query_scale * key_scale

        pv = label_product(pv_node)
        if pv.left is not probabilities and pv.right is not probabilities:
            raise _Rejected("probabilities are not an operand of the P·V product")
        pv = compact_labels(pv, self.split is not None)
        p_node, p_labels = pv.operand(probabilities)
        value_node, value_labels = (pv.right, pv.right_labels) if p_node is pv.left else (pv.left, pv.left_labels)
        if pv.added is not None or pv.alpha != 1 or p_node is pv.right and pv_node.target is not ops.aten.einsum.default:
            raise _Rejected("P·V is not a plain product of probabilities and V")
        pv_axes = prove_pv_axes(axes, scores, expand(p_labels), expand(value_labels), expand(pv.out_labels))
        value = _split_operand(Operand(value_node, value_labels, pv_axes.value_order).before_permutes(), self.split)
        match.key, match.value = _unexpanded_key_value(match.key, value)
        match.output, match.out_canonical, match.out_labels = pv_node, pv_axes.out_canonical, expand(pv.out_labels)
        product_shape = _shape(chain.product_node)
        if MERGED in qk.out_labels:
            product_shape = batch_views.split_shape(product_shape, qk.out_labels.index(MERGED), self.split)
        return ScoreAxes(scores, product_shape, axes.batch, axes.query, axes.key)

    def _score_operand(self, node: Node, scores: ScoreAxes, what: str) -> Operand:
        """A bias, mask or factor aligned with the scores where the model applies it."""
        segment = self.segments.get(node, scores.dims)
        if self.split is None or segment == scores.dims:
            return _aligned(node, scores.labels, scores.dims, what)
        if segment is None:
            raise _Rejected(f"{what} '{node.name}' is applied to scores of two different shapes")
        compact = scores.labels.replace(FINE, MERGED)
        operand = _aligned(node, compact, segment, what)
        return _split_operand(dataclasses.replace(operand, order=compact), self.split)

    def _fill_masks(self, match, scores_info: ScoreAxes, biases: list[tuple[Node, float]], masks: list[MaskStep]):
        """Sort biases and masks into the match (`mask_semantics.sort_score_terms`)."""
        scores, scores_shape, canonical = scores_info.labels, scores_info.dims, scores_info.canonical
        query_len = scores_shape[scores.index(scores_info.query)]
        key_len = scores_shape[scores.index(scores_info.key)]

        def aligned(node, what):
            return dataclasses.replace(self._score_operand(node, scores_info, what), order=canonical)

        def bias_offset(operand, factor, only_masking):
            # The causal flag passes no gradient to the keys it hides, as masked_fill does, where an added
            # −∞ passes on the NaN of a row with no key: a causal bias is the flag only where no row can be.
            offset = proven_bias_offset(operand, factor, only_masking)
            if offset is None or match.zero_masked_rows or (only_masking and offset >= 0):
                return offset
            return None

        def proven_bias_offset(operand, factor, only_masking):  # a recovered program is never evaluated densely
            if isinstance(operand, ConstantBias):
                return None
            if isinstance(operand, ProgramTerm):
                found = program_bias_offset(operand, factor, only_masking)
                if found is not None or isinstance(operand.dense, ConstantBias):
                    return found
                operand = operand.dense  # perhaps a tensor read as it is (one of several biases): proven on its value
            return self._causal_from_bias(operand, factor, query_len, key_len, only_masking)

        def mask_offset(operand, step, only_masking):
            if isinstance(operand, ProgramTerm):
                return program_mask_offset(operand, step, only_masking)
            return self._causal_from_mask(operand, step, query_len, key_len, only_masking)

        def term(node, what):
            return node if isinstance(node, ConstantBias) else aligned(node, what)

        aligned_biases = [(term(node, "bias"), factor) for node, factor in biases]
        aligned_masks = [aligned_fill_terms(dataclasses.replace(step, condition=aligned(step.condition, "mask")),
                                            lambda node: aligned(node, "bias")) for step in masks]
        builder = ProgramBuilder()
        translator = FxProgramTranslator(self.gm, builder)

        def translate(operand):
            return term_step(builder, operand, translator.operand)

        if self.score_programs:
            aligned_biases, aligned_masks = recover_terms(builder, aligned_biases, aligned_masks, translate,
                                                          match.zero_masked_rows, translator.leaf)
        reason = unexpressible(aligned_biases, lambda operand: isinstance(operand, ProgramTerm))
        if reason is not None:
            raise _Rejected(reason)
        try:
            sort_score_terms(match, aligned_biases, aligned_masks, bias_offset, mask_offset)
            if match.fill_step is not None:
                match.fill_program = fill_program_term(builder, match.fill_step, translate, self.score_programs)
        except ChainError as error:
            raise _Rejected(str(error)) from error

    def _canonical_constant(self, operand: Operand) -> np.ndarray | None:
        """The operand's value with axes in target order (absent ones of size 1), if constant."""
        value = constant_value(self.gm, operand.node)
        if not isinstance(value, torch.Tensor):
            return None
        if operand.view_shape is not None:
            value = value.reshape(operand.view_shape)
        labels = operand.labels
        for label in operand.order:
            if label not in labels:
                value, labels = value.unsqueeze(-1), labels + label
        value = value.permute([labels.index(label) for label in operand.order]).detach().cpu()
        return (value.float() if value.dtype in (torch.bfloat16, torch.float16) else value).numpy()

    def _causal_from_mask(self, operand, step: MaskStep, query_len, key_len, only_masking) -> int | None:
        keep = self._canonical_constant(operand)
        if keep is None or keep.dtype != np.bool_:
            return None
        offset = causal_offset_of_keep(keep if step.keep_when_true else ~keep, query_len, key_len)
        return offset if offset is not None and fill_is_neg_inf(step.fill, offset, only_masking) else None

    def _causal_from_bias(self, operand, factor, query_len, key_len, only_masking) -> int | None:
        bias = self._canonical_constant(operand)
        if bias is None or not np.issubdtype(bias.dtype, np.floating) or factor <= 0:
            return None
        found = causal_offset_of_bias(bias, query_len, key_len)
        if found is None:
            return None
        offset, fill = found
        return offset if fill_is_neg_inf(fill * factor, offset, only_masking) else None

    def from_sdpa(self, node: Node) -> FxAttentionMatch:
        args = list(node.args) + [None] * (8 - len(node.args))
        names = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        q, k, v, mask, dropout, is_causal, scale, gqa = args[:3] + [
            node.kwargs.get(name, args[3 + i]) for i, name in enumerate(names)
        ]
        match = FxAttentionMatch(AttentionSpec("softmax", (node.name,)))
        self.split, self.segments = None, {}
        try:
            if dropout:
                raise _Rejected(f"scaled_dot_product_attention with dropout_p={dropout}")
            rank = len(_shape(q))
            if rank not in (3, 4) or len(_shape(k)) != rank:
                raise _Rejected(f"scaled_dot_product_attention on rank-{rank} tensors")
            batch = "ab"[: rank - 2]
            match.query = Operand(q, batch + "MN", batch + "MN").before_permutes()
            match.key, match.value = _unexpanded_key_value(
                Operand(k, batch + "PN", batch + "PN").before_permutes(),
                Operand(v, batch + "PV", batch + "PV").before_permutes())
            match.output, match.out_canonical, match.out_labels = node, batch + "MV", batch + "MV"
            scores_shape = _shape(q)[:-1] + (_shape(k)[-2],)
            if _shape(q)[1] != _shape(k)[1] and rank == 4 and not gqa and _shape(k)[1] != 1:
                # K/V of one head broadcast to every query head (multi-query attention); other
                # counts need enable_gqa
                raise _Rejected("query and key head counts differ without enable_gqa")
            _check_operand_shapes(match)
            biases, masks = [], []
            if mask is not None:
                if ops.tensor_meta(mask).dtype.is_floating_point:
                    biases.append((mask, 1.0))
                else:
                    masks.append(MaskStep(mask, keep_when_true=True, fill=-math.inf))
            match.zero_masked_rows = True  # SDPA gives 0 for a row whose every key is masked
            self._fill_masks(match, ScoreAxes(batch + "MP", scores_shape, batch, "M", "P"), biases, masks)
            if is_causal:
                if match.causal:
                    raise _Rejected("is_causal together with a causal mask")
                match.causal, match.causal_offset = True, 0
        except _Rejected as error:
            match.spec = dataclasses.replace(match.spec, reason=str(error))
            return match
        match.scale = scale if scale is not None else 1.0 / math.sqrt(_shape(q)[-1])
        match.replaced = [node]
        match.spec = self._spec(match, [node], None)
        return match

    def _spec(self, match: FxAttentionMatch, nodes, reason) -> AttentionSpec:
        fields = {"nodes": tuple(n.name for n in nodes), "reason": reason}
        if reason is None:
            output_dtype = ops.tensor_meta(match.output).dtype
            if output_dtype != ops.tensor_meta(match.query.node).dtype:
                match.cast_output_to = output_dtype
        if match.query is not None and match.key is not None:
            fields.update(_layout_fields(match))
        if reason is None:
            fields.update(
                causal=match.causal, causal_offset=match.causal_offset, scale=match.scale,
                softcap=match.softcap or None, mask_kind=mask_kind(match.mask is not None, bool(match.biases)),
                mask_fill=match.mask_fill, **_operand_fields(match),
            )
        return dataclasses.replace(match.spec, **fields)


def _operand_name(term) -> str:
    """A dense bias term's name in the report: its node's, or the constant it adds."""
    dense = term.dense if isinstance(term, ProgramTerm) else term
    if isinstance(dense, ConstantBias):
        return f"the constant {dense.value:g}"
    return dense.node.name


def _operand_fields(match: FxAttentionMatch) -> dict:
    """What the mask and bias become in the rewrite (`rewrite_attention._score_terms` takes a bias
    program only where every bias term has one)."""
    terms = [operand for operand, _ in match.biases]
    programs = terms and all(isinstance(term, ProgramTerm) for term in terms)
    bias_program = terms[0].builder.program(combined_bias(match.biases)) if programs else None
    mask_program = match.mask.program if isinstance(match.mask, ProgramTerm) else None
    builder = next((term.builder for term in (match.mask, *terms) if isinstance(term, ProgramTerm)), None)
    loaded = sorted({step.attr for program in (mask_program, bias_program) if program is not None
                     for step in program.steps if step.op == "load"})
    return operand_fields(
        mask_program=mask_program, bias_program=bias_program,
        dense_mask=None if match.mask is None or mask_program is not None else match.mask.node.name,
        dense_biases=[] if programs else [_operand_name(term) for term in terms],
        leaves=[builder.leaves[index].name for index in loaded], causal=match.causal)


def _layout_fields(match: FxAttentionMatch) -> dict:
    query_shape, key_shape = _operand_shape(match.query), _operand_shape(match.key)
    q_seq, head_dim = match.query.order[-2], match.query.order[-1]
    k_seq = match.key.order[-2]
    batch = match.query.order[:-2]
    fields = {
        "q_layout": layout_name(match.query.labels, match.query.order),
        "k_layout": layout_name(match.key.labels, match.key.order),
        "seq_len_q": _static(query_shape[match.query.labels.index(q_seq)]),
        "seq_len_k": _static(key_shape[match.key.labels.index(k_seq)]),
        "head_dim": _static(query_shape[match.query.labels.index(head_dim)]),
    }
    sizes = [query_shape[match.query.labels.index(label)] for label in batch] + [1, 1]
    batch_size, num_heads = (sizes[0], sizes[1]) if len(batch) == 2 else (sizes[0], 1)
    fields["batch_size"], fields["num_heads"] = _static(batch_size), _static(num_heads)
    heads = batch[1] if len(batch) == 2 else "-"
    fields["num_kv_heads"] = _static(key_shape[match.key.labels.index(heads)]) if heads in match.key.labels else 1
    if match.value is not None:
        value_shape = _operand_shape(match.value)
        fields["v_layout"] = layout_name(match.value.labels, match.value.order)
        fields["value_head_dim"] = _static(value_shape[match.value.labels.index(match.value.order[-1])])
        fields["out_layout"] = layout_name(match.out_labels, match.out_canonical)
    return fields


def detect_softmax_attention(gm: GraphModule, score_programs: bool = True) -> list[FxAttentionMatch]:
    """Every attention candidate in `gm`, in graph order, accepted or with a rejection reason.

    With `score_programs`, masks and biases are recovered as programs where their producers allow
    (`passes.fx.score_program_recovery`); else they stay tensor operands.
    """
    builder = _Builder(gm, score_programs)
    matches = []
    for node in list(gm.graph.nodes):
        try:
            if ops.is_call(node, ops.SDPA):
                match = builder.from_sdpa(node)
            elif _anchor_softmax(node) is not None:
                match = builder.from_softmax(node)
            else:
                continue
        except Exception as error:  # noqa: BLE001 - one unanalysable candidate must not stop the others
            logger.exception("analysing %s failed", node.name)
            match = FxAttentionMatch(AttentionSpec("softmax", (node.name,), reason=f"not analysed: {error!r}"))
        if match is not None:
            matches.append(match)
    for match in matches:
        logger.info("%s: %s", match.spec.nodes[0], "match" if match.spec.accepted else match.spec.reason)
    return matches
