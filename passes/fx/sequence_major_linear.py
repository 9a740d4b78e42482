"""fast-transformers' linear attention in FX: (N, L, H, D) layout, ε added after φ(q)·Σφ(k).

Katharopoulos et al., "Transformers are RNNs" (`fast_transformers/attention/linear_attention.py`,
`causal_linear_attention.py`), φ elementwise (elu(x) + 1 by default, or ReLU)::

    bidirectional   KV  = einsum("nshd,nshm->nhmd", φK, V)
                    Z   = 1/(einsum("nlhd,nhd->nlh", φQ, φK.sum(dim=1)) + ε)
                    out = einsum("nlhd,nhmd,nlh->nlhm", φQ, KV, Z)
    causal          Z   = 1/(einsum("nlhi,nlhi->nlh", φQ, φK.cumsum(1)) + ε)
                    num = causal_product(φQᵖ, φKᵖ, Vᵖ)ᵖ     (ᵖ: permute(0, 2, 1, 3).contiguous();
                          its C++/CUDA kernel, in PyTorch: einsum(φQᵖ, cumsum(einsum(φKᵖ ⊗ Vᵖ), l)))
                    out = num * Z[:, :, :, None]

Every label of every product is given a role (batch, head, sequence, feature, value) through the
views between the products (permutes, copies, full slices, unsqueezes), and the block is accepted
only when each product contracts exactly what linear attention contracts; ε becomes the op's
`normalizer_epsilon`, and q, k, v reach the op permuted to (B, H, L, D), its output permuted back.
φ must be elementwise (`elu_plus_one`, `relu` without a projection): a projection or FAVOR+
stabiliser over a layout other than (B, H, L, D) is not proven here.
"""

from __future__ import annotations

import logging

import torch
from torch.fx import GraphModule, Node

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


def _names(labels: str, known: dict[str, str], operand: list[str | None]) -> None:
    """Bind each label to the role of its axis in `operand`; a label bound to two roles fails."""
    for label, role in zip(labels, operand):
        if role is None:
            continue
        if known.setdefault(label, role) != role:
            raise NotProven(f"axis {label!r} is both {known[label]} and {role}")


def _roles_of(node: Node, roles: dict[Node, list[str]], nodes: list[Node]) -> list[str | None]:
    root, axes = _unview(node, nodes)
    if root not in roles:
        raise NotProven(f"{root.name} is not an operand of this block")
    return [None if a is None else roles[root][a] for a in axes]


def _product_roles(node: Node, roles: dict[Node, list[str]], nodes: list[Node]) -> list[str]:
    """The roles of an einsum's output axes from its operands' roles; every label must be bound."""
    parsed = einsum_labels(node)
    if parsed is None:
        raise NotProven(f"{node.name} is not an einsum")
    nodes.append(node)
    known: dict[str, str] = {}
    for operand, labels in zip(*parsed[:2]):
        _names(labels, known, _roles_of(operand, roles, nodes))
    if any(label not in known for label in parsed[2]):
        raise NotProven(f"{node.name} has an output axis no operand names")
    return [known[label] for label in parsed[2]]


def _normaliser(gm, node: Node, phi_q: Node, key_reduce, roles, nodes) -> tuple[list[str], float]:
    """(roles, ε) of `1/(einsum(φq, reduce(φk, s)) + ε)`, reduce a sum (keys dropped) or a cumsum."""
    inner, factor = split_scale(gm, node)
    if factor != 1.0 or not ops.is_call(inner, {aten.reciprocal.default}):
        raise NotProven("the normaliser is not 1 / (φ(q)·Σφ(k) + ε)")
    nodes += [node, inner] if inner is not node else [inner]
    denominator, epsilon = inner.args[0], 0.0
    if ops.is_call(denominator, ops.ADD) and not isinstance(denominator.args[1], Node):
        epsilon = scalar_constant(gm, denominator.args[1])
        if epsilon is None:
            raise NotProven("the normaliser adds a term that is not a scalar constant")
        nodes.append(denominator)
        denominator = denominator.args[0]
    parsed = einsum_labels(denominator)
    if parsed is None or len(parsed[0]) != 2:
        raise NotProven("the normaliser is not an einsum of φ(q) and Σφ(k)")
    key_sum = parsed[0][1]
    if _unview(parsed[0][0], [])[0] is not phi_q:
        raise NotProven("the normaliser does not use the output product's φ(q)")
    if not ops.is_call(key_sum, {key_reduce}):
        raise NotProven("the normaliser's keys are not summed (or prefix-summed)")
    phi_k = key_sum.args[0]
    summed = dims_of(key_sum.args[1], phi_k)
    if phi_k not in roles:
        raise NotProven("the normaliser's keys are not the context's φ(k)")
    key_roles = roles[phi_k]
    if [key_roles[a] for a in sorted(summed)] != ["s"] or (key_reduce is aten.sum.dim_IntList and len(key_sum.args) > 2
                                                          and key_sum.args[2]):
        raise NotProven("the normaliser sums φ(k) over an axis other than the keys")
    nodes.append(key_sum)
    roles = dict(roles)
    if key_reduce is aten.sum.dim_IntList:
        roles[key_sum] = [r for r in key_roles if r != "s"]
    else:
        roles[key_sum] = key_roles
    out = _product_roles(denominator, roles, nodes)
    if sorted(out) != sorted("bhs"):
        raise NotProven("the normaliser is not one number per (batch, query, head)")
    return out, epsilon


