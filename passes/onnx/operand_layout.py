"""Bring matched operands into the kernels' 4-D layouts and the result back into the model's.

Each operand is read from the earliest value it is a view of (`view_source`: up through
``Transpose`` and whole-axis ``Reshape``, size-1 axes included), so views the model took before
the product, such as torch's Kᵀ chain ``Reshape → Transpose → Reshape``, are not copied again
and die with the matched nodes. From there it is arranged with at most one ``Transpose`` into
the order a kernel asks for (`BNSH` = (batch, heads, rows, cols) or another order of those four
axes); `copies` says whether that order needs the transpose::

    Q ─(Reshape heads | split batch·heads)─(Transpose)─(Unsqueeze)─┐
    K, V, bias, mask likewise ─────────────────────────────────────┼─ attention ─ (Squeeze)─(Transpose)
                                                                   ┘    ─(merge heads | batch·heads)─(Cast)─ users

An operand whose axis packs (batch·heads) (`Operand.merged`, `passes.onnx.batch_views`) is read
from the split value it is a view of where there is one, else split by a Reshape.

New nodes go on an `Emitter`'s tape (names under one unique prefix).
"""

from __future__ import annotations

import onnx_ir as ir

from passes.core.attention_labels import FINE
from passes.onnx.axis_labels import Operand, regroup_axes, walk_views
from passes.onnx.onnx_match import AnalysisContext, OnnxAttentionMatch
from passes.onnx.shape_facts import ShapeFacts
from rewriter.kernels.onnx_emitter import Emitter

__all__ = ["BNSH", "BSNH", "arrange", "arranged_dims", "copies", "repeat_heads", "restore_layout",
           "restores_in_place", "view_source"]

BNSH = (0, 1, 2, 3)  # (batch, heads, rows, cols): the canonical order
BSNH = (0, 2, 1, 3)  # (batch, rows, heads, cols): ORT's packed (B, L, H·D) once the last two merge


def _padding_axes(canonical: str) -> list[int]:
    """Where size-1 axes go to make `canonical` (rows, cols plus 0–2 batch axes) four-dimensional."""
    return {4: [], 3: [1], 2: [0, 1]}[len(canonical)]


def _four_labels(canonical: str) -> list[str | None]:
    """`canonical` as four axes, None for the padding ones."""
    labels: list[str | None] = list(canonical)
    for axis in _padding_axes(canonical):
        labels.insert(axis, None)
    return labels


def arranged_dims(ctx: AnalysisContext, operand: Operand, order=BNSH) -> list:
    """The 4-D dims `arrange` gives `operand` (None where unknown)."""
    dims = ctx.operand_dims(operand)
    if dims is None or len(dims) != len(operand.labels):
        dims = (None,) * len(operand.labels)
    by_label = dict(zip(operand.labels, dims))
    four = _four_labels(operand.order)
    return [1 if four[axis] is None else by_label.get(four[axis], 1) for axis in order]


def _through_reshape(in_dims, out_dims, axes, spare: list[str]):
    """Like `regroup_axes` with size-1 axes left out; input axes of size 1 take labels from `spare`,
    the labels of size-1 axes that earlier reshapes dropped (any size-1 axis is as good as another)."""
    if in_dims is None or out_dims is None or len(out_dims) != len(axes):
        return None
    kept_axes, kept_dims = [], []
    for axis, dim in zip(axes, out_dims):
        spare.extend(label for label, atom_dim in axis if atom_dim == 1 or dim == 1)
        if dim != 1:
            kept_axes.append(tuple(atom for atom in axis if atom[1] != 1))
            kept_dims.append(dim)
    grouped = regroup_axes([d for d in in_dims if d != 1], kept_dims, kept_axes)
    if grouped is None:
        return None
    grouped = iter(grouped)
    return [(((spare.pop(), 1),) if spare else ()) if dim == 1 else next(grouped) for dim in in_dims]


def view_source(facts: ShapeFacts, operand: Operand) -> Operand:
    """The earliest value `operand` is a view of, through transposes and whole-axis reshapes.

    Unlike `axis_labels.trace_to_source`, axes of size 1 may appear and vanish on the way (torch
    writes Kᵀ as (B, H, L, D) → (B·H, L, D) → (B·H, D, L) → (B, H, D, L), which is K for B = 1 too);
    labels of size-1 axes that no source axis carries are simply absent (`arrange` adds them back).
    """
    if operand.split_heads:
        return operand
    spare: list[str] = []
    return walk_views(operand, facts, lambda in_dims, out_dims, axes: _through_reshape(in_dims, out_dims, axes, spare))


