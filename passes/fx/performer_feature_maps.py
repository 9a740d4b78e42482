"""The Performer feature maps φ, proven from the ATen ops that compute them.

    favor_softmax  ratio·(exp(c·x·Ωᵀ − ‖x‖²/2·c² − amax(·).detach()) + ε)   (performer-pytorch
                   `softmax_kernel`; queries: amax over features; keys: over features and keys,
                   i.e. per batch·head)
    relu           relu(c·x·Ωᵀ) + ε   or relu(c·x) + ε   (`generalized_kernel`)
    elu_plus_one   elu(c·x·Ωᵀ) + 1 (+ ε)                  (Katharopoulos et al.)
    identity       a softmax or exp the model computes itself, over any axis (performer-pytorch
                   `no_projection`: softmax over the head dim for q; exp for causal k, softmax over
                   the keys for bidirectional k): φ stays in the graph, the op reads it as q or k

Ω must be a buffer or parameter (a `get_attr`) or a graph input (`torch.compile` lifts the
module's buffers to inputs): the op takes Ω as an operand, so its value need not be known, only
that q and k read the same (M, D) tensor; c and ε scalar constants, and every intermediate
may be used only inside φ. performer-pytorch broadcasts Ω to (B, H, M, D) first (`repeat(Ω,
'j d -> b h j d')`: unsqueezes, an expand and a `type_as`) and casts φ back with `type_as`; both are
identities here (the cast only when it keeps the dtype) and belong to φ. `NotProven` carries the reason when any of that fails.
"""

from __future__ import annotations

import dataclasses
import string

import torch
from torch.fx import Node

from passes.fx import aten_vocabulary as ops
from passes.fx.constant_values import scalar_constant

__all__ = ["FeatureMapMatch", "NotProven", "axis_of", "dims_of", "einsum_labels", "match_feature_map", "only_user", "split_scale"]

aten = torch.ops.aten


class NotProven(Exception):
    """A candidate that could not be proven; the message says why."""


@dataclasses.dataclass(frozen=True)
class FeatureMapMatch:
    """φ(x) proven: the op's feature-map arguments and the nodes φ consists of."""

    source: Node
    projection: Node | None
    kind: str
    data_scale: float
    epsilon: float
    stabilizer_grad: bool
    nodes: tuple[Node, ...]


def einsum_labels(node) -> tuple[list[Node], list[str], str] | None:
    """Operands, their labels and the output labels of an einsum, its ellipsis spelt out."""
    if not ops.is_call(node, {aten.einsum.default}):
        return None
    equation, operands = node.args[0].replace(" ", ""), list(node.args[1])
    metas = [ops.tensor_meta(operand) for operand in operands]
    if "->" not in equation or any(meta is None for meta in metas):
        return None
    inputs, out = equation.split("->")
    specs = inputs.split(",")
    spare = [c for c in string.ascii_uppercase if c not in equation]
    rank = max((meta.dim() - len(spec.replace("...", "")) for spec, meta in zip(specs, metas) if "..." in spec),
               default=0)
    batch = "".join(spare[:rank])

    def expand(spec, own):
        return spec.replace("...", batch[rank - own:]) if "..." in spec else spec

    labels = [expand(spec, meta.dim() - len(spec.replace("...", ""))) for spec, meta in zip(specs, metas)]
    if any(len(lab) != meta.dim() for lab, meta in zip(labels, metas)):
        return None
    return operands, labels, expand(out, rank)

def only_user(node: Node, user: Node, what: str) -> None:
    others = [u for u in ops.value_users(node) if u is not user]
    if others:
        raise NotProven(f"{what} ({node.name}) is also used by {others[0].name}")


def axis_of(node: Node, dim: int) -> int:
    return dim % ops.tensor_meta(node).dim()


def dims_of(arg, node: Node) -> set[int]:
    dims = [arg] if isinstance(arg, int) else list(arg)
    return {axis_of(node, d) for d in dims}


def _scalar(gm, node, what) -> float:
    value = scalar_constant(gm, node)
    if value is None:
        raise NotProven(f"{what} is not a scalar constant")
    return value


def split_scale(gm, node: Node) -> tuple[Node, float]:
    """`x` and c for `c·x` / `x·c`, or (node, 1.0)."""
    if ops.is_call(node, {aten.mul.Tensor, aten.mul.Scalar}):
        for data, factor in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            value = scalar_constant(gm, factor)
            if value is not None and isinstance(data, Node):
                return data, value
    return node, 1.0