def _layout(roles: list[str], last: str, what: str) -> list[int]:
    """The permutation that takes an operand with axes `roles` to (batch, heads, length, `last`)."""
    if sorted(roles) != sorted("bhs" + last):
        raise NotProven(f"{what} is not 4-D (batch, heads, length, dim)")
    return [roles.index(r) for r in "bhs" + last]


def match_sequence_major(gm: GraphModule, anchor: Node, finish):
    """Prove a fast-transformers block at `anchor` (its three-operand einsum, or the causal `num * Z`).

    `finish(gm, output, nodes, causal, phi_q, phi_k, value, normalizer_epsilon=, permutations=)` builds
    the match; raises `NotProven` with the reason otherwise.
    """
    if ops.is_call(anchor, ops.MUL):
        return _match_causal(gm, anchor, finish)
    operands, labels, out = einsum_labels(anchor)
    if len(operands) != 3:
        raise NotProven("not a three-operand output product")
    phi_q, context, z = operands
    q_lab, c_lab, z_lab = labels
    feature = (set(q_lab) & set(c_lab)) - set(out)
    value = set(out) - set(q_lab)
    sequence = (set(q_lab) - set(c_lab)) & set(out)
    if len(feature) != 1 or len(value) != 1 or len(sequence) != 1:
        raise NotProven("the output product does not contract φ(q)'s features with a (value, feature) context")
    role = {feature.pop(): "f", value.pop(): "e", sequence.pop(): "s"}
    shared = [lab for lab in q_lab if lab not in role]
    if len(shared) != 2:
        raise NotProven("φ(q) is not (batch, heads, length, features)")
    role.update(zip(shared, "bh"))
    nodes = [anchor]
    roles = {phi_q: [role[lab] for lab in q_lab]}
    kv = einsum_labels(context)
    if kv is None or len(kv[0]) != 2:
        raise NotProven("the context is not an einsum of φ(k) and v")
    (phi_k, v), (k_lab, v_lab), kv_out = kv
    inner = dict(zip(kv_out, (role[lab] for lab in c_lab)))
    keys = (set(k_lab) & set(v_lab)) - set(kv_out)
    if len(keys) != 1:
        raise NotProven("the context does not contract φ(k)·vᵀ over one key axis")
    inner[keys.pop()] = "s"
    if any(lab not in inner for lab in k_lab + v_lab):
        raise NotProven("the context has an axis the output product does not name")
    if len({phi_q, phi_k, v}) != 3:
        raise NotProven("φ(q), φ(k) and v are not three different tensors")
    roles[phi_k], roles[v] = [inner[lab] for lab in k_lab], [inner[lab] for lab in v_lab]
    nodes.append(context)
    z_roles, epsilon = _normaliser(gm, z, phi_q, aten.sum.dim_IntList, roles, nodes)
    if z_roles != [role[lab] for lab in z_lab]:
        raise NotProven("the normaliser's axes are not the output product's")
    return _finish(gm, finish, anchor, nodes, False, (phi_q, phi_k, v), roles, epsilon, [role[lab] for lab in out])