def _plan(ctx: AnalysisContext, operand: Operand, order) -> tuple[Operand, list[int], list[int]]:
    """The source to read, the transpose of its axes, and where size-1 axes are inserted after it."""
    source = view_source(ctx.facts, operand)
    if not set(source.labels) <= set(operand.order):
        source = operand
    present = list(source.labels)
    wanted = [_four_labels(operand.order)[axis] for axis in order]
    perm = [present.index(label) for label in wanted if label in present]
    inserted = [axis for axis, label in enumerate(wanted) if label not in present]
    return source, perm, inserted


def copies(ctx: AnalysisContext, operand: Operand, order=BNSH) -> bool:
    """Whether `arrange(..., order)` has to transpose (copy) the operand."""
    _, perm, _ = _plan(ctx, operand, order)
    return perm != sorted(perm)


def _split_batch(w: Emitter, value: ir.Value, operand: Operand) -> ir.Value:
    """The value with its packed (batch·heads) axis viewed as (batch, heads) (a dynamic size as −1)."""
    position = operand.labels.index(FINE[0])
    sizes = w.const([size if isinstance(size, int) else -1 for size in operand.merged])
    parts = ([w.shape(value, end=position)] if position else []) + [sizes, w.shape(value, start=position + 1)]
    return w.op("Reshape", value, w.op("Concat", *parts, axis=0))


def _merge_batch(w: Emitter, value: ir.Value, labels: str) -> ir.Value:
    """The value with its (batch, heads) axes, labelled `FINE` in `labels`, merged into one."""
    position = labels.index(FINE[0])
    parts = ([w.shape(value, end=position)] if position else []) + [w.const([-1]), w.shape(value, start=position + 2)]
    return w.op("Reshape", value, w.op("Concat", *parts, axis=0))


def arrange(w: Emitter, ctx: AnalysisContext, operand: Operand, dtype=None, order=BNSH) -> ir.Value:
    """`operand` as a 4-D value with its (batch, heads, rows, cols) axes in `order`; absent labels
    become size-1 axes, inserted with Unsqueeze rather than moved by a transpose."""
    source, perm, inserted = _plan(ctx, operand, order)
    value = source.value
    if source.split_heads:
        value = w.op("Reshape", value, w.const([0, 0, source.split_heads, -1]))
    if source.merged:
        value = _split_batch(w, value, source)
    if perm != sorted(perm):
        value = w.op("Transpose", value, perm=perm)
    if inserted:
        value = w.op("Unsqueeze", value, w.const(inserted))
    return w.annotate(value, dtype or ctx.facts.dtype(operand.value), arranged_dims(ctx, operand, order))


def repeat_heads(w: Emitter, value: ir.Value, groups: int, kv_heads: int) -> ir.Value:
    """(B, Hkv, L, D) → (B, Hkv·G, L, D), head h reading h // G (repeat-interleave)."""
    if groups == 1:
        return value
    grouped = w.op("Unsqueeze", value, w.const([2]))
    shape = w.op("Concat", w.shape(value, end=2), w.const([groups]), w.shape(value, start=2), axis=0)
    merged = w.op("Concat", w.shape(value, end=1), w.const([kv_heads * groups]), w.shape(value, start=2),
                  axis=0)
    return w.op("Reshape", w.op("Expand", grouped, shape), merged)


def restore_layout(w: Emitter, value: ir.Value, match: OnnxAttentionMatch, dtype, out_dtype,
                   order=BNSH) -> ir.Value:
    """A 4-D result of `dtype`, its (batch, heads, rows, value-dim) axes in `order`, in the layout
    and dtype of the value it replaces."""
    labels = [_four_labels(match.out_canonical)[axis] for axis in order]
    padding = [axis for axis, label in enumerate(labels) if label is None]
    if padding:
        value = w.op("Squeeze", value, w.const(padding))
        labels = [label for label in labels if label is not None]
    perm = [labels.index(label) for label in match.out_labels]
    if perm != sorted(perm):
        value = w.op("Transpose", value, perm=perm)
    if match.out_merged:
        value = w.op("Reshape", value, w.const([0, 0, -1]))
    if match.out_merged_batch:
        value = _merge_batch(w, value, match.out_labels)
    if out_dtype is not None and dtype is not None and out_dtype != dtype:
        value = w.op("Cast", value, to=out_dtype)
    return value


def restores_in_place(match: OnnxAttentionMatch, order) -> bool:
    """Whether `restore_layout` takes a result in `order` back without a transpose."""
    labels = [label for label in (_four_labels(match.out_canonical)[axis] for axis in order) if label]
    perm = [labels.index(label) for label in match.out_labels]
    return perm == sorted(perm)