def _same_dtype_cast(node) -> bool:
    """`x.type_as(y)` (or a pass-through copy) that leaves x's dtype as it is."""
    if ops.is_call(node, ops.PASSTHROUGH):
        return True
    if not ops.is_call(node, {aten.type_as.default}):
        return False
    before, after = ops.tensor_meta(node.args[0]), ops.tensor_meta(node)
    return before is not None and after is not None and before.dtype == after.dtype


def _broadcast_source(node: Node, nodes: list[Node]) -> tuple[Node, int]:
    """(Ω, leading axes added) for Ω broadcast by unsqueezes in front of its own two axes, an expand
    of the new axes only, and dtype-keeping casts; (node, 0) for anything else."""
    walk, found = node, []
    while _same_dtype_cast(walk):
        found.append(walk)
        walk = walk.args[0]
    if not ops.is_call(walk, ops.EXPAND):
        return node, 0
    expand, walk = walk, walk.args[0]
    found.append(expand)
    while ops.is_call(walk, ops.UNSQUEEZE):
        rank = ops.tensor_meta(walk).dim()
        if walk.args[1] % rank >= rank - 2:
            return node, 0
        found.append(walk)
        walk = walk.args[0]
    meta, sizes = ops.tensor_meta(walk), list(expand.args[1])
    if walk is expand.args[0] or meta is None or meta.dim() != 2 or \
            any(size not in (-1, own) for size, own in zip(sizes[-2:], meta.shape)):
        return node, 0
    for inner in found[1:]:
        only_user(inner, found[found.index(inner) - 1], "the broadcast projection")
    nodes += found
    return walk, len(sizes) - 2


def _projected(gm, node: Node, nodes: list[Node]) -> tuple[Node, Node | None, float]:
    """(x, Ω, c) for `einsum('…id,…jd->…ij', c·x, Ω)` (Ω 2-D or broadcast), or (x, None, c) for `c·x`."""
    parsed = einsum_labels(node)
    if parsed is None:
        x, c = split_scale(gm, node)
        if x is not node:
            nodes.append(node)
        return x, None, c
    (scaled, projection), (data_labels, proj_labels), out = parsed
    projection, added = _broadcast_source(projection, nodes)
    if added and (len(proj_labels) != added + 2 or proj_labels[:added] != data_labels[:added]):
        raise NotProven(f"the projection of {node.name} is broadcast over axes other than the batch axes")
    proj_labels = proj_labels[added:]
    if len(proj_labels) != 2 or data_labels[:-1] + proj_labels[0] != out or proj_labels[1] != data_labels[-1]:
        raise NotProven(f"{node.name} is not x·Ωᵀ over the head dim")
    if projection.op not in ("get_attr", "placeholder"):
        raise NotProven(f"the projection of {node.name} is not a buffer, parameter or graph input")
    nodes.append(node)
    x, c = split_scale(gm, scaled)
    if x is not scaled:
        only_user(scaled, node, "the scaled input")
        nodes.append(scaled)
    return x, projection, c


