"""Grouped-query K/V: find the K or V a model repeated over heads, when the repeat is interleaved.

Accepted (Hugging Face ``repeat_kv``; torch's ``enable_gqa`` decomposition)::

    Z (B, Hkv, L, D) ─Unsqueeze(axis 2)→ (B, Hkv, 1, L, D) ─Expand→ (B, Hkv, G, L, D)
                     ─Reshape→ (B, Hkv·G, L, D)

Query head ``h`` then reads K/V head ``h // G``, which is how the kernels group heads; the proof
checks every dim: the new axis sits right after the heads axis, Expand changes only that axis,
and Reshape merges exactly those two axes. ``Tile`` (and an Unsqueeze before the heads axis)
repeat whole blocks instead (head ``h`` reads ``h % Hkv``); those K/V stay expanded.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from passes.onnx.axis_labels import Operand
from passes.onnx.constant_folding import ShapeOnlyFolder
from passes.onnx.graph_values import attribute, const_array, producer_op
from passes.onnx.shape_facts import ShapeFacts

__all__ = ["repeat_interleave_source"]


def _unsqueeze_axes(node: ir.Node) -> list[int] | None:
    axes = const_array(node.inputs[1]) if len(node.inputs) > 1 else attribute(node, "axes")
    return None if axes is None else [int(a) for a in np.atleast_1d(np.asarray(axes))]


def _expanded_dims(expand: ir.Node, facts: ShapeFacts, folder: ShapeOnlyFolder) -> tuple | None:
    """Expand's output dims: inferred ones, or broadcast from its shape input where those are unknown."""
    dims, source = facts.dims(expand.outputs[0]), facts.dims(expand.inputs[0])
    shape = folder.shape_vector(expand.inputs[1])
    if source is None or shape is None or len(shape) != len(source):
        return dims
    broadcast = []
    for have, want in zip(source, shape):
        if want == 1 or ShapeFacts.same(have, want):
            broadcast.append(have)
        else:
            broadcast.append(want if have == 1 else None)
    return tuple(broadcast)


def _reshaped_dims(reshape: ir.Node, facts: ShapeFacts, folder: ShapeOnlyFolder) -> tuple | None:
    """Reshape's output dims: from its shape input when that has no -1, else the inferred ones."""
    shape, source = folder.shape_vector(reshape.inputs[1]), facts.dims(reshape.inputs[0])
    if shape is None or -1 in shape or (0 in shape and (source is None or attribute(reshape, "allowzero", 0))):
        return facts.dims(reshape.outputs[0])
    return tuple(source[i] if dim == 0 else dim for i, dim in enumerate(shape))


def repeat_interleave_source(operand: Operand, heads_label: str, facts: ShapeFacts,
                             folder: ShapeOnlyFolder) -> tuple[Operand, int] | None:
    """(K or V before the repeat, its head count) when `operand` is a proven repeat-interleave."""
    if heads_label not in operand.labels or operand.merged:
        return None
    axis = operand.labels.index(heads_label)
    reshape = producer_op(operand.value, "Reshape")
    expand = producer_op(reshape.inputs[0], "Expand") if reshape else None
    unsqueeze = producer_op(expand.inputs[0], "Unsqueeze") if expand else None
    if unsqueeze is None:
        return None
    out, grouped = _reshaped_dims(reshape, facts, folder), _expanded_dims(expand, facts, folder)
    single, source = facts.dims(expand.inputs[0]), facts.dims(unsqueeze.inputs[0])
    if None in (out, grouped, single, source) or len(grouped) != len(out) + 1:
        return None
    rank = len(out)
    if len(single) != rank + 1 or len(source) != rank:
        return None
    if _unsqueeze_axes(unsqueeze) not in ([axis + 1], [axis + 1 - (rank + 1)]):
        return None
    kv_heads, groups = grouped[axis], grouped[axis + 1]
    if not (isinstance(kv_heads, int) and isinstance(groups, int) and out[axis] == kv_heads * groups):
        return None
    if single[axis + 1] != 1:
        return None
    kept = [i for i in range(rank + 1) if i != axis + 1]
    if not all(ShapeFacts.same(single[i], grouped[i]) for i in kept):
        return None  # Expand must not broadcast any other axis
    if not all(ShapeFacts.same(grouped[i], out[j]) for j, i in enumerate(kept) if j != axis):
        return None  # Reshape must merge exactly (heads, group)
    return Operand(unsqueeze.inputs[0], operand.labels, operand.order), kv_heads
