"""Find Performer / linear attention in an exported FX graph and prove each block.

Anchored at the three-operand output product of performer-pytorch's attention functions::

    φ(q) ─────────────────────────┬──────────────────────────────┐
    φ(k) ─ sum(keys) ─ type_as ─ einsum(φq, ·) ─ 1/· ─ (·1.0) ─ D⁻¹ ┤
    φ(k), v ─ einsum(→ d e) ─ context ──────────────────── einsum(context, φq, D⁻¹) ─ out
    (causal: cumsum over keys instead of sum; context einsum(→ n d e) then cumsum over n)

also at `(φq @ (φkᵀ @ v)) * 1/(φq @ Σφkᵀ)` (matmul / bmm), and at the `cat` of performer-pytorch's
chunked causal form, whose chunks continue the previous chunk's prefix sums (`last_k_cumsum`,
`last_context_cumsum`): the whole group is one candidate. The ε that performer-pytorch's causal
paths add to the prefix-summed keys (`k_cumsum + eps`) becomes the op's `key_sum_epsilon`. A
one-input `cat` (performer-pytorch's `SelfAttention` joins its global heads to its absent local
heads so) is an identity and transparent: its one piece is the candidate. φ(q) and φ(k) are then proven by
`performer_feature_maps`. An output product in another layout (fast-transformers' (N, L, H, D)), and
the causal `num * Z[..., None]` of that package, go to `sequence_major_linear`. Every axis is proven
from product labels and reduction dims, and every
intermediate may have no user outside the block. Anything else becomes a rejected
`AttentionSpec` whose reason says what failed.
"""

from __future__ import annotations

import dataclasses
import logging
import operator

import torch
from torch.fx import GraphModule, Node

from passes.core.attention_spec import AttentionSpec
from passes.core.linear_roles import layout_name
from passes.fx import aten_vocabulary as ops
from passes.fx.constant_values import scalar_constant
from passes.fx.detect_softmax_attention import Operand
from passes.fx.performer_feature_maps import (
    FeatureMapMatch,
    NotProven as _Rejected,
    axis_of as _axis,
    dims_of as _dims,
    einsum_labels as _einsum,
    match_feature_map,
    only_user as _only_user,
    split_scale as _split_scale,
)
from passes.fx.product_labels import label_product
from passes.fx.sequence_major_linear import is_causal_product_anchor, match_sequence_major

__all__ = ["FxLinearAttentionMatch", "detect_linear_attention"]

logger = logging.getLogger(__name__)
aten = torch.ops.aten

_LAYOUT_REJECTION = "output product is not over (φ(q), D⁻¹) rows"


@dataclasses.dataclass
class FxLinearAttentionMatch:
    spec: AttentionSpec
    output: Node | None = None
    query: FeatureMapMatch | None = None
    key: FeatureMapMatch | None = None
    value: Node | None = None
    causal: bool = False
    replaced: list[Node] = dataclasses.field(default_factory=list)
    key_sum_epsilon: float = 0.0
    normalizer_epsilon: float = 0.0
    # (q, k, v to (B, H, L, D), out from it) for blocks written in another layout; None: (B, H, L, D)
    permutations: tuple[tuple[int, ...], ...] | None = None


def _reciprocal(gm, node: Node, nodes: list[Node]) -> Node:
    """x for D⁻¹ written `1/x` (reciprocal, times 1.0) or `div(1, x)`."""
    inner, factor = _split_scale(gm, node)
    if factor != 1.0:
        raise _Rejected("the normaliser is scaled")
    if inner is not node:
        nodes.append(node)
    if ops.is_call(inner, {aten.reciprocal.default}):
        nodes.append(inner)
        return inner.args[0]
    raise _Rejected("the normaliser is not 1 / (φ(q)·Σφ(k))")


def _strip_type_as(node: Node, nodes: list[Node]) -> Node:
    while ops.is_call(node, {aten.type_as.default}) or ops.is_call(node, ops.PASSTHROUGH):
        nodes.append(node)
        node = node.args[0]
    return node


