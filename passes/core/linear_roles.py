"""Linear attention written as einsums in any layout, proven label by label (IR-neutral).

Katharopoulos et al., "Transformers are RNNs" (fast-transformers' `linear_attention.py` and
`causal_linear_attention.py`), and the causal product written directly as a prefix sum::

    bidirectional   out = einsum(φQ, einsum(φK, V) contracted over the keys, Z)       (any operand order)
    causal          out = einsum(φQ, cumsum_s(einsum(φK ⊗ V)), Z)
                    or  view(einsum(φQ, cumsum_s(einsum(φK ⊗ V)))) * view(Z)         (Z broadcast over values)
                    or  view(einsum(φQ, cumsum_s(einsum(φK ⊗ V)))) / view(einsum(φQ, cumsum_s φK) + ε)
                    Z   = 1/(einsum(φQ, Σ_s φK) + ε)      (causal: cumsum_s φK instead of the sum)

(the quotient is what the op computes, num / (φ(q)·Σφ(k) + normalizer_epsilon), ε 0 when absent). Which
operand of each einsum is which (φ(q) or the context, φ(k) or v) is read from the labels' roles, not
from the operands' order.

Every label of every product gets a role, b (batch), h (heads), s (sequence), f (features) or
e (value), from the output product and through the views between products (permutes, unsqueezes,
copies); a label bound to two roles, two labels of one product bound to one role, an axis no operand
names, or a product that contracts anything but what linear attention contracts rejects the block.
The front ends supply a `LinearGraph`: how their IR spells einsums, views, sums, prefix sums,
reciprocals and products. `match_linear_form` returns the block's sources, the permutations that take
q, k, v to (B, H, L, D) and the output back, and ε (added after φ(q)·Σφ(k): the op's `normalizer_epsilon`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Protocol

__all__ = ["LinearFormError", "LinearGraph", "LinearForm", "layout_name", "match_linear_form"]

logger = logging.getLogger(__name__)


class LinearFormError(Exception):
    """The candidate is not linear attention in a form proven here; the text says why."""


class LinearGraph(Protocol):
    """One IR's spelling of the ops `match_linear_form` reads. Values are the IR's own (FX nodes, ONNX values)."""

    def einsum(self, value) -> tuple[list, list[str], str] | None:
        """(operands, their labels, output labels) of the einsum producing `value`, ellipsis spelt out."""

    def unview(self, value, nodes: list) -> tuple[Any, list[int | None]]:
        """(root, axes): `value` is a view of `root` whose axis i is root axis axes[i] (None: unsqueezed)."""

    def prefix_sum(self, value) -> tuple[Any, int] | None:
        """(x, axis) for an inclusive forward prefix sum of x producing `value`."""

    def key_sum(self, value) -> tuple[Any, set[int]] | None:
        """(x, axes) for a sum of x over `axes` that drops them, producing `value`."""

    def reciprocal(self, value, nodes: list) -> tuple[Any, float]:
        """(x, ε) for `value` = 1/(x + ε) (ε 0 when absent); raises the IR's rejection otherwise."""

    def shifted(self, value, nodes: list) -> tuple[Any, float]:
        """(x, ε) for `value` = x + ε with ε a scalar constant; (value, 0.0) when it adds none."""

    def factors(self, value) -> tuple[Any, Any] | None:
        """The two tensor operands of the elementwise product producing `value`."""

    def quotient(self, value) -> tuple[Any, Any] | None:
        """(numerator, denominator), both tensors, of the elementwise division producing `value`."""

    def node(self, value) -> Any:
        """What the block's node list records for `value` (its producer)."""

    def name(self, value) -> str: ...


@dataclasses.dataclass
class LinearForm:
    """A proven block: φ(q), φ(k), v as the products read them, and how they map to (B, H, L, D)."""

    causal: bool
    phi_q: Any
    phi_k: Any
    value: Any
    permutations: tuple[tuple[int, ...], ...]  # q, k, v to (B, H, L, D); the op's (B, H, L, Dv) output back
    normalizer_epsilon: float
    nodes: list