def _match_causal(gm, anchor: Node, finish):
    left, right = anchor.args[0], anchor.args[1]
    if not isinstance(left, Node) or not isinstance(right, Node):
        raise NotProven("not the numerator times the normaliser")
    nodes = [anchor]
    num_root, num_axes = _unview(left, nodes)
    z_root, z_axes = _unview(right, nodes)
    parsed = einsum_labels(num_root)
    if parsed is None:
        num_root, num_axes, z_root, z_axes = z_root, z_axes, num_root, num_axes
        parsed = einsum_labels(num_root)
    if parsed is None or len(parsed[0]) != 2:
        raise NotProven("the numerator is not einsum(φ(q), prefix-summed φ(k)·vᵀ)")
    (q_view, summed), (q_lab, c_lab), out = parsed
    if not ops.is_call(summed, {aten.cumsum.default}):
        raise NotProven("the numerator's context is not prefix-summed over the keys")
    sequence = c_lab[axis_of(summed, summed.args[1])]
    feature = (set(q_lab) & set(c_lab)) - set(out)
    value = set(out) - set(q_lab)
    if len(feature) != 1 or len(value) != 1 or sequence not in q_lab or sequence not in out:
        raise NotProven("the numerator does not contract φ(q)'s features with the prefix-summed context")
    role = {feature.pop(): "f", value.pop(): "e", sequence: "s"}
    shared = [lab for lab in q_lab if lab not in role]
    if len(shared) != 2 or set(c_lab) != set(q_lab) | set(out):
        raise NotProven("φ(q) is not (batch, heads, length, features)")
    role.update(zip(shared, "bh"))
    nodes += [num_root, summed]
    kv = einsum_labels(summed.args[0])
    if kv is None or len(kv[0]) != 2 or set(kv[1][0]) | set(kv[1][1]) != set(kv[2]):
        raise NotProven("the prefix-summed context is not φ(k) ⊗ v per position")
    inner = dict(zip(kv[2], (role[lab] for lab in c_lab)))
    roles: dict[Node, list[str]] = {}
    sources = []
    for view, labels in ((q_view, q_lab), *zip(kv[0], kv[1])):
        local = role if view is q_view else inner
        root, axes = _unview(view, nodes)
        if None in axes or root in roles:
            raise NotProven(f"{view.name} is not a permutation of one operand")
        roles[root] = [None] * len(axes)
        for lab, axis in zip(labels, axes):
            roles[root][axis] = local[lab]
        sources.append(root)
    nodes.append(summed.args[0])
    z_roles, epsilon = _normaliser(gm, z_root, sources[0], aten.cumsum.default, roles, nodes)
    out_roles = [role[lab] for lab in out]
    num_roles = [None if a is None else out_roles[a] for a in num_axes]
    z_view = [None if a is None else z_roles[a] for a in z_axes]
    if num_roles != [r if r is not None else "e" for r in z_view] or z_view.count(None) != 1 or \
            z_view[num_roles.index("e")] is not None:
        raise NotProven("the normaliser is not broadcast over the values of its own rows")
    return _finish(gm, finish, anchor, nodes, True, tuple(sources), roles, epsilon, num_roles)


def _finish(gm, finish, anchor, nodes, causal, sources, roles, epsilon, out_roles):
    phi_q, phi_k, v = sources
    q_perm, k_perm, v_perm = (_layout(roles[x], last, name) for x, last, name in
                              zip(sources, "ffe", ("φ(q)", "φ(k)", "v")))
    if roles[phi_q][-1] != "f" or roles[phi_k][-1] != "f":
        raise NotProven("the features are not the last axis of φ(q) and φ(k)")
    out_perm = [[*"bhse"].index(r) for r in out_roles]
    return finish(gm, anchor, list(dict.fromkeys(nodes)), causal, phi_q, phi_k, v, normalizer_epsilon=epsilon,
                  permutations=(tuple(q_perm), tuple(k_perm), tuple(v_perm), tuple(out_perm)))


def is_causal_product_anchor(node: Node) -> bool:
    """`num * Z[..., None]` where num is (a view of) an einsum with a prefix-summed operand."""
    if not ops.is_call(node, {aten.mul.Tensor}) or len(node.args) < 2:
        return False
    for side in node.args[:2]:
        while ops.is_call(side, _VIEWS):
            side = side.args[0]
        parsed = einsum_labels(side)
        if parsed is not None and len(parsed[0]) == 2 and ops.is_call(parsed[0][1], {aten.cumsum.default}):
            return True
    return False