def _key_sum_epsilon(gm, key_sum: Node, nodes: list[Node]) -> tuple[Node, float]:
    """(Σφ(k), ε) for the normaliser's `Σφ(k) + ε` (ε a scalar constant; 0 when absent)."""
    key_sum = _strip_type_as(key_sum, nodes)
    if not ops.is_call(key_sum, ops.ADD) or isinstance(key_sum.args[1], Node):
        return key_sum, 0.0
    epsilon = scalar_constant(gm, key_sum.args[1])
    if epsilon is None:
        raise _Rejected("the normaliser adds a term to Σφ(k) that is not a scalar constant")
    nodes.append(key_sum)
    return _strip_type_as(key_sum.args[0], nodes), epsilon


def _match(gm, anchor: Node) -> FxLinearAttentionMatch:
    operands, labels, out = _einsum(anchor)
    context, phi_q, d_inv = operands
    c_lab, q_lab, n_lab = labels
    batch = out[:-2]
    n, e = out[-2], out[-1]
    d = q_lab[-1]
    if q_lab != batch + n + d or n_lab != batch + n:
        raise _Rejected(_LAYOUT_REJECTION)
    if c_lab == batch + d + e:
        causal = False
    elif c_lab == batch + n + d + e:
        causal = True
    else:
        raise _Rejected("output product's context is neither (d, e) nor prefix-summed (n, d, e)")
    nodes = [anchor]
    _only_user(d_inv, anchor, "the normaliser")
    denominator = _reciprocal(gm, d_inv, nodes)
    parsed = _einsum(denominator)
    if parsed is None:
        raise _Rejected("the normaliser is not an einsum of φ(q) and Σφ(k)")
    nodes.append(denominator)
    (dq, key_sum), (dq_lab, ks_lab), dout = parsed
    if dq is not phi_q:
        raise _Rejected("the normaliser uses a different φ(q) than the output")
    key_sum, key_sum_epsilon = _key_sum_epsilon(gm, key_sum, nodes)
    # context: einsum(φk, v) [→ cumsum over keys]
    if causal:
        if not ops.is_call(context, {aten.cumsum.default}) or _axis(context, context.args[1]) != len(batch):
            raise _Rejected("causal context is not prefix-summed over the key axis")
        nodes.append(context)
        kv = context.args[0]
    else:
        kv = context
    parsed = _einsum(kv)
    if parsed is None:
        raise _Rejected("the context is not an einsum of φ(k) and v")
    nodes.append(kv)
    (phi_k, value), (k_lab, v_lab), kv_out = parsed
    kn = k_lab[len(batch)] if len(k_lab) == len(batch) + 2 else None
    if kn is None or k_lab != batch + kn + k_lab[-1] or k_lab[-1] == kn or v_lab != batch + kn + v_lab[-1]:
        raise _Rejected("the context does not pair φ(k) and v over the key axis")
    want = batch + (kn if causal else "") + k_lab[-1] + v_lab[-1]
    if kv_out != want:
        raise _Rejected("the context does not contract (or prefix-sum) φ(k)·vᵀ over the key axis")
    # Σφ(k) (or its prefix sum) over the keys
    reduce = {aten.cumsum.default} if causal else {aten.sum.dim_IntList}
    if not ops.is_call(key_sum, reduce) or key_sum.args[0] is not phi_k:
        raise _Rejected("the normaliser's key sum is not over the same φ(k)")
    keep = (not causal) and len(key_sum.args) > 2 and key_sum.args[2]
    if _dims(key_sum.args[1], phi_k) != {len(batch)} or keep:
        raise _Rejected("the normaliser sums φ(k) over an axis other than the keys")
    nodes.append(key_sum)
    if causal and (dq_lab != ks_lab or dout != dq_lab[:-1]):
        raise _Rejected("the causal normaliser is not φ(q_n)·Σ_{j≤n}φ(k_j)")
    if not causal and (ks_lab != dq_lab[:len(batch)] + dq_lab[-1] or dout != dq_lab[:-1]):
        raise _Rejected("the normaliser is not φ(q)·Σφ(k) over the features")
    return _finish(gm, anchor, nodes, causal, phi_q, phi_k, value, key_sum_epsilon)


