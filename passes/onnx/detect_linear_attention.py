"""Find Performer / linear attention in an ONNX graph and prove each block, axis by axis.

Anchored at the three-operand output ``Einsum`` that torch's exporters write for performer-pytorch's
attention functions::

    φ(q) ─────────────────────────────┬───────────────────────────────────┐
    φ(k) ─ ReduceSum(keys) ─ Einsum(φq, ·) ─ Reciprocal ─ (Mul 1.0) ─ D⁻¹ ┤
    φ(k), v ─ Einsum(→ d e) ─ context ─────────────── Einsum(context, φq, D⁻¹) ─ out
    (causal: CumSum over the keys instead of ReduceSum; context Einsum(→ n d e) then CumSum over n)

at ``Mul(MatMul(φq, MatMul(Transpose(φk), v)), Reciprocal(MatMul(φq, Transpose(ReduceSum(φk)))))``,
the matmul form of the bidirectional block, and at the ``Concat`` of performer-pytorch's chunked
causal form (`chunked_linear_attention`). Every label is proven per einsum by position (batch…,
sequence, features, value dim), sums and prefix sums must run over the key axis (``CumSum`` not
exclusive, not reversed), q, k, v must share batch and head axes, φ(q) and φ(k) must be the same
feature map (`linear_feature_maps`), and no intermediate may have a user outside the block.
Anything else becomes a rejected `AttentionSpec` whose reason says what failed.
"""

from __future__ import annotations

import logging

import onnx_ir as ir

from passes.core.attention_spec import AttentionSpec
from passes.onnx.chunked_linear_attention import is_chunked_anchor, match_chunked
from passes.onnx.graph_values import attribute, is_op, producer_op
from passes.onnx.labelled_ops import rank_of
from passes.onnx.linear_block import (
    LAYOUT_REJECTION as _LAYOUT_REJECTION,
    OnnxLinearAttentionMatch,
    finish_block,
    key_sum_epsilon_of,
    key_sum_of,
    output_product,
    prefix_sum_of,
    reciprocal_of,
    strip_casts,
    two_operand_einsum,
)
from passes.onnx.linear_feature_maps import split_scale
from passes.onnx.onnx_match import AnalysisContext, Rejected
from passes.onnx.sequence_major_linear import is_product_times_normaliser, match_sequence_major

__all__ = ["OnnxLinearAttentionMatch", "detect_linear_attention"]

logger = logging.getLogger(__name__)


def _match_einsum(ctx: AnalysisContext, anchor: ir.Node) -> OnnxLinearAttentionMatch:
    product = output_product(ctx, anchor, "the output product")
    context, phi_q, d_inv, c_lab = product.context, product.phi_q, product.d_inv, product.context_labels
    batch, n, e, d = product.batch, product.n, product.e, product.d
    seq = len(batch)
    if c_lab not in (batch + d + e, batch + n + d + e):
        raise Rejected("the output product's context is neither (d, e) nor prefix-summed (n, d, e)")
    causal = c_lab == batch + n + d + e
    nodes = [anchor]
    denominator = reciprocal_of(ctx, d_inv, nodes)
    (dq, key_sum), (dq_lab, ks_lab), dout = two_operand_einsum(ctx, denominator, "the normaliser")
    nodes.append(denominator.producer())
    if dq is not phi_q:
        raise Rejected("the normaliser uses a different φ(q) than the output")
    db, dn, dd = dq_lab[:-2], dq_lab[-2:-1], dq_lab[-1:]
    if len(db) != seq or dout != db + dn or ks_lab != (dq_lab if causal else db + dd):
        raise Rejected("the normaliser is not φ(q_n)·Σ_{j≤n}φ(k_j)" if causal else
                       "the normaliser is not φ(q)·Σφ(k) over the features")
    key_sum, key_sum_epsilon = key_sum_epsilon_of(ctx, key_sum, nodes)
    if causal:
        phi_k = prefix_sum_of(ctx, key_sum, seq, "the normaliser's key sum", nodes)
        kv = prefix_sum_of(ctx, context, seq, "the causal context", nodes)
    else:
        phi_k, kv = key_sum_of(ctx, key_sum, seq, False, nodes), context
    (kv_k, value), (k_lab, v_lab), kv_out = two_operand_einsum(ctx, kv, "the context")
    nodes.append(kv.producer())
    kb, kn, kd, ve = k_lab[:-2], k_lab[-2:-1], k_lab[-1:], v_lab[-1:]
    if len(kb) != seq or v_lab != kb + kn + ve or kv_out != kb + (kn if causal else "") + kd + ve:
        raise Rejected("the context does not pair φ(k) and v over the key axis into φ(k)·vᵀ")
    if kv_k is not phi_k:
        raise Rejected("the normaliser's key sum is not over the same φ(k) as the context")
    return finish_block(ctx, anchor, nodes, causal, phi_q, phi_k, value, key_sum_epsilon)


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
    denominator = reciprocal_of(ctx, d_inv, nodes)
    den = _matmul_4d(ctx, denominator, "the normaliser φ(q)·(Σφ(k))ᵀ")
    if den.inputs[0] is not phi_q:
        raise Rejected("the normaliser uses a different φ(q) than the output")
    nodes.append(den)
    key_sum = _transposed_last_two(strip_casts(den.inputs[1], nodes), nodes)
    if key_sum_of(ctx, strip_casts(key_sum, nodes), 2, True, nodes) is not phi_k:
        raise Rejected("the normaliser's key sum is not over the same φ(k) as the context")
    return finish_block(ctx, anchor, nodes, False, phi_q, phi_k, value)


