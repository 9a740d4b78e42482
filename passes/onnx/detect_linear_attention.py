"""Find Performer / linear attention in an ONNX graph and prove each block, axis by axis.

Anchored at the three-operand output ``Einsum`` that torch's exporters write for performer-pytorch's
attention functions::

    φ(q) ─────────────────────────────┬───────────────────────────────────┐
    φ(k) ─ ReduceSum(keys) ─ Einsum(φq, ·) ─ Reciprocal ─ (Mul 1.0) ─ D⁻¹ ┤
    φ(k), v ─ Einsum(→ d e) ─ context ─────────────── Einsum(context, φq, D⁻¹) ─ out
    (causal: CumSum over the keys instead of ReduceSum; context Einsum(→ n d e) then CumSum over n)

and at ``Mul(MatMul(φq, MatMul(Transpose(φk), v)), Reciprocal(MatMul(φq, Transpose(ReduceSum(φk)))))``,
the matmul form of the bidirectional block. Every label is proven per einsum by position (batch…,
sequence, features, value dim), sums and prefix sums must run over the key axis (``CumSum`` not
exclusive, not reversed), q, k, v must share batch and head axes, φ(q) and φ(k) must be the same
feature map (`linear_feature_maps`), and no intermediate may have a user outside the block.
Anything else becomes a rejected `AttentionSpec` whose reason says what failed.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from passes.attention_spec import AttentionSpec
from passes.onnx.graph_values import attribute, const_array, is_op, producer_op
from passes.onnx.labelled_ops import axes_of, einsum_labels, rank_of
from passes.onnx.linear_feature_maps import OnnxFeatureMap, match_feature_map, require_closed, split_scale
from passes.onnx.onnx_match import AnalysisContext, Rejected
from passes.onnx.shape_facts import ShapeFacts

__all__ = ["OnnxLinearAttentionMatch", "detect_linear_attention"]

logger = logging.getLogger(__name__)


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


def _reciprocal(ctx: AnalysisContext, value: ir.Value, nodes: list[ir.Node]) -> ir.Value:
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


def _strip(value: ir.Value, nodes: list[ir.Node]) -> ir.Value:
    while (node := producer_op(value, "Cast", "Identity")) is not None:
        nodes.append(node)
        value = node.inputs[0]
    return value


def _prefix_sum(ctx: AnalysisContext, value: ir.Value, axis: int, what: str, nodes: list[ir.Node]) -> ir.Value:
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


def _key_sum(ctx: AnalysisContext, value: ir.Value, axis: int, keepdims: bool, nodes: list[ir.Node]) -> ir.Value:
    """x for `ReduceSum(x, [axis], keepdims)`."""
    node = producer_op(value, "ReduceSum")
    rank = rank_of(ctx, node.inputs[0]) if node is not None else None
    if node is None or rank is None or axes_of(ctx, node, rank) != {axis} or \
            bool(attribute(node, "keepdims", 1)) != keepdims:
        raise Rejected("the normaliser sums φ(k) over an axis other than the keys")
    nodes.append(node)
    return node.inputs[0]


def _two_operand_einsum(ctx: AnalysisContext, value: ir.Value, what: str):
    parsed = einsum_labels(ctx, producer_op(value, "Einsum"))
    if parsed is None or len(parsed[0]) != 2:
        raise Rejected(f"{what} is not an einsum of two operands")
    return parsed


def _match_einsum(ctx: AnalysisContext, anchor: ir.Node) -> OnnxLinearAttentionMatch:
    parsed = einsum_labels(ctx, anchor)
    if parsed is None:
        raise Rejected("the ranks of the output product's operands are unknown (shape inference gave none)")
    (context, phi_q, d_inv), (c_lab, q_lab, n_lab), out = parsed
    batch, n, e, d = out[:-2], out[-2:-1], out[-1:], q_lab[-1:]
    seq = len(batch)
    if q_lab != batch + n + d or n_lab != batch + n:
        raise Rejected("the output product is not over (φ(q), D⁻¹) rows")
    if c_lab not in (batch + d + e, batch + n + d + e):
        raise Rejected("the output product's context is neither (d, e) nor prefix-summed (n, d, e)")
    causal = c_lab == batch + n + d + e
    nodes = [anchor]
    denominator = _reciprocal(ctx, d_inv, nodes)
    (dq, key_sum), (dq_lab, ks_lab), dout = _two_operand_einsum(ctx, denominator, "the normaliser")
    nodes.append(denominator.producer())
    if dq is not phi_q:
        raise Rejected("the normaliser uses a different φ(q) than the output")
    db, dn, dd = dq_lab[:-2], dq_lab[-2:-1], dq_lab[-1:]
    if len(db) != seq or dout != db + dn or ks_lab != (dq_lab if causal else db + dd):
        raise Rejected("the normaliser is not φ(q_n)·Σ_{j≤n}φ(k_j)" if causal else
                       "the normaliser is not φ(q)·Σφ(k) over the features")
    key_sum = _strip(key_sum, nodes)
    if causal:
        phi_k = _prefix_sum(ctx, key_sum, seq, "the normaliser's key sum", nodes)
        kv = _prefix_sum(ctx, context, seq, "the causal context", nodes)
    else:
        phi_k, kv = _key_sum(ctx, key_sum, seq, False, nodes), context
    (kv_k, value), (k_lab, v_lab), kv_out = _two_operand_einsum(ctx, kv, "the context")
    nodes.append(kv.producer())
    kb, kn, kd, ve = k_lab[:-2], k_lab[-2:-1], k_lab[-1:], v_lab[-1:]
    if len(kb) != seq or v_lab != kb + kn + ve or kv_out != kb + (kn if causal else "") + kd + ve:
        raise Rejected("the context does not pair φ(k) and v over the key axis into φ(k)·vᵀ")
    if kv_k is not phi_k:
        raise Rejected("the normaliser's key sum is not over the same φ(k) as the context")
    return _finish(ctx, anchor, nodes, causal, phi_q, phi_k, value)


def _transposed_last_two(value: ir.Value, nodes: list[ir.Node]) -> ir.Value:
    node = producer_op(value, "Transpose")
    rank = len(attribute(node, "perm", [])) if node is not None else 0
    if node is None or list(attribute(node, "perm")) != list(range(rank - 2)) + [rank - 1, rank - 2]:
        raise Rejected(f"'{value.name}' is not a transpose of the last two axes")
    nodes.append(node)
    return node.inputs[0]


def _matmul_4d(ctx: AnalysisContext, value: ir.Value, what: str) -> ir.Node:
    """The MatMul producing `value`, when both its operands are 4-D (no broadcast rank)."""
    node = producer_op(value, "MatMul")
    if node is None or any(rank_of(ctx, x) != 4 for x in node.inputs):
        raise Rejected(f"{what} is not a product of 4-D operands")
    return node


def _match_matmul(ctx: AnalysisContext, anchor: ir.Node) -> OnnxLinearAttentionMatch:
    """`MatMul(φq, MatMul(φkᵀ, v)) · 1/MatMul(φq, (Σ_keys φk)ᵀ)`: bidirectional linear attention."""
    nodes = [anchor]
    numerator, d_inv = anchor.inputs
    if producer_op(numerator, "MatMul") is None:
        numerator, d_inv = d_inv, numerator
    product = _matmul_4d(ctx, numerator, "the output φ(q)·context")
    nodes.append(product)
    phi_q, context = product.inputs
    kv = _matmul_4d(ctx, context, "the context φ(k)ᵀ·v")
    nodes.append(kv)
    phi_k, value = _transposed_last_two(kv.inputs[0], nodes), kv.inputs[1]
    denominator = _reciprocal(ctx, d_inv, nodes)
    den = _matmul_4d(ctx, denominator, "the normaliser φ(q)·(Σφ(k))ᵀ")
    if den.inputs[0] is not phi_q:
        raise Rejected("the normaliser uses a different φ(q) than the output")
    nodes.append(den)
    key_sum = _transposed_last_two(_strip(den.inputs[1], nodes), nodes)
    if _key_sum(ctx, _strip(key_sum, nodes), 2, True, nodes) is not phi_k:
        raise Rejected("the normaliser's key sum is not over the same φ(k) as the context")
    return _finish(ctx, anchor, nodes, False, phi_q, phi_k, value)


def _same_projection(a: ir.Value | None, b: ir.Value | None) -> bool:
    if a is None or b is None or a is b:
        return a is b
    left, right = const_array(a), const_array(b)
    return left.shape == right.shape and bool(np.array_equal(left, right))


def _finish(ctx: AnalysisContext, anchor: ir.Node, nodes: list[ir.Node], causal: bool, phi_q: ir.Value,
            phi_k: ir.Value, value: ir.Value) -> OnnxLinearAttentionMatch:
    """Prove both feature maps and the q, k, v axes, check that the block is closed, build the match."""
    query, key = match_feature_map(ctx, phi_q, True), match_feature_map(ctx, phi_k, False)
    if (query.kind, query.data_scale, query.epsilon) != (key.kind, key.data_scale, key.epsilon) or \
            not _same_projection(query.projection, key.projection):
        raise Rejected("φ(q) and φ(k) are different feature maps")
    dims = [ctx.facts.dims(x) for x in (query.source, key.source, value)]
    if any(d is None or len(d) != 4 for d in dims):
        raise Rejected("q, k, v are not 4-D (batch, heads, length, dim)")
    (q, k, v) = dims
    shared = [(q[0], k[0]), (k[0], v[0]), (q[1], k[1]), (k[1], v[1]), (k[2], v[2])] + [(q[2], k[2])] * causal
    if not all(ShapeFacts.same(a, b) for a, b in shared):
        raise Rejected("cannot prove that q, k and v share batch, head (and, causal, sequence) axes")
    block = list(dict.fromkeys(nodes + list(query.nodes) + list(key.nodes)))
    require_closed(block[1:], set(block), "linear-attention")
    spec = AttentionSpec(
        "performer", tuple(node.name for node in block), causal=causal, feature_map=query.kind,
        batch_size=_static(q[0]), num_heads=_static(q[1]), num_kv_heads=_static(k[1]), seq_len_q=_static(q[2]),
        seq_len_k=_static(k[2]), head_dim=_static(q[3]), value_head_dim=_static(v[3]),
        q_layout="BHLD", k_layout="BHLD", v_layout="BHLD", out_layout="BHLD", scale=query.data_scale,
    )
    return OnnxLinearAttentionMatch(spec, anchor, anchor.outputs[0], query, key, value, causal, block)


def _static(dim) -> int | None:
    return dim if isinstance(dim, int) else None


def _is_einsum_anchor(ctx: AnalysisContext, node: ir.Node) -> bool:
    return is_op(node, "Einsum") and len(node.inputs) == 3


def _is_matmul_anchor(ctx: AnalysisContext, node: ir.Node) -> bool:
    """`Mul(MatMul, D⁻¹)` where D⁻¹ is a Reciprocal (optionally times 1) or `Div(1, ·)`."""
    if not is_op(node, "Mul"):
        return False
    for product, d_inv in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        inner = split_scale(ctx, d_inv)[0]
        divide = producer_op(inner, "Div")
        if producer_op(product, "MatMul") is not None and (
                producer_op(inner, "Reciprocal") is not None or
                divide is not None and ctx.folder.scalar(divide.inputs[0]) == 1.0):
            return True
    return False


def detect_linear_attention(ctx: AnalysisContext) -> list[OnnxLinearAttentionMatch]:
    """Every Performer-style candidate in the model and its subgraphs, accepted or with a reason."""
    matches = []
    for node in ir.traversal.RecursiveGraphIterator(ctx.model.graph):
        if _is_einsum_anchor(ctx, node):
            attempt = _match_einsum
        elif _is_matmul_anchor(ctx, node):
            attempt = _match_matmul
        else:
            continue
        try:
            match = attempt(ctx, node)
        except Rejected as rejection:
            match = OnnxLinearAttentionMatch(AttentionSpec("performer", (node.name,), reason=str(rejection)), node)
        except Exception as error:  # noqa: BLE001 - one unanalysable block must not stop the others
            logger.exception("analysing %s failed", node.name)
            match = OnnxLinearAttentionMatch(AttentionSpec("performer", (node.name,),
                                                           reason=f"not analysed: {error!r}"), node)
        logger.info("linear attention at %s: %s", node.name, "match" if match.spec.accepted else match.spec.reason)
        matches.append(match)
    return matches
