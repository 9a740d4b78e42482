"""The parts of a Performer block that every ONNX form shares, proven one at a time.

`OnnxLinearAttentionMatch` is what a detector hands to the rewrite. The readers take one value and
return what it is made of when it is what they expect (D⁻¹ = ``Reciprocal(x)``, a forward inclusive
``CumSum`` over the key axis, a ``ReduceSum`` over the keys, a two-operand einsum), recording the
nodes they walked; otherwise they raise `Rejected` with the reason. `finish_block` proves both feature
maps, the shared batch/head axes of q, k, v and that no intermediate leaks out, and builds the match.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from passes.core.attention_spec import AttentionSpec
from passes.core.linear_roles import layout_name
from passes.onnx.graph_values import attribute, const_array, producer_op
from passes.onnx.labelled_ops import axes_of, einsum_labels, rank_of
from passes.onnx.linear_feature_maps import OnnxFeatureMap, match_feature_map, require_closed, split_scale
from passes.onnx.onnx_match import AnalysisContext, Rejected
from passes.onnx.shape_facts import ShapeFacts

__all__ = ["LAYOUT_REJECTION", "OnnxLinearAttentionMatch", "OutputProduct", "finish_block", "output_product",
           "key_sum_epsilon_of", "key_sum_of",
           "prefix_sum_of", "reciprocal_of", "strip_casts",
           "two_operand_einsum"]

logger = logging.getLogger(__name__)

LAYOUT_REJECTION = "is not over (φ(q), D⁻¹) rows"  # an output product in another layout (`sequence_major_linear`)


@dataclasses.dataclass
class OnnxLinearAttentionMatch:
    """One Performer candidate: the spec, and for an accepted one what the rewrite needs."""

    spec: AttentionSpec
    anchor: ir.Node
    output: ir.Value | None = None  # the value the rewrite replaces
    query: OnnxFeatureMap | None = None  # φ(q) proven; its source is q before the feature map
    key: OnnxFeatureMap | None = None
    value: ir.Value | None = None
    causal: bool = False
    nodes: list[ir.Node] = dataclasses.field(default_factory=list)  # dead once `output` is replaced
    key_sum_epsilon: float = 0.0  # added to every (prefix-)summed key feature: φ(q)·(Σφ(k) + ε)
    normalizer_epsilon: float = 0.0  # added after the product: φ(q)·Σφ(k) + ε (fast-transformers)
    # (q, k, v to (B, H, L, D), the (B, H, L, Dv) result back to the output's layout); None: all (B, H, L, D)
    permutations: tuple[tuple[int, ...], ...] | None = None


@dataclasses.dataclass(frozen=True)
class OutputProduct:
    """`Einsum(context, φ(q), D⁻¹)`, the block's output: its operands, the context's labels, and the
    output's labels split into batch axes, the query axis `n` and the value axis `e` (`d`: φ(q)'s features)."""

    context: ir.Value
    phi_q: ir.Value
    d_inv: ir.Value
    context_labels: str
    batch: str
    n: str
    e: str
    d: str


def output_product(ctx: AnalysisContext, anchor: ir.Node, what: str) -> OutputProduct:
    """`anchor` read as the three-operand output product, or `Rejected` saying why not."""
    parsed = einsum_labels(ctx, anchor)
    if parsed is None:
        raise Rejected(f"the ranks of {what}'s operands are unknown (shape inference gave none)")
    (context, phi_q, d_inv), (c_lab, q_lab, n_lab), out = parsed
    batch, n, e, d = out[:-2], out[-2:-1], out[-1:], q_lab[-1:]
    if q_lab != batch + n + d or n_lab != batch + n:
        raise Rejected(f"{what} {LAYOUT_REJECTION}")
    return OutputProduct(context, phi_q, d_inv, c_lab, batch, n, e, d)


def reciprocal_of(ctx: AnalysisContext, value: ir.Value, nodes: list[ir.Node]) -> ir.Value:
    """x for D⁻¹ written `Reciprocal(x)` (optionally times 1.0) or `Div(1, x)`."""
    inner, factor, scale = split_scale(ctx, value)
    if factor != 1.0:
        raise Rejected("the normaliser is scaled")
    nodes += [scale] if scale is not None else []
    if (node := producer_op(inner, "Reciprocal")) is not None:
        nodes.append(node)
        return node.inputs[0]
    if (node := producer_op(inner, "Div")) is not None and ctx.folder.scalar(node.inputs[0]) == 1.0:
        nodes.append(node)
        return node.inputs[1]
    raise Rejected("the normaliser is not 1 / (φ(q)·Σφ(k))")


def key_sum_epsilon_of(ctx: AnalysisContext, value: ir.Value, nodes: list[ir.Node]) -> tuple[ir.Value, float]:
    """(Σφ(k), ε) for the normaliser's `Σφ(k) + ε` (casts around either stripped; ε 0 when absent)."""
    value = strip_casts(value, nodes)
    add = producer_op(value, "Add")
    constants = [] if add is None else [ctx.folder.scalar(x) for x in add.inputs]
    if add is None or constants.count(None) != 1:
        return value, 0.0
    nodes.append(add)
    data = add.inputs[constants.index(None)]
    return strip_casts(data, nodes), next(c for c in constants if c is not None)