def _favor(gm, phi: Node, is_query: bool) -> FeatureMapMatch:
    nodes = [phi]
    inner, ratio = split_scale(gm, phi)
    if not ops.is_call(inner, ops.ADD):
        raise NotProven("FAVOR+ features are not ratio·(exp(·) + ε)")
    exp, eps = inner.args[0], _scalar(gm, inner.args[1], "the feature epsilon")
    if not ops.is_call(exp, ops.EXP) or not ops.is_call(exp.args[0], ops.SUB):
        raise NotProven("FAVOR+ features are not exp(x·Ωᵀ − diag − stabiliser)")
    outer = exp.args[0]
    centred, stab = outer.args
    stab_grad = True
    if ops.is_call(stab, {aten.detach.default}):
        nodes.append(stab)
        stab, stab_grad = stab.args[0], False
    if not ops.is_call(centred, ops.SUB) or not ops.is_call(stab, {aten.amax.default}):
        raise NotProven("FAVOR+ stabiliser is not an amax of x·Ωᵀ")
    dash, diag = centred.args
    if stab.args[0] is not dash:
        raise NotProven("FAVOR+ stabiliser is taken over a different tensor than x·Ωᵀ")
    rank = ops.tensor_meta(dash).dim()
    dims = dims_of(stab.args[1] if len(stab.args) > 1 else list(range(rank)), dash)
    keepdim = bool(stab.args[2]) if len(stab.args) > 2 else False
    want = {rank - 1} if is_query else {rank - 1, rank - 2}
    if dims != want or not keepdim:
        which = "query features" if is_query else "features and keys (per batch·head)"
        raise NotProven(f"FAVOR+ stabiliser reduces axes {sorted(dims)}, not the {which}")
    nodes += [inner, exp, outer, centred, stab]
    x, projection, c = _projected(gm, dash, nodes)
    if projection is None:
        raise NotProven("FAVOR+ features without a projection")
    if abs(ratio - ops.tensor_meta(projection).shape[0] ** -0.5) > 1e-6 * ratio:
        raise NotProven(f"FAVOR+ ratio {ratio} is not M^-½")
    # diag = unsqueeze(sum(x², -1) / 2 · c², -1)
    if not ops.is_call(diag, ops.UNSQUEEZE) or axis_of(dash, diag.args[1]) != rank - 1:
        raise NotProven("FAVOR+ ‖x‖² term is not unsqueezed on the feature axis")
    nodes.append(diag)
    half, c2 = split_scale(gm, diag.args[0])
    nodes.append(diag.args[0])
    if not ops.is_call(half, ops.DIV) or _scalar(gm, half.args[1], "the ‖x‖² divisor") != 2.0:
        raise NotProven("FAVOR+ ‖x‖² term is not halved")
    square_sum = half.args[0]
    if not ops.is_call(square_sum, {aten.sum.dim_IntList}) or dims_of(square_sum.args[1], square_sum.args[0]) != {rank - 1}:
        raise NotProven("FAVOR+ ‖x‖² is not summed over the head dim")
    square = square_sum.args[0]
    if not (ops.is_call(square, {aten.pow.Tensor_Scalar}) and square.args[0] is x and square.args[1] == 2):
        raise NotProven("FAVOR+ ‖x‖² is not of the projected input")
    if abs(c2 - c * c) > 1e-6 * c * c:
        raise NotProven(f"FAVOR+ ‖x‖² scale {c2} is not the data scale squared ({c * c})")
    nodes += [half, square_sum, square]
    for node in nodes[1:]:
        for user in ops.value_users(node):
            if user not in nodes:
                raise NotProven(f"FAVOR+ intermediate {node.name} is also used by {user.name}")
    return FeatureMapMatch(x, projection, "favor_softmax", c, eps, stab_grad, tuple(nodes))


def _generalized(gm, phi: Node) -> FeatureMapMatch:
    nodes, eps, node = [], 0.0, phi
    inner = node.args[0] if ops.is_call(node, ops.ADD) else None
    if ops.is_call(inner, {aten.relu.default}) or ops.is_call(inner, ops.ADD) and ops.is_call(inner.args[0], {aten.elu.default}):
        eps = _scalar(gm, node.args[1], "the feature epsilon")
        nodes.append(node)
        node = node.args[0]
    if ops.is_call(node, ops.ADD) and ops.is_call(node.args[0], {aten.elu.default}):
        if _scalar(gm, node.args[1], "elu's offset") != 1.0:
            raise NotProven("elu features are not elu(x) + 1")
        nodes.append(node)
        node, kind = node.args[0], "elu_plus_one"
        if len(node.args) > 1 and node.args[1] != 1.0:
            raise NotProven("elu features with alpha ≠ 1")
    elif ops.is_call(node, {aten.relu.default}):
        kind = "relu"
    elif ops.is_call(node, ops.SOFTMAX) or ops.is_call(node, ops.EXP):
        # features the model computes itself, positive and no larger than x (performer-pytorch
        # no_projection): they stay in the graph and reach the op as they are
        return FeatureMapMatch(node, None, "identity", 1.0, 0.0, False, ())
    else:
        raise NotProven(f"{phi.name} is not a known feature map (FAVOR+, relu + ε, elu + 1, softmax, exp)")
    nodes.append(node)
    x, projection, c = _projected(gm, node.args[0], nodes)
    for inner in nodes[1:]:
        for user in ops.value_users(inner):
            if user not in nodes:
                raise NotProven(f"feature-map intermediate {inner.name} is also used by {user.name}")
    return FeatureMapMatch(x, projection, kind, c, eps, False, tuple(nodes))


def match_feature_map(gm, phi: Node, is_query: bool) -> FeatureMapMatch:
    casts = []
    while _same_dtype_cast(phi):
        casts.append(phi)
        phi = phi.args[0]
    for cast in casts:
        only_user(cast.args[0], cast, "φ before its cast")
    if ops.is_call(phi, ops.MUL) or ops.is_call(phi, ops.ADD) and ops.is_call(phi.args[0], ops.EXP):
        found = _favor(gm, phi, is_query)
    else:
        found = _generalized(gm, phi)
    return dataclasses.replace(found, nodes=tuple(casts) + found.nodes) if casts else found