def _finish(gm, output: Node, nodes: list[Node], causal: bool, phi_q: Node, phi_k: Node, value: Node,
            key_sum_epsilon: float = 0.0, normalizer_epsilon: float = 0.0,
            permutations: tuple[tuple[int, ...], ...] | None = None) -> FxLinearAttentionMatch:
    """Check that the block is closed (no outside users), prove both feature maps, build the match."""
    for node in nodes[1:]:
        for user in ops.value_users(node):
            if user not in nodes:
                raise _Rejected(f"intermediate {node.name} is also used by {user.name}")
    for phi, name in ((phi_q, "φ(q)"), (phi_k, "φ(k)")):
        extra = [u for u in ops.value_users(phi) if u not in nodes]
        if extra:
            raise _Rejected(f"{name} ({phi.name}) is also used by {extra[0].name}")
    query, key = match_feature_map(gm, phi_q, True), match_feature_map(gm, phi_k, False)
    if (query.kind, query.projection, query.data_scale, query.epsilon) != \
            (key.kind, key.projection, key.data_scale, key.epsilon):
        raise _Rejected("φ(q) and φ(k) are different feature maps")
    if permutations is not None and (query.projection is not None or query.kind == "favor_softmax"):
        raise _Rejected("a projected feature map outside the (batch, heads, length, dim) layout")
    for x in (query.source, key.source, value):
        if ops.tensor_meta(x).dim() != 4:
            raise _Rejected("q, k, v are not 4-D (batch, heads, length, dim)")
    block = nodes + list(query.nodes) + list(key.nodes)
    return FxLinearAttentionMatch(_spec(block, causal, query, value, permutations), output, query, key, value, causal,
                                  block, key_sum_epsilon, normalizer_epsilon, permutations)


@dataclasses.dataclass
class _Piece:
    """One chunk of performer-pytorch's chunked causal attention, with the carries it continues."""

    phi_q: Node
    phi_k: Node
    value: Node
    key_carry: Node | float
    context_carry: Node | float
    key_running: set[Node]
    context_running: set[Node]
    nodes: list[Node]
    key_sum_epsilon: float


def _running_sum(gm, node: Node, axis: int, nodes: list[Node]) -> tuple[Node, Node | float, set[Node]]:
    """(x, carry, running nodes) for `carry + cumsum(x, axis)` (carry 0 or a previous chunk's last row)."""
    running = set()
    if ops.is_call(node, ops.ADD):
        running.add(node)
        nodes.append(node)
        left, right = node.args[0], node.args[1]
        if ops.is_call(left, {aten.cumsum.default}):
            cumsum, carry = left, right
        elif ops.is_call(right, {aten.cumsum.default}):
            cumsum, carry = right, left
        else:
            raise _Rejected(f"{node.name} is not a carried prefix sum")
        if not isinstance(carry, Node):
            if scalar_constant(gm, carry) != 0.0:
                raise _Rejected(f"{node.name} starts its prefix sum from a nonzero constant")
            carry = 0.0
    elif ops.is_call(node, {aten.cumsum.default}):
        cumsum, carry = node, 0.0
    else:
        raise _Rejected(f"{node.name} is not a prefix sum")
    if _axis(cumsum, cumsum.args[1]) != axis:
        raise _Rejected(f"{cumsum.name} prefix-sums an axis other than the keys")
    nodes.append(cumsum)
    return cumsum.args[0], carry, running


def _piece(gm, anchor: Node) -> _Piece:
    operands, labels, out = _einsum(anchor)
    context, phi_q, d_inv = operands
    c_lab, q_lab, n_lab = labels
    batch, n, e, d = out[:-2], out[-2], out[-1], q_lab[-1]
    seq = len(batch)
    if q_lab != batch + n + d or n_lab != batch + n or c_lab != batch + n + d + e:
        raise _Rejected("chunk output is not einsum(prefix-summed context, φ(q), D⁻¹)")
    nodes = [anchor]
    denominator = _reciprocal(gm, d_inv, nodes)
    parsed = _einsum(denominator)
    if parsed is None or parsed[0][0] is not phi_q or parsed[1][0] != parsed[1][1] or parsed[2] != parsed[1][0][:-1]:
        raise _Rejected("chunk normaliser is not φ(q_n)·Σ_{j≤n}φ(k_j)")
    nodes.append(denominator)
    key_sum, key_sum_epsilon = _key_sum_epsilon(gm, parsed[0][1], nodes)
    key_chain = set(nodes[2:])
    phi_k, key_carry, key_running = _running_sum(gm, key_sum, seq, nodes)
    kv, context_carry, context_running = _running_sum(gm, context, seq, nodes)
    parsed = _einsum(kv)
    if parsed is None:
        raise _Rejected("chunk context is not an einsum of φ(k) and v")
    nodes.append(kv)
    (kv_k, value), (k_lab, v_lab), kv_out = parsed
    if kv_k is not phi_k or k_lab != batch + n + d or v_lab != batch + n + e or kv_out != batch + n + d + e:
        raise _Rejected("chunk context is not φ(k_n)·v_nᵀ per key")
    return _Piece(phi_q, phi_k, value, key_carry, context_carry, key_running | key_chain | {key_sum},
                  context_running | {context}, nodes, key_sum_epsilon)