def _match_any_layout(ctx: AnalysisContext, anchor: ir.Node) -> OnnxLinearAttentionMatch:
    """performer-pytorch's (B, H, L, D) output product, else one in another layout (fast-transformers')."""
    try:
        return _match_einsum(ctx, anchor)
    except Rejected as rejection:
        if not str(rejection).endswith(_LAYOUT_REJECTION):
            raise
        return match_sequence_major(ctx, anchor)


def _is_einsum_anchor(ctx: AnalysisContext, node: ir.Node) -> bool:
    return is_op(node, "Einsum") and len(node.inputs) == 3


def _is_matmul_anchor(ctx: AnalysisContext, node: ir.Node) -> bool:
    """`Mul(MatMul, D⁻¹)` where D⁻¹ is 1 / MatMul: `Reciprocal` (optionally times 1) or `Div(1, ·)`.

    The denominator must itself be a product, so that normalisations such as RMSNorm's
    `x · Reciprocal(Sqrt(·))` are not candidates at all.
    """
    if not is_op(node, "Mul"):
        return False
    for product, d_inv in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        inner = split_scale(ctx, d_inv)[0]
        reciprocal, divide = producer_op(inner, "Reciprocal"), producer_op(inner, "Div")
        if divide is not None and ctx.folder.scalar(divide.inputs[0]) != 1.0:
            divide = None
        denominator = reciprocal.inputs[0] if reciprocal else divide.inputs[1] if divide else None
        if producer_op(product, "MatMul") is not None and producer_op(denominator, "MatMul") is not None:
            return True
    return False


def detect_linear_attention(ctx: AnalysisContext) -> list[OnnxLinearAttentionMatch]:
    """Every Performer-style candidate in the model and its subgraphs, accepted or with a reason.

    A chunked causal block (chunk outputs concatenated, prefix sums carried from chunk to chunk) is
    one candidate anchored at its Concat; its per-chunk products are not candidates of their own.
    """
    nodes = list(ir.traversal.RecursiveGraphIterator(ctx.model.graph))
    covered = {x.producer() for node in nodes if is_chunked_anchor(node) for x in node.inputs}
    matches = []
    for node in nodes:
        if is_chunked_anchor(node):
            attempt = match_chunked
        elif _is_einsum_anchor(ctx, node) and node not in covered:
            attempt = _match_any_layout
        elif _is_matmul_anchor(ctx, node):
            attempt = _match_matmul
        elif is_product_times_normaliser(ctx, node):
            attempt = match_sequence_major
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
