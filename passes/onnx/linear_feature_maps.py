"""The Performer feature maps φ in an ONNX graph, proven from the ops that compute them.

    favor_softmax  ratio·(Exp(x·c·Ωᵀ − Unsqueeze(ReduceSum(x², −1)/2·c²) − ReduceMax(x·c·Ωᵀ)) + ε)
                   (performer-pytorch `softmax_kernel`; queries: ReduceMax over the features,
                   keys: over features and keys, i.e. per batch·head)
    relu           Relu(x·c·Ωᵀ) + ε   or Relu(c·x) + ε     (`generalized_kernel`)
    elu_plus_one   Elu(x·c·Ωᵀ) + 1 (+ ε)                   (Katharopoulos et al.)
    identity       a Softmax (any axis) or Exp the model computes itself (performer-pytorch
                   `no_projection`): φ stays in the graph, the op reads it as q or k

    x ─ Mul c ─ Einsum('…id,…jd->…ij', ·, Ω) ─┬─ Sub ─ Sub ─ Exp ─ Add ε ─ Mul ratio ─ φ(x)
    x ─ Pow 2 ─ ReduceSum ─ Div 2 ─ Mul c² ─ Unsqueeze ┘     │
                             (same einsum) ─ ReduceMax ─────┘

Ω must be a constant (initializer or ``Constant``), possibly broadcast over leading (batch, head)
axes: torch's exporters write performer-pytorch's `repeat(Ω, 'j d -> b h j d')` as a folded
(1, H, M, D) initializer (dynamo) or ``Expand`` of a (1, 1, M, D) one (TorchScript), with Casts and
Unsqueezes; every (M, D) slice of such a constant must be equal. c, ε and the ratio scalars that depend on no
input (``Pow(8, -0.25)`` as the TorchScript exporter writes it counts), and every intermediate may
be used only inside φ. `Rejected` carries the reason when any of that fails. The scale and
closure checks here are shared with the block proofs (`linear_block`).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from passes.onnx.graph_values import attribute, const_array, producer_op, value_consumers
from passes.onnx.labelled_ops import axes_of, einsum_labels, rank_of
from passes.onnx.onnx_match import AnalysisContext, Rejected
from passes.onnx.shape_facts import ShapeFacts

__all__ = ["OnnxFeatureMap", "match_feature_map", "require_closed", "split_scale"]

logger = logging.getLogger(__name__)

_PASSTHROUGH = ("Identity", "Cast", "Split")


@dataclasses.dataclass(frozen=True)
class OnnxFeatureMap:
    """φ(x) proven: the op's feature-map arguments and the nodes φ consists of."""

    source: ir.Value
    projection: ir.Value | None  # a constant; its (M, D) matrix is the last two axes (see `projection_matrix`)
    kind: str
    data_scale: float
    epsilon: float
    nodes: tuple[ir.Node, ...]

    def projection_matrix(self) -> np.ndarray | None:
        """Ω as (M, D): the first of the equal (M, D) slices of the constant."""
        array = const_array(self.projection)
        return None if array is None else array.reshape((-1,) + array.shape[-2:])[0]


def split_scale(ctx: AnalysisContext, value: ir.Value) -> tuple[ir.Value, float, ir.Node | None]:
    """(x, c, node) for `Mul(x, c)`, `Mul(c, x)` or `Div(x, 1/c)` with the factor a scalar constant.

    (value, 1, None) when `value` is not such a product.
    """
    node = producer_op(value, "Mul", "Div")
    if node is None:
        return value, 1.0, None
    pairs = [(0, 1), (1, 0)] if node.op_type == "Mul" else [(0, 1)]
    for data, factor in pairs:
        c = ctx.folder.scalar(node.inputs[factor])
        if c is not None and not ctx.folder.depends_only_on_shapes(node.inputs[data]):
            return node.inputs[data], (c if node.op_type == "Mul" else 1.0 / c), node
    return value, 1.0, None


def require_closed(nodes, inside: set[ir.Node], what: str) -> None:
    """Every output of `nodes` is read only by nodes in `inside` (and is no graph output)."""
    for node in nodes:
        for output in node.outputs:
            for user in value_consumers(output):
                if user not in inside:
                    where = "a graph output" if user is None else f"'{user.name}'"
                    raise Rejected(f"{what} intermediate '{output.name}' is also used by {where}")


def _strip(value: ir.Value, nodes: list[ir.Node]) -> ir.Value:
    """The value before Cast / Identity and one-piece Splits (a chunked block of a single chunk)."""
    while (node := producer_op(value, *_PASSTHROUGH)) is not None and len(node.outputs) == 1:
        nodes.append(node)
        value = node.inputs[0]
    return value


def _added_constant(ctx: AnalysisContext, value: ir.Value) -> tuple[ir.Value, float, ir.Node] | None:
    """(x, ε, node) for `Add(x, ε)` / `Add(ε, x)` with ε a scalar constant."""
    node = producer_op(value, "Add")
    if node is None:
        return None
    for data, other in ((0, 1), (1, 0)):
        eps = ctx.folder.scalar(node.inputs[other])
        if eps is not None and not ctx.folder.depends_only_on_shapes(node.inputs[data]):
            return node.inputs[data], eps, node
    return None