def _chunks_of(nodes: list[Node], seq_axis: int, what: str) -> tuple[Node, list[Node]]:
    """The tensor split by `chunk(x, n, seq)` whose pieces 0, 1, … are `nodes`, and the split's nodes."""
    split = nodes[0].args[0] if ops.is_call(nodes[0], {operator.getitem}) else None
    if not ops.is_call(split, {aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default}):
        raise _Rejected(f"the chunks of {what} are not pieces of one split along the sequence")
    if _axis(split.args[0], split.args[2] if len(split.args) > 2 else 0) != seq_axis:
        raise _Rejected(f"{what} is split along an axis other than the sequence")
    for index, node in enumerate(nodes):
        if not ops.is_call(node, {operator.getitem}) or node.args[0] is not split or node.args[1] != index:
            raise _Rejected(f"the chunks of {what} are not taken in order")
    if len(split.meta.get("val", ())) != len(nodes):
        raise _Rejected(f"not every chunk of {what} is attended")
    return split.args[0], [split] + nodes


def _is_carry_of(carry, previous: set[Node], seq_axis: int) -> bool:
    """`carry` is `previous[..., -1:, ...]`: the last row (along the sequence) of the previous running sum."""
    if not ops.is_call(carry, {aten.slice.Tensor}) or carry.args[0] not in previous:
        return False
    dim, start = carry.args[1], carry.args[2] if len(carry.args) > 2 else None
    end = carry.args[3] if len(carry.args) > 3 else None
    size = ops.tensor_meta(carry.args[0]).shape[seq_axis]
    return _axis(carry.args[0], dim) == seq_axis and start in (-1, size - 1) and (end is None or end >= size)


def _match_chunked(gm, cat: Node) -> FxLinearAttentionMatch:
    pieces_out = list(cat.args[0])
    rank = ops.tensor_meta(cat).dim()
    seq = rank - 2
    if len(pieces_out) > 1 and _axis(cat, cat.args[1] if len(cat.args) > 1 else 0) != seq:
        raise _Rejected("chunk outputs are concatenated along an axis other than the sequence")
    pieces = [_piece(gm, anchor) for anchor in pieces_out]
    if len({piece.key_sum_epsilon for piece in pieces}) > 1:
        raise _Rejected("the chunks add different ε to their prefix-summed keys")
    nodes = [cat]
    for index, piece in enumerate(pieces):
        nodes += piece.nodes
        if index == 0:
            ok = piece.key_carry == 0.0 and piece.context_carry == 0.0
        else:
            before = pieces[index - 1]
            ok = _is_carry_of(piece.key_carry, before.key_running, seq) and \
                _is_carry_of(piece.context_carry, before.context_running, seq)
            nodes += [piece.key_carry, piece.context_carry]
        if not ok:
            raise _Rejected(f"chunk {index} does not continue the previous chunk's prefix sums")
    phi_q, split_q = _chunks_of([p.phi_q for p in pieces], seq, "φ(q)")
    phi_k, split_k = _chunks_of([p.phi_k for p in pieces], seq, "φ(k)")
    value, split_v = _chunks_of([p.value for p in pieces], seq, "v")
    nodes += split_q + split_k + split_v
    # The last chunk's carries are taken but never used: they die with the block.
    last = pieces[-1]
    for node in list(last.key_running | last.context_running):
        nodes += [user for user in node.users if ops.is_call(user, {aten.slice.Tensor}) and not user.users]
    return _finish(gm, cat, list(dict.fromkeys(nodes)), True, phi_q, phi_k, value, pieces[0].key_sum_epsilon)