def _bind(labels: str, roles: list[str | None], known: dict[str, str]) -> None:
    for label, role in zip(labels, roles):
        if role is not None and known.setdefault(label, role) != role:
            raise LinearFormError(f"axis {label!r} is both {known[label]} and {role}")


def _product_roles(graph: LinearGraph, value, roles: dict, nodes: list) -> list[str]:
    """The roles of an einsum's output axes from its operands' roles; every label bound, one label per role."""
    parsed = graph.einsum(value)
    if parsed is None:
        raise LinearFormError(f"{graph.name(value)} is not an einsum")
    nodes.append(graph.node(value))
    known: dict[str, str] = {}
    for operand, labels in zip(*parsed[:2]):
        root, axes = graph.unview(operand, nodes)
        if root not in roles:
            raise LinearFormError(f"{graph.name(root)} is not an operand of this block")
        _bind(labels, [None if a is None else roles[root][a] for a in axes], known)
    if len(set(known.values())) != len(known):
        raise LinearFormError(f"{graph.name(value)} names one axis of the block with two labels")
    if any(label not in known for label in parsed[2]):
        raise LinearFormError(f"{graph.name(value)} has an output axis no operand names")
    return [known[label] for label in parsed[2]]


def _normaliser(graph: LinearGraph, z, form: LinearForm, roles: dict, nodes: list,
                divisor: bool = False) -> list[str | None]:
    """The roles of Z = 1/(φ(q)·Σφ(k) + ε) (prefix sum when causal), or of the divisor φ(q)·Σφ(k) + ε
    when `divisor` (None: an axis unsqueezed before ε is added); sets the form's ε."""
    shifted, form.normalizer_epsilon = (graph.shifted if divisor else graph.reciprocal)(z, nodes)
    denominator, view_axes = graph.unview(shifted, nodes)
    parsed = graph.einsum(denominator)
    if parsed is None or len(parsed[0]) != 2:
        raise LinearFormError("the normaliser is not an einsum of φ(q) and Σφ(k)")
    reduce = graph.prefix_sum if form.causal else graph.key_sum
    roots = [graph.unview(side, [])[0] for side in parsed[0]]
    if form.phi_q not in roots:
        raise LinearFormError("the normaliser does not use the output product's φ(q)")
    sides = parsed[0] if roots[0] is form.phi_q else parsed[0][::-1]
    reduced = reduce(sides[1])
    if reduced is None:
        raise LinearFormError("the normaliser's keys are not " + ("prefix-summed" if form.causal else "summed"))
    source, axes = reduced
    if source is not form.phi_k:
        raise LinearFormError("the normaliser's keys are not the context's φ(k)")
    key_roles = roles[source]
    if sorted(key_roles[a] for a in ({axes} if form.causal else axes)) != ["s"]:
        raise LinearFormError("the normaliser prefix-sums φ(k) over another axis than the context prefix-sums "
                              "φ(k) ⊗ v (the keys)" if form.causal else
                              "the normaliser sums φ(k) over an axis other than the keys")
    nodes.append(graph.node(sides[1]))
    roles = dict(roles)
    roles[sides[1]] = key_roles if form.causal else [r for i, r in enumerate(key_roles) if i not in axes]
    out = _product_roles(graph, denominator, roles, nodes)
    if sorted(out) != sorted("bhs"):
        raise LinearFormError("the normaliser is not one number per (batch, query, head)")
    return [None if a is None else out[a] for a in view_axes]


