"""Reshapes inside an ONNX attention block that only split or merge its batch and head axes.

HF BLOOM forms its scores on (B·H) batches and views them as (B, H, Lq, Lk) around the mask add
and the softmax, then back to (B·H, Lq, Lk) for P·V (dynamo export, dynamic batch and length)::

    MatMul(Q, Kᵀ) ─ Mul(1/√d) ─ Add(alibi (B·H, 1, Lk)) ─ Reshape(B, H, Lq, -1) ─ Add(mask) ─ Softmax
        ─ Reshape(B·H, Lq, -1) ─ MatMul(·, V)

A row-major Reshape that keeps the two trailing (query, key) axes and turns the leading (B·H,)
into (B, H) or back moves no score to another row or key, so the block is still attention. This
is proven from the Reshape's shape input alone (`view_dims`: constants, ``Shape`` slices and
their products, as `ShapeOnlyFolder.shape_vector` reads them, with at most one −1), never from
sizes at an example input: sizes are compared as monomials in the shape symbols (``4*b`` equals
``b``·4; any other expression only equals itself).

The match then works on the split form (`passes.core.attention_labels`): an operand whose axis
packs (batch, heads) carries the split labels `FINE` and `Operand.merged`, the sizes that axis
splits into, and is viewed as (B, H) (or (1, 1) where it broadcasts) before it reaches the op.
"""

from __future__ import annotations

import ast
import dataclasses
import logging

import onnx_ir as ir

from passes.core.attention_labels import FINE, MERGED
from passes.onnx.axis_labels import Operand
from passes.onnx.constant_folding import ShapeOnlyFolder
from passes.onnx.graph_values import attribute, is_op
from passes.onnx.shape_facts import Dim, ShapeFacts

__all__ = ["BatchSplit", "block_split", "merged_operand", "packed_labels", "same_size", "split_dims", "view_dims",
           "view_reason"]

logger = logging.getLogger(__name__)

# A size as coefficient × product of symbols (sorted); any non-monomial expression is one opaque symbol.
Monomial = tuple[int, tuple[str, ...]]


def _monomial_of(node: ast.AST) -> Monomial:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value, ()
    if isinstance(node, ast.Name):
        return 1, (node.id,)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        return _times(_monomial_of(node.left), _monomial_of(node.right))
    return 1, (ast.unparse(node),)


def _times(first: Monomial, second: Monomial) -> Monomial:
    return first[0] * second[0], tuple(sorted(first[1] + second[1]))


def monomial(dim: Dim) -> Monomial | None:
    """`dim` as a monomial, None when unknown."""
    if dim is None:
        return None
    if isinstance(dim, int):
        return dim, ()
    try:
        return _monomial_of(ast.parse(dim, mode="eval").body)
    except SyntaxError:
        return 1, (dim,)


def _product(dims) -> Monomial | None:
    found: Monomial = (1, ())
    for dim in dims:
        term = monomial(dim)
        if term is None:
            return None
        found = _times(found, term)
    return found


def same_size(first, second) -> bool:
    """Two sizes (a dim, or a tuple of dims multiplied) equal for every value of their symbols."""
    first = _product(first if isinstance(first, tuple) else (first,))
    second = _product(second if isinstance(second, tuple) else (second,))
    return first is not None and first == second


def _quotient(total: Monomial, part: Monomial) -> Dim:
    """total / part as a dim, None when it is not a monomial."""
    (coefficient, symbols), (divisor, known) = total, part
    rest = list(symbols)
    for symbol in known:
        if symbol not in rest:
            return None
        rest.remove(symbol)
    if divisor == 0 or coefficient % divisor:
        return None
    factor = coefficient // divisor
    if not rest:
        return factor
    return "*".join(([str(factor)] if factor != 1 else []) + [f"({symbol})" for symbol in rest])


def view_dims(node: ir.Node, facts: ShapeFacts, folder: ShapeOnlyFolder) -> tuple[tuple, tuple] | None:
    """(input dims, output dims) of a Reshape, the output read from its shape input; None when unknown."""
    source = facts.dims(node.inputs[0])
    target = folder.shape_vector(node.inputs[1]) if len(node.inputs) > 1 else None
    if source is None or target is None or None in source or None in target or target.count(-1) > 1:
        return None
    dims = []
    for axis, dim in enumerate(target):
        if dim == 0:
            if attribute(node, "allowzero", 0) or axis >= len(source):
                return None
            dim = source[axis]
        dims.append(dim)
    if -1 in dims:
        total, known = _product(source), _product([dim for dim in dims if dim != -1])
        dims[dims.index(-1)] = None if total is None or known is None else _quotient(total, known)
    return (tuple(source), tuple(dims)) if None not in dims else None