def _unwind_transposes(node: Node, labels: str, nodes: list[Node]) -> tuple[Node, str]:
    """The node before transpose/permute views (and type_as), with its axes' labels."""
    while True:
        if ops.is_call(node, {aten.type_as.default} | ops.PASSTHROUGH):
            nodes.append(node)
            node = node.args[0]
            continue
        if not ops.is_call(node, ops.TRANSPOSE | ops.PERMUTE):
            return node, labels
        nodes.append(node)
        operand = Operand(node, labels, "").before_permutes()
        stop = operand.node
        # before_permutes walks the whole chain at once; record the views it crossed
        walk = node.args[0]
        while walk is not stop:
            nodes.append(walk)
            walk = walk.args[0]
        node, labels = stop, operand.labels


def _match_matmul(gm, anchor: Node) -> FxLinearAttentionMatch:
    """`(φq @ (φkᵀ @ v)) * 1/(φq @ Σ_keys φk ᵀ)`: bidirectional linear attention with matmul / bmm."""
    left, right = anchor.args[0], anchor.args[1]
    product = label_product(left)
    d_inv = right
    if product is None:
        product, d_inv = label_product(right), left
    nodes = [anchor]
    if product is None or not isinstance(d_inv, Node):
        raise _Rejected("not φ(q)·context scaled by a normaliser")
    numerator = left if d_inv is right else right
    nodes.append(numerator)
    phi_q, q_lab = _unwind_transposes(product.left, product.left_labels, nodes)
    context, c_lab = product.right, product.right_labels
    if q_lab != product.left_labels:
        raise _Rejected("φ(q) of the output product is transposed")
    batch, d = q_lab[:-2], q_lab[-1]
    e = c_lab[-1]
    if c_lab != batch + d + e:
        raise _Rejected("the output product does not contract φ(q)'s features with the context")
    kv = label_product(context)
    if kv is None:
        raise _Rejected("the context is not a product of φ(k)ᵀ and v")
    nodes.append(context)
    phi_k, k_lab = _unwind_transposes(kv.left, kv.left_labels, nodes)
    value, v_lab = _unwind_transposes(kv.right, kv.right_labels, nodes)
    contracted = set(kv.left_labels) & set(kv.right_labels) - set(kv.out_labels)
    if len(contracted) != 1 or k_lab[-1] != kv.out_labels[-2] or v_lab[-1] != kv.out_labels[-1]:
        raise _Rejected("the context does not contract φ(k)·vᵀ over the key axis")
    key = contracted.pop()
    if k_lab[-2] != key or v_lab[-2] != key or k_lab[:-2] != kv.out_labels[:-2] or v_lab[:-2] != kv.out_labels[:-2]:
        raise _Rejected("the context does not contract φ(k)·vᵀ over the key axis")
    _only_user(d_inv, anchor, "the normaliser")
    denominator = _reciprocal(gm, d_inv, nodes)
    den = label_product(denominator)
    if den is None or den.left is not product.left:
        raise _Rejected("the normaliser is not φ(q) times Σφ(k)")
    nodes.append(denominator)
    key_sum, ks_lab = _unwind_transposes(den.right, den.right_labels, nodes)
    if ks_lab[-1] != den.left_labels[-1] or ks_lab[:-2] != den.out_labels[:-2] or \
            ops.tensor_meta(denominator).shape[-1] != 1:
        raise _Rejected("the normaliser does not contract φ(q)'s features with Σφ(k)")
    if not ops.is_call(key_sum, {aten.sum.dim_IntList}) or key_sum.args[0] is not phi_k:
        raise _Rejected("the normaliser's key sum is not over the same φ(k)")
    keep = len(key_sum.args) > 2 and key_sum.args[2]
    if _dims(key_sum.args[1], phi_k) != {ops.tensor_meta(phi_k).dim() - 2} or not keep:
        raise _Rejected("the normaliser sums φ(k) over an axis other than the keys")
    nodes.append(key_sum)
    return _finish(gm, anchor, list(dict.fromkeys(nodes)), False, phi_q, phi_k, value)