def _output_product(graph: LinearGraph, q_view, context, q_lab: str, c_lab: str, out: str, nodes: list):
    """(form, roles of the block's sources, roles of the product's output axes) for einsum(φq, context)."""
    prefix = graph.prefix_sum(context)
    causal = prefix is not None
    feature = (set(q_lab) & set(c_lab)) - set(out)
    value = set(out) - set(q_lab)
    sequence = {c_lab[prefix[1]]} if causal else (set(q_lab) - set(c_lab)) & set(out)
    if len(feature) != 1 or len(value) != 1 or len(sequence) != 1:
        raise LinearFormError("the output product does not contract φ(q)'s features with a (feature, value) context"
                              + (", prefix-summed over φ(q)'s sequence axis" if causal else ""))
    role = {feature.pop(): "f", value.pop(): "e", sequence.pop(): "s"}
    shared = [lab for lab in q_lab if lab not in role]
    expected = set(shared) | set(role) if causal else set(shared) | set(role) - {c for c in role if role[c] == "s"}
    if len(shared) != 2 or len(q_lab) != 4 or set(c_lab) != expected or len(out) != 4 or \
            set(out) != set(q_lab) - {c for c in role if role[c] == "f"} | {c for c in role if role[c] == "e"}:
        raise LinearFormError("φ(q) is not (batch, heads, length, features) in the output product")
    role.update(zip(shared, "bh"))
    kv_value = prefix[0] if causal else context
    kv = graph.einsum(kv_value)
    if kv is None or len(kv[0]) != 2:
        raise LinearFormError("the context is not an einsum of φ(k) and v" + (" per position" if causal else ""))
    (k_view, v_view), (k_lab, v_lab), kv_out = kv
    inner = dict(zip(kv_out, (role[lab] for lab in c_lab)))
    value_label = next((lab for lab in kv_out if inner.get(lab) == "e"), None)
    if value_label in k_lab and value_label not in v_lab:  # einsum(v, φ(k)): φ(k) is the operand with the features
        (k_view, v_view), (k_lab, v_lab) = (v_view, k_view), (v_lab, k_lab)
    if causal and set(k_lab) | set(v_lab) != set(kv_out):
        raise LinearFormError("the prefix-summed context is not φ(k) ⊗ v per position")
    if not causal:
        keys = (set(k_lab) & set(v_lab)) - set(kv_out)
        if len(keys) != 1 or not set(k_lab) | set(v_lab) <= set(kv_out) | keys:
            raise LinearFormError("the context does not contract φ(k)·vᵀ over one key axis")
        inner[keys.pop()] = "s"
    nodes += [graph.node(context)] + ([graph.node(kv_value)] if causal else [])
    roles: dict = {}
    sources = []
    for view, labels, local in ((q_view, q_lab, role), (k_view, k_lab, inner), (v_view, v_lab, inner)):
        root, axes = graph.unview(view, nodes)
        if None in axes or root in roles:
            raise LinearFormError(f"{graph.name(view)} is not a permutation of its own operand")
        roles[root] = [None] * len(axes)
        for lab, axis in zip(labels, axes):
            roles[root][axis] = local[lab]
        sources.append(root)
    form = LinearForm(causal, *sources, permutations=(), normalizer_epsilon=0.0, nodes=nodes)
    return form, roles, [role[lab] for lab in out]


def layout_name(to_bhld: tuple[int, ...]) -> str:
    """The model's layout as letters (e.g. "BLHD"), when its axis to_bhld[i] holds "BHLD"[i]."""
    return "".join("BHLD"[to_bhld.index(axis)] for axis in range(4))


def _layout(roles: list[str], last: str, what: str) -> tuple[int, ...]:
    """The permutation that takes an operand with axes `roles` to (batch, heads, length, `last`)."""
    if sorted(roles) != sorted("bhs" + last):
        raise LinearFormError(f"{what} is not 4-D (batch, heads, length, dim)")
    return tuple(roles.index(r) for r in "bhs" + last)


