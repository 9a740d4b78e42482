"""fast-transformers' linear attention in FX: (N, L, H, D) layout, ε added after φ(q)·Σφ(k).

Katharopoulos et al., "Transformers are RNNs" (`fast_transformers/attention/linear_attention.py`,
`causal_linear_attention.py`), φ elementwise (elu(x) + 1 by default, or ReLU)::

    bidirectional   KV  = einsum("nshd,nshm->nhmd", φK, V)
                    Z   = 1/(einsum("nlhd,nhd->nlh", φQ, φK.sum(dim=1)) + ε)
                    out = einsum("nlhd,nhmd,nlh->nlhm", φQ, KV, Z)
    causal          Z   = 1/(einsum("nlhi,nlhi->nlh", φQ, φK.cumsum(1)) + ε)     (or num / (φQ·ΣφK + ε)[..., None])
                    num = causal_product(φQᵖ, φKᵖ, Vᵖ)ᵖ     (ᵖ: permute(0, 2, 1, 3).contiguous();
                          its C++/CUDA kernel, in PyTorch: einsum(φQᵖ, cumsum(einsum(φKᵖ ⊗ Vᵖ), l)))
                    out = num * Z[:, :, :, None]
                    (also einsum("nlhd,nlhdm->nlhm", φQ, einsum("nlhd,nlhm->nlhdm", φK, V).cumsum(1)) times
                    Z, or with Z as the product's third operand)

The proof is the IR-neutral `passes.core.linear_roles` (every label of every product gets a role
through the views between the products); this module says how ATen spells einsums, views (permutes,
copies, full slices, unsqueezes), sums, prefix sums, `1/(x + ε)`, `x + ε`, products and quotients. ε
becomes the op's `normalizer_epsilon`, and q, k, v reach the op permuted to (B, H, L, D), its output permuted back.
φ must be elementwise (`elu_plus_one`, `relu` without a projection): a projection or FAVOR+
stabiliser over a layout other than (B, H, L, D) is not proven here.
"""

from __future__ import annotations

import logging

import torch
from torch.fx import GraphModule, Node

from passes.core.linear_roles import LinearFormError, match_linear_form
from passes.fx import aten_vocabulary as ops
from passes.fx.constant_values import scalar_constant
from passes.fx.performer_feature_maps import NotProven, axis_of, dims_of, einsum_labels, split_scale

__all__ = ["is_causal_product_anchor", "match_sequence_major"]

logger = logging.getLogger(__name__)
aten = torch.ops.aten

_VIEWS = ops.PASSTHROUGH | ops.PERMUTE | ops.UNSQUEEZE | {aten.slice.Tensor}


def _unview(node: Node, nodes: list[Node]) -> tuple[Node, list[int | None]]:
    """(root, axes): `node` is a view of `root` whose axis i is root axis axes[i] (None: unsqueezed)."""
    axes = list(range(ops.tensor_meta(node).dim()))
    while ops.is_call(node, _VIEWS):
        nodes.append(node)
        source = node.args[0]
        if ops.is_call(node, ops.PERMUTE):
            perm = [axis_of(source, d) for d in node.args[1]]
            axes = [None if a is None else perm[a] for a in axes]
        elif ops.is_call(node, ops.UNSQUEEZE):
            new = axis_of(node, node.args[1])
            axes = [None if a is None or a == new else a - (a > new) for a in axes]
        elif ops.is_call(node, {aten.slice.Tensor}):
            start, end = (list(node.args[2:4]) + [None, None])[:2]
            dim = axis_of(source, node.args[1] if len(node.args) > 1 else 0)
            if start not in (None, 0) or (end is not None and end < ops.tensor_meta(source).shape[dim]):
                raise NotProven(f"{node.name} slices part of an axis")
        node = source
    return node, axes


class _AtenGraph:
    """ATen's spelling of the ops `match_linear_form` reads (`passes.core.linear_roles.LinearGraph`)."""

    def __init__(self, gm: GraphModule):
        self.gm = gm

    @staticmethod
    def einsum(node):
        return einsum_labels(node) if isinstance(node, Node) else None

    @staticmethod
    def unview(node: Node, nodes: list[Node]):
        return _unview(node, nodes)

    @staticmethod
    def prefix_sum(node):
        if not ops.is_call(node, {aten.cumsum.default}):
            return None
        return node.args[0], axis_of(node.args[0], node.args[1])

    @staticmethod
    def key_sum(node):
        if not ops.is_call(node, {aten.sum.dim_IntList}) or (len(node.args) > 2 and node.args[2]):
            return None
        return node.args[0], dims_of(node.args[1], node.args[0])

    def reciprocal(self, node: Node, nodes: list[Node]):
        inner, factor = split_scale(self.gm, node)
        if factor != 1.0 or not ops.is_call(inner, {aten.reciprocal.default}):
            raise NotProven("the normaliser is not 1 / (φ(q)·Σφ(k) + ε)")
        nodes += [node, inner] if inner is not node else [inner]
        return self.shifted(inner.args[0], nodes)

    def shifted(self, node: Node, nodes: list[Node]):
        if not ops.is_call(node, ops.ADD) or isinstance(node.args[1], Node):
            return node, 0.0
        if node.kwargs.get("alpha", 1) != 1:
            raise NotProven(f"the normaliser adds ε times alpha={node.kwargs['alpha']} ({node.name})")
        epsilon = scalar_constant(self.gm, node.args[1])
        if epsilon is None:
            raise NotProven("the normaliser adds a term that is not a scalar constant")
        nodes.append(node)
        return node.args[0], epsilon

    @staticmethod
    def factors(node):
        if not ops.is_call(node, {aten.mul.Tensor}) or not all(isinstance(x, Node) for x in node.args[:2]):
            return None
        return node.args[0], node.args[1]

    @staticmethod
    def quotient(node):
        if not ops.is_call(node, {aten.div.Tensor}) or not all(isinstance(x, Node) for x in node.args[:2]):
            return None
        return node.args[0], node.args[1]

    @staticmethod
    def node(node: Node) -> Node:
        return node

    @staticmethod
    def name(node) -> str:
        return getattr(node, "name", str(node))


def match_sequence_major(gm: GraphModule, anchor: Node, finish):
    """Prove a linear-attention block in any layout at `anchor` (a three-operand einsum, or `num * Z`).

    `finish(gm, output, nodes, causal, phi_q, phi_k, value, normalizer_epsilon=, permutations=)` builds
    the match; raises `NotProven` with the reason otherwise.
    """
    try:
        form = match_linear_form(_AtenGraph(gm), anchor)
    except LinearFormError as error:
        raise NotProven(str(error)) from error
    return finish(gm, anchor, form.nodes, form.causal, form.phi_q, form.phi_k, form.value,
                  normalizer_epsilon=form.normalizer_epsilon, permutations=form.permutations)


def is_causal_product_anchor(node: Node) -> bool:
    """`num * Z[..., None]` or `num / D[..., None]` where num is (a view of) a two-operand einsum with a
    prefix-summed operand."""
    if _AtenGraph.factors(node) is not None:
        sides = node.args[:2]
    elif _AtenGraph.quotient(node) is not None:
        sides = node.args[:1]
    else:
        return False
    for side in sides:
        while ops.is_call(side, _VIEWS):
            side = side.args[0]
        parsed = einsum_labels(side)
        if parsed is not None and len(parsed[0]) == 2 and \
                any(ops.is_call(operand, {aten.cumsum.default}) for operand in parsed[0]):
            return True
    return False