def view_reason(node: ir.Node, facts: ShapeFacts, folder: ShapeOnlyFolder) -> str | None:
    """None when the Reshape `node` only splits or merges axes before the two trailing ones, else why not."""
    dims = view_dims(node, facts, folder)
    if dims is None:
        return f"cannot prove what the reshape '{node.name}' does to the scores (its target shape is unknown)"
    before, after = dims
    if len(before) < 3 or len(after) < 3 or not all(same_size(a, b) for a, b in zip(before[-2:], after[-2:])):
        return f"the reshape '{node.name}' moves scores between query rows or keys ({list(before)} → {list(after)})"
    if not same_size(tuple(before[:-2]), tuple(after[:-2])):
        return f"the reshape '{node.name}' changes the number of score matrices ({list(before)} → {list(after)})"
    return None


@dataclasses.dataclass(frozen=True)
class BatchSplit:
    """The (batch, heads) sizes of a block's merged (batch·heads) axis, and the bias and mask values
    the model applies to the scores in merged form."""

    sizes: tuple[Dim, Dim]
    merged_values: frozenset = frozenset()


def block_split(facts: ShapeFacts, folder: ShapeOnlyFolder, product: ir.Node,
                nodes: list[ir.Node]) -> BatchSplit | None:
    """The split shared by the block's score views (None when it has none).

    `nodes` are the block's nodes from the product to P·V (views proven by `view_reason`); every
    leading part of a shape on the way must be (B·H,) or (B, H) for one (B, H). Raises ValueError
    with the reason otherwise, or when a bias or mask is applied to both forms.
    """
    views = [node for node in nodes if is_op(node, "Reshape")]
    if not views:
        return None
    product_dims = facts.dims(product.outputs[0])
    prefixes = [tuple(product_dims[:-2])] if product_dims is not None else []
    for view in views:
        before, after = view_dims(view, facts, folder)
        prefixes += [tuple(before[:-2]), tuple(after[:-2])]
    split = {prefix for prefix in prefixes if len(prefix) == 2}  # one (B, H), written alike everywhere
    sizes = next(iter(split)) if len(split) == 1 else None
    if sizes is None or not all(len(prefix) == 2 or len(prefix) == 1 and same_size(prefix, sizes)
                                for prefix in prefixes):
        raise ValueError("views between the products and softmax reshape more than the batch and head axes "
                         f"(batch axes {[list(prefix) for prefix in prefixes]})")
    if not any(isinstance(size, int) for size in sizes):
        raise ValueError(f"the scores' (batch·heads) axis splits into two dynamic sizes {list(sizes)}")
    on_path = {out for node in [product, *nodes] for out in node.outputs}
    forms: dict[ir.Value, set[bool]] = {}  # operand → whether the scores it meets are merged (rank 3)
    for node in nodes:
        scores = next((value for value in node.inputs if value in on_path), None)
        for value in node.inputs:
            if scores is not None and value is not None and value not in on_path:
                forms.setdefault(value, set()).add(facts.rank(scores) == 3)
    if any(len(found) > 1 for found in forms.values()):
        raise ValueError("a bias or mask is applied to the scores both before and after a batch view")
    return BatchSplit(sizes, frozenset(value for value, found in forms.items() if True in found))


def merged_operand(value: ir.Value, labels: str, order: str, split: BatchSplit, dims: tuple) -> Operand:
    """An operand whose axis labelled `MERGED` (in `labels`, aligned with `dims`) packs (batch, heads);
    it broadcasts when that axis has size 1. Raises ValueError when it does not view as the split."""
    position = labels.index(MERGED)
    size = dims[position]
    if size == 1:
        sizes = (1, 1)
    elif same_size(size, split.sizes):
        sizes = split.sizes
    else:
        raise ValueError(f"'{value.name}' of batch size {size} does not view as {list(split.sizes)}")
    return Operand(value, labels.replace(MERGED, FINE), order, merged=sizes)


def packed_labels(operand: Operand) -> str:
    """The labels of the operand's value axes: its split (batch, heads) written as one `MERGED` axis."""
    return operand.labels.replace(FINE, MERGED) if operand.merged else operand.labels


def split_dims(operand: Operand, dims: tuple) -> tuple:
    """Dims of the operand's labelled axes from its value's `dims` (the packed axis split)."""
    if not operand.merged:
        return dims
    position = operand.labels.index(FINE[0])
    return tuple(dims[:position]) + tuple(operand.merged) + tuple(dims[position + 1:])