def _split_three(graph: LinearGraph, parsed):
    """(φq, context, Z) and their labels from a three-operand output product in any operand order:
    the context is the operand an einsum or prefix sum produces, Z the one with fewer axes."""
    operands, labels, _ = parsed
    contexts = [i for i, x in enumerate(operands) if graph.einsum(x) is not None or graph.prefix_sum(x) is not None]
    if len(contexts) != 1:
        raise LinearFormError("the output product has no one context (an einsum of φ(k) and v) among its operands")
    rest = [i for i in range(3) if i != contexts[0]]
    rest.sort(key=lambda i: -len(labels[i]))
    if len(labels[rest[0]]) == len(labels[rest[1]]):
        raise LinearFormError("the output product has no normaliser operand (one number per query)")
    return [(operands[i], labels[i]) for i in (rest[0], contexts[0], rest[1])]


def match_linear_form(graph: LinearGraph, anchor) -> LinearForm:
    """Prove linear attention at `anchor`: a three-operand output product, or the causal `num * Z` or `num / D`.

    Raises `LinearFormError` (or the IR's own rejection, from `graph`) with the reason otherwise.
    """
    nodes = [graph.node(anchor)]
    parsed = graph.einsum(anchor)
    if parsed is not None:
        if len(parsed[0]) != 3:
            raise LinearFormError("not a three-operand output product")
        (q_view, q_lab), (context, c_lab), (z, z_lab) = _split_three(graph, parsed)
        form, roles, out_roles = _output_product(graph, q_view, context, q_lab, c_lab, parsed[2], nodes)
        z_root, z_axes = graph.unview(z, nodes)
        z_roles = _normaliser(graph, z_root, form, roles, nodes)
        by_label = dict(zip(parsed[2], out_roles))
        if None in z_axes or [z_roles[a] for a in z_axes] != [by_label.get(lab) for lab in z_lab]:
            raise LinearFormError("the normaliser's axes are not the output product's")
    else:
        pair = graph.factors(anchor)
        divided = pair is None and (pair := graph.quotient(anchor)) is not None
        if pair is None:
            raise LinearFormError("not the numerator times (or over) the normaliser")
        for num, z in (pair,) if divided else (pair, pair[::-1]):
            num_root, num_axes = graph.unview(num, [])
            product = graph.einsum(num_root)
            summed = [] if product is None or len(product[0]) != 2 else \
                [i for i in (1, 0) if graph.prefix_sum(product[0][i]) is not None]
            if summed:
                break
        else:
            raise LinearFormError("the numerator is not einsum(φ(q), prefix-summed φ(k) ⊗ v)")
        graph.unview(num, nodes)
        nodes.append(graph.node(num_root))
        (q_view, context), (q_lab, c_lab) = ([x[1 - summed[0]], x[summed[0]]] for x in product[:2])
        out = product[2]
        form, roles, product_roles = _output_product(graph, q_view, context, q_lab, c_lab, out, nodes)
        z_root, z_axes = graph.unview(z, nodes)
        z_roles = _normaliser(graph, z_root, form, roles, nodes, divided)
        out_roles = [None if a is None else product_roles[a] for a in num_axes]
        z_view = [None if a is None else z_roles[a] for a in z_axes]
        if None in out_roles or out_roles != [r if r is not None else "e" for r in z_view] or z_view.count(None) != 1:
            raise LinearFormError("the normaliser is not broadcast over the values of its own rows")
    if roles[form.phi_q][-1] != "f" or roles[form.phi_k][-1] != "f":
        raise LinearFormError("the features are not the last axis of φ(q) and φ(k)")
    form.permutations = tuple(_layout(roles[x], last, name) for x, last, name in
                              zip((form.phi_q, form.phi_k, form.value), "ffe", ("φ(q)", "φ(k)", "v")))
    form.permutations += (tuple("bhse".index(r) for r in out_roles),)
    form.nodes = list(dict.fromkeys(nodes))
    logger.debug("linear attention at %s: %s, layouts %s", graph.name(anchor),
                 "causal" if form.causal else "bidirectional", form.permutations)
    return form