def strip_casts(value: ir.Value, nodes: list[ir.Node]) -> ir.Value:
    """The value before Cast / Identity nodes (torch's `type_as`)."""
    while (node := producer_op(value, "Cast", "Identity")) is not None:
        nodes.append(node)
        value = node.inputs[0]
    return value


def prefix_sum_of(ctx: AnalysisContext, value: ir.Value, axis: int, what: str, nodes: list[ir.Node]) -> ir.Value:
    """x for `CumSum(x, axis)`, inclusive and forward."""
    node = producer_op(value, "CumSum")
    rank = rank_of(ctx, value)
    if node is None or rank is None:
        raise Rejected(f"{what} is not prefix-summed (CumSum)")
    if axes_of(ctx, node, rank) != {axis}:
        raise Rejected(f"{what} is prefix-summed over an axis other than the keys")
    if attribute(node, "exclusive", 0) or attribute(node, "reverse", 0):
        raise Rejected(f"{what} is an exclusive or reversed prefix sum ('{node.name}'), not Σ_{{j≤n}}")
    nodes.append(node)
    return node.inputs[0]


def key_sum_of(ctx: AnalysisContext, value: ir.Value, axis: int, keepdims: bool, nodes: list[ir.Node]) -> ir.Value:
    """x for `ReduceSum(x, [axis], keepdims)`."""
    node = producer_op(value, "ReduceSum")
    rank = rank_of(ctx, node.inputs[0]) if node is not None else None
    if node is None or rank is None or axes_of(ctx, node, rank) != {axis} or \
            bool(attribute(node, "keepdims", 1)) != keepdims:
        raise Rejected("the normaliser sums φ(k) over an axis other than the keys")
    nodes.append(node)
    return node.inputs[0]


def two_operand_einsum(ctx: AnalysisContext, value: ir.Value, what: str):
    parsed = einsum_labels(ctx, producer_op(value, "Einsum"))
    if parsed is None or len(parsed[0]) != 2:
        raise Rejected(f"{what} is not an einsum of two operands")
    return parsed


def _same_projection(a: ir.Value | None, b: ir.Value | None) -> bool:
    if a is None or b is None or a is b:
        return a is b
    left, right = const_array(a), const_array(b)
    return left.shape == right.shape and bool(np.array_equal(left, right))


def finish_block(ctx: AnalysisContext, anchor: ir.Node, nodes: list[ir.Node], causal: bool, phi_q: ir.Value,
                 phi_k: ir.Value, value: ir.Value, key_sum_epsilon: float = 0.0, normalizer_epsilon: float = 0.0,
                 permutations: tuple[tuple[int, ...], ...] | None = None) -> OnnxLinearAttentionMatch:
    """Prove both feature maps and the q, k, v axes, check that the block is closed, build the match.

    `permutations` (q, k, v to (B, H, L, D), the result back) give a block written in another layout.
    """
    query, key = match_feature_map(ctx, phi_q, True), match_feature_map(ctx, phi_k, False)
    if (query.kind, query.data_scale, query.epsilon) != (key.kind, key.data_scale, key.epsilon) or \
            not _same_projection(query.projection, key.projection):
        raise Rejected("φ(q) and φ(k) are different feature maps")
    if permutations is not None and (query.projection is not None or query.kind == "favor_softmax"):
        raise Rejected("a projected feature map outside the (batch, heads, length, dim) layout")
    dims = [ctx.facts.dims(x) for x in (query.source, key.source, value)]
    if any(d is None or len(d) != 4 for d in dims):
        raise Rejected("q, k, v are not 4-D (batch, heads, length, dim)")
    q_perm, k_perm, v_perm, out_perm = permutations or ((0, 1, 2, 3),) * 4
    (q, k, v) = ([d[a] for a in perm] for d, perm in zip(dims, (q_perm, k_perm, v_perm)))
    shared = [(q[0], k[0]), (k[0], v[0]), (q[1], k[1]), (k[1], v[1]), (k[2], v[2])]
    if not all(ShapeFacts.same(a, b) for a, b in shared):
        raise Rejected("cannot prove that q, k and v share batch and head axes")
    if not ShapeFacts.same(q[2], k[2]):  # the ONNX replacement slices keys by the query length
        raise Rejected("cannot prove that queries and keys have the same length")
    block = list(dict.fromkeys(nodes + list(query.nodes) + list(key.nodes)))
    require_closed(block[1:], set(block), "linear-attention")
    spec = AttentionSpec(
        "performer", tuple(node.name for node in block), causal=causal, feature_map=query.kind,
        batch_size=_static(q[0]), num_heads=_static(q[1]), num_kv_heads=_static(k[1]), seq_len_q=_static(q[2]),
        seq_len_k=_static(k[2]), head_dim=_static(q[3]), value_head_dim=_static(v[3]),
        q_layout=layout_name(q_perm), k_layout=layout_name(k_perm), v_layout=layout_name(v_perm),
        out_layout="".join("BHLD"[axis] for axis in out_perm), scale=query.data_scale,
    )
    return OnnxLinearAttentionMatch(spec, anchor, anchor.outputs[0], query, key, value, causal, block, key_sum_epsilon,
                                    normalizer_epsilon, permutations)


def _static(dim) -> int | None:
    return dim if isinstance(dim, int) else None
