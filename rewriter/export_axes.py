"""Which input axes `export_onnx` exports symbolic, and which of them are sequence lengths.

By default (`dynamic_shapes="auto"`) `export_onnx` captures the module as `optimize_module` does
(`rewriter.dynamic_capture`: batch and sequence axes `Dim.AUTO`, kept where torch.export can) and
exports symbolic exactly the input axes the captured graph kept symbolic (`export_dynamic_shapes`).

Verification runs the exported model at other lengths. Only sequence axes take those lengths
(`sequence_axes`): input axes whose symbolic size is the query or key length (axis 2 of q and k) of
a `rewriter::attention` / `rewriter::linear_attention` call in the rewritten graph. A batch axis
keeps the example's size.
"""

from __future__ import annotations

import logging

import torch
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import rewriter.kernels.attention_op  # noqa: F401 - registers torch.ops.rewriter.attention
import rewriter.kernels.linear_attention_op  # noqa: F401 - registers torch.ops.rewriter.linear_attention

__all__ = ["export_dynamic_shapes", "sequence_axes"]

logger = logging.getLogger(__name__)

_HEAD_AXIS, _LENGTH_AXIS = 1, 2  # q (B, H, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv) of both ops


def _symbols(size) -> set:
    """The free symbols of a size: none for an int or a SymInt the capture specialised to a number."""
    return set(size.node.expr.free_symbols) if isinstance(size, torch.SymInt) else set()


def _input_symbols(gm: torch.fx.GraphModule, example_inputs: tuple) -> list[dict[int, set]] | None:
    """Per example input, the symbols of each of its symbolic axes ({} for a non-tensor); None when the
    graph's tensor placeholders do not pair one to one with the example's tensors."""
    values = [node.meta.get("val") for node in gm.graph.find_nodes(op="placeholder")]
    tensors = [value for value in values if isinstance(value, torch.Tensor)]
    if len(tensors) != sum(isinstance(x, torch.Tensor) for x in example_inputs):
        logger.debug("%d tensor placeholders for %d example tensors: axes not paired", len(tensors),
                     sum(isinstance(x, torch.Tensor) for x in example_inputs))
        return None
    placeholders = iter(tensors)
    return [{axis: _symbols(size) for axis, size in enumerate(next(placeholders).shape) if _symbols(size)}
            if isinstance(x, torch.Tensor) else {} for x in example_inputs]


def _block_operands(gm: torch.fx.GraphModule) -> list[torch.Tensor]:
    """The (fake) q, k and v of every attention op in `gm`, shapes propagated where the rewrite left none."""
    ops = (torch.ops.rewriter.attention.default, torch.ops.rewriter.linear_attention.default)
    calls = [node for op in ops for node in gm.graph.find_nodes(op="call_function", target=op)]
    operands = [arg for node in calls for arg in node.args[:3] if isinstance(arg, torch.fx.Node)]
    if any("val" not in node.meta for node in operands):
        inputs = [node.meta.get("val") for node in gm.graph.find_nodes(op="placeholder")]
        mode = detect_fake_mode(inputs)
        if mode is None:
            return []
        with mode:
            FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)
    values = [node.meta.get("val") for node in operands]
    return [value for value in values if isinstance(value, torch.Tensor) and value.dim() == 4]


def export_dynamic_shapes(gm: torch.fx.GraphModule, example_inputs: tuple) -> tuple | None:
    """A torch.export `dynamic_shapes` (one entry per positional input) marking `Dim.AUTO` every axis
    `gm` keeps symbolic but a block's head count; None when there is none (or `gm`'s inputs cannot be
    paired with the example's)."""
    axes = _input_symbols(gm, example_inputs)
    if not axes:
        return None
    heads = set().union(*(_symbols(value.shape[_HEAD_AXIS]) for value in _block_operands(gm)))
    found = tuple({axis: torch.export.Dim.AUTO for axis, symbols in inputs.items() if not symbols & heads} or None
                  for inputs in axes)
    return found if any(found) else None


def sequence_axes(gm: torch.fx.GraphModule, example_inputs: tuple) -> tuple | None:
    """One entry per positional input: {axis: "length"} for each axis whose size is an attention
    block's query or key (value) length in `gm`, else None; None overall when no input axis is one."""
    lengths = set().union(*(_symbols(value.shape[_LENGTH_AXIS]) for value in _block_operands(gm)))
    axes = _input_symbols(gm, example_inputs)
    if not lengths or axes is None:
        return None
    found = tuple({axis: "length" for axis, symbols in inputs.items() if symbols & lengths} or None for inputs in axes)
    return found if any(found) else None