def _broadcast_constant(ctx: AnalysisContext, value: ir.Value, nodes: list[ir.Node]) -> ir.Value:
    """The constant Ω before Cast / Identity / Expand / Unsqueeze-in-front nodes that only repeat its
    (M, D) matrix over leading axes; Rejected when the constant's (M, D) slices differ."""
    walk, found = value, []
    while (node := producer_op(walk, "Cast", "Identity", "Expand", "Unsqueeze")) is not None:
        if node.op_type == "Unsqueeze":
            rank = rank_of(ctx, node.outputs[0])
            axes = axes_of(ctx, node, rank) if rank is not None else None
            if axes is None or max(axes) >= rank - 2:
                break
        found.append(node)
        walk = node.inputs[0]
    array = const_array(walk)
    if array is None or array.ndim < 2:
        return value
    slices = array.reshape((-1,) + array.shape[-2:])
    if not all(np.array_equal(slices[0], other) for other in slices[1:]):
        raise Rejected(f"the projection '{walk.name}' differs between the batch or head axes it spans")
    nodes += found
    return walk


def _projected(ctx: AnalysisContext, value: ir.Value, nodes: list[ir.Node]) -> tuple[ir.Value, ir.Value | None, float]:
    """(x, Ω, c) for `Einsum('…id,…jd->…ij', c·x, Ω)`, or (x, None, c) for `c·x`."""
    einsum = producer_op(value, "Einsum")
    parsed = einsum_labels(ctx, einsum)
    if einsum is not None and parsed is None:
        raise Rejected(f"the ranks of the operands of '{einsum.name}' are unknown (shape inference gave none)")
    if parsed is None:
        x, c, node = split_scale(ctx, value)
        nodes += [node] if node is not None else []
        return x, None, c
    if len(parsed[0]) != 2:
        raise Rejected(f"'{einsum.name}' is not x·Ωᵀ (an einsum of {len(parsed[0])} operands)")
    (scaled, projection), (data_labels, proj_labels), out = parsed
    lead = len(proj_labels) - 2
    if lead < 0 or data_labels[:-1] + proj_labels[-2] != out or proj_labels[-1] != data_labels[-1] or \
            proj_labels[:lead] != data_labels[len(data_labels) - 2 - lead:-2]:
        raise Rejected(f"'{einsum.name}' is not x·Ωᵀ over the head dim")
    projection = _broadcast_constant(ctx, projection, nodes)
    if const_array(projection) is None:
        raise Rejected(f"the projection of '{einsum.name}' is not a constant initializer")
    if lead and not _broadcast_fits(ctx, einsum, scaled):
        raise Rejected(f"the projection of '{einsum.name}' widens the batch or head axes of x")
    nodes.append(einsum)
    x, c, node = split_scale(ctx, scaled)
    nodes += [node] if node is not None else []
    return x, projection, c


def _broadcast_fits(ctx: AnalysisContext, einsum: ir.Node, data: ir.Value) -> bool:
    """x·Ωᵀ keeps x's leading axes: a broadcast Ω repeats Ω, it does not enlarge the batch or heads."""
    out, source = ctx.facts.dims(einsum.outputs[0]), ctx.facts.dims(data)
    if out is None or source is None or len(out) != len(source):
        return False
    return all(ShapeFacts.same(a, b) for a, b in zip(out[:-2], source[:-2]))


def _favor(ctx: AnalysisContext, phi: ir.Value, is_query: bool) -> OnnxFeatureMap:
    nodes: list[ir.Node] = []
    inner, ratio, node = split_scale(ctx, phi)
    added = _added_constant(ctx, inner)
    if node is None or added is None:
        raise Rejected("FAVOR+ features are not ratio·(Exp(·) + ε)")
    exp_value, eps, add = added
    nodes += [node, add]
    exp = producer_op(exp_value, "Exp")
    outer = producer_op(exp.inputs[0], "Sub") if exp is not None else None
    centred = producer_op(outer.inputs[0], "Sub") if outer is not None else None
    stab = producer_op(outer.inputs[1], "ReduceMax") if outer is not None else None
    if centred is None or stab is None:
        raise Rejected("FAVOR+ features are not Exp(x·Ωᵀ − ‖x‖²/2 − ReduceMax(x·Ωᵀ))")
    dash, diag = centred.inputs
    if stab.inputs[0] is not dash:
        raise Rejected("FAVOR+ stabiliser is taken over a different tensor than x·Ωᵀ")
    rank = rank_of(ctx, dash)
    dims = axes_of(ctx, stab, rank) if rank else None
    want = {rank - 1} if is_query else {rank - 1, rank - 2}
    if dims != want or not attribute(stab, "keepdims", 1):
        which = "query features" if is_query else "features and keys (per batch·head)"
        raise Rejected(f"FAVOR+ stabiliser '{stab.name}' reduces axes {sorted(dims or [])}, not the {which}")
    nodes += [exp, outer, centred, stab]
    x, projection, c = _projected(ctx, dash, nodes)
    if projection is None:
        raise Rejected("FAVOR+ features without a projection")
    features = const_array(projection).shape[-2]
    if abs(ratio - features ** -0.5) > 1e-6 * ratio:
        raise Rejected(f"FAVOR+ ratio {ratio:g} is not M^-½ for M = {features} features")
    _prove_half_norm(ctx, diag, x, c, rank, nodes)
    inside = set(nodes)
    require_closed(nodes[1:], inside, "FAVOR+")
    return OnnxFeatureMap(x, projection, "favor_softmax", c, eps, tuple(nodes))