def _match_any_layout(gm, anchor: Node) -> FxLinearAttentionMatch:
    """performer-pytorch's (B, H, L, D) output product, else fast-transformers' (N, L, H, D) one."""
    try:
        return _match(gm, anchor)
    except _Rejected as rejection:
        if not str(rejection).startswith(_LAYOUT_REJECTION):
            raise
        return _match_sequence_major(gm, anchor)


def _match_sequence_major(gm, anchor: Node) -> FxLinearAttentionMatch:
    return match_sequence_major(gm, anchor, _finish)


def _spec(nodes, causal, fmap: FeatureMapMatch, value, permutations=None) -> AttentionSpec:
    """The spec; `permutations` (q, k, v to (B, H, L, D), out from it) give the model's layouts."""
    q_perm, k_perm, v_perm, out_perm = permutations or ((0, 1, 2, 3),) * 4
    q = [ops.tensor_meta(fmap.source).shape[axis] for axis in q_perm]
    return AttentionSpec(
        "performer", tuple(n.name for n in nodes), causal=causal, feature_map=fmap.kind,
        batch_size=q[0], num_heads=q[1], seq_len_q=q[2], head_dim=q[3],
        value_head_dim=ops.tensor_meta(value).shape[v_perm[3]], q_layout=layout_name(q_perm),
        k_layout=layout_name(k_perm), v_layout=layout_name(v_perm),
        out_layout="".join("BHLD"[axis] for axis in out_perm), scale=fmap.data_scale,
    )


def _is_anchor(node: Node) -> bool:
    parsed = _einsum(node)
    return parsed is not None and len(parsed[0]) == 3


def _is_matmul_anchor(node: Node) -> bool:
    """`product * D⁻¹` where D⁻¹ is a reciprocal (optionally times 1): the matmul form's output."""
    if not ops.is_call(node, {aten.mul.Tensor}) or len(node.args) < 2:
        return False
    for product, d_inv in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
        inner = d_inv.args[0] if ops.is_call(d_inv, {aten.mul.Tensor}) else d_inv
        if label_product(product) is not None and ops.is_call(inner, {aten.reciprocal.default}):
            return True
    return False


def _is_prefix_summed_anchor(node: Node) -> bool:
    """An output product whose context carries the query axis: a causal piece."""
    parsed = _einsum(node)
    return parsed is not None and len(parsed[0]) == 3 and len(parsed[1][0]) == len(parsed[2]) + 1


def _is_chunked_anchor(node: Node) -> bool:
    """A `cat` of output products; a one-input `cat` only around a causal piece (else it is transparent)."""
    if not ops.is_call(node, {aten.cat.default}) or len(node.args[0]) == 0:
        return False
    pieces = node.args[0]
    return all(_is_anchor(piece) for piece in pieces) and (len(pieces) > 1 or _is_prefix_summed_anchor(pieces[0]))


def detect_linear_attention(gm: GraphModule) -> list[FxLinearAttentionMatch]:
    """Every Performer-style candidate in `gm`: accepted matches and near-misses with a reason.

    A chunked causal block (chunk outputs concatenated, prefix sums carried from chunk to chunk)
    is one candidate anchored at its `cat`; its per-chunk products are not candidates of their own.
    """
    matches = []
    covered = {piece for node in gm.graph.nodes if _is_chunked_anchor(node) for piece in node.args[0]}
    for node in gm.graph.nodes:
        if _is_chunked_anchor(node):
            attempt = _match_chunked
        elif _is_anchor(node) and node not in covered:
            attempt = _match_any_layout
        elif _is_matmul_anchor(node):
            attempt = _match_matmul
        elif is_causal_product_anchor(node):
            attempt = _match_sequence_major
        else:
            continue
        try:
            matches.append(attempt(gm, node))
        except _Rejected as rejection:
            logger.info("linear attention at %s not taken: %s", node.name, rejection)
            matches.append(FxLinearAttentionMatch(AttentionSpec("performer", (node.name,), reason=str(rejection))))
    return matches