def _prove_half_norm(ctx: AnalysisContext, diag: ir.Value, x: ir.Value, c: float, rank: int, nodes: list) -> None:
    """`diag` is Unsqueeze(ReduceSum(x², −1) / 2 · c², −1)."""
    unsqueeze = producer_op(diag, "Unsqueeze")
    if unsqueeze is None or axes_of(ctx, unsqueeze, rank) != {rank - 1}:
        raise Rejected("FAVOR+ ‖x‖² term is not unsqueezed on the feature axis")
    half_value, c2, scale_node = split_scale(ctx, unsqueeze.inputs[0])
    if scale_node is None and producer_op(half_value, "Mul") is not None:
        raise Rejected(f"the FAVOR+ ‖x‖² scale at '{half_value.name}' is not a proven scalar constant "
                       "(a shape it is computed from could not be inferred)")
    half = producer_op(half_value, "Div")
    if half is None or ctx.folder.scalar(half.inputs[1]) != 2.0:
        raise Rejected("FAVOR+ ‖x‖² term is not halved")
    square_sum = producer_op(half.inputs[0], "ReduceSum")
    if square_sum is None or axes_of(ctx, square_sum, rank) != {rank - 1} or attribute(square_sum, "keepdims", 1):
        raise Rejected("FAVOR+ ‖x‖² is not summed over the head dim")
    square = producer_op(square_sum.inputs[0], "Pow")
    if square is None or square.inputs[0] is not x or ctx.folder.scalar(square.inputs[1]) != 2.0:
        raise Rejected("FAVOR+ ‖x‖² is not of the projected input")
    if abs(c2 - c * c) > 1e-6 * c * c:
        raise Rejected(f"FAVOR+ ‖x‖² scale {c2:g} is not the data scale squared ({c * c:g})")
    nodes += [unsqueeze] + ([scale_node] if scale_node is not None else []) + [half, square_sum, square]


def _generalized(ctx: AnalysisContext, phi: ir.Value) -> OnnxFeatureMap:
    nodes: list[ir.Node] = []
    constants: list[float] = []
    value = phi
    while len(constants) < 2 and (added := _added_constant(ctx, value)) is not None:
        value, constant, node = added
        constants.append(constant)
        nodes.append(node)
    relu, elu = producer_op(value, "Relu"), producer_op(value, "Elu")
    own = producer_op(value, "Softmax") or producer_op(value, "Exp")
    if own is not None and not constants:
        # features the model computes itself, positive (performer-pytorch no_projection): they stay
        # in the graph and reach the op as they are
        return OnnxFeatureMap(value, None, "identity", 1.0, 0.0, ())
    if relu is not None and len(constants) <= 1:
        kind, eps, node = "relu", (constants or [0.0])[0], relu
    elif elu is not None and constants and constants[-1] == 1.0:
        kind, eps, node = "elu_plus_one", (constants[0] if len(constants) == 2 else 0.0), elu
        if attribute(elu, "alpha", 1.0) != 1.0:
            raise Rejected("elu features with alpha ≠ 1")
    else:
        raise Rejected(f"'{phi.name}' is not a known feature map (FAVOR+, Relu + ε, Elu + 1, Softmax, Exp)")
    nodes.append(node)
    x, projection, c = _projected(ctx, node.inputs[0], nodes)
    require_closed(nodes[1:], set(nodes), "feature-map")
    return OnnxFeatureMap(x, projection, kind, c, eps, tuple(nodes))


def match_feature_map(ctx: AnalysisContext, phi: ir.Value, is_query: bool) -> OnnxFeatureMap:
    """φ proven from `phi` (the value the attention products read), or Rejected with the reason."""
    passthrough: list[ir.Node] = []
    value = _strip(phi, passthrough)
    added = _added_constant(ctx, split_scale(ctx, value)[0])
    if producer_op(value, "Mul") is not None and added is not None and producer_op(added[0], "Exp") is not None:
        fmap = _favor(ctx, value, is_query)
    else:
        fmap = _generalized(ctx, value)
    if passthrough:
        nodes = tuple(passthrough) + fmap.nodes
        require_closed(nodes[1:], set(nodes), "feature-map")
        fmap = dataclasses.replace(fmap, nodes=nodes)
    logger.debug("%s: %s features of %s", phi.name, fmap.kind, fmap.source.name)
    return fmap
