"""Translate the FX producers of a mask or bias into a score program (`rewriter.kernels.score_program`).

`FxProgramTranslator.translate(node, indices)` gives the builder step of `node`'s value at the
positions `indices` (one builder step per axis of `node`, a function of (batch, head, query, key),
or -1 for an axis of size 1). It pulls indices up through the producers, so lookups of small
tables (``index.Tensor``, ``embedding``) compose like any elementwise op::

    attention_mask ─ to(bool) ─ index(·, [b_arange, k_arange]) ─┐
    arange ─ unsqueeze ─ le(k, q) ─ __and__(new_ones, ·) ───────┴─ __and__ ─ expand ─ where(·, 0, min)
        → where(load(attention_mask, [batch, key]) ∧ key ≤ query, 0, min)

Accepted: elementwise, comparison, logical ops, ``where``/``masked_fill`` and casts with
right-aligned broadcasting; ``expand``, and the views of `passes.fx.index_views` (size-1 axes,
permutes, constant slices); ``arange``; filled tensors; ``triu``/``tril``; ``index.Tensor`` and ``embedding``;
in-place ops on a temporary with one user. A placeholder or ``get_attr`` becomes a leaf at any size
(it exists already); a constant 0/1 buffer holding a ``tril`` pattern (nanoGPT's ``bias``)
becomes the comparison it encodes. Any other value becomes a leaf only when it is O(n), i.e. it
does not vary along the query and the key axis on two different axes; else `ProgramError`.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch.fx import GraphModule, Node

from passes.core.causal_proofs import causal_offset_of_keep
from passes.core.program_terms import negate
from passes.core.score_programs import ProgramBuilder, ProgramError
from passes.fx import aten_vocabulary as ops
from passes.core.attention_labels import FINE, MERGED
from passes.fx.index_views import constant_integer, dtype_name, is_one, shape_of, source_positions

__all__ = ["FxProgramTranslator"]

logger = logging.getLogger(__name__)
aten = torch.ops.aten

_UNARY = {aten.neg.default: "neg", aten.abs.default: "abs", aten.log.default: "log", aten.exp.default: "exp",
          aten.floor.default: "floor", aten.ceil.default: "ceil", aten.logical_not.default: "logical_not",
          aten.bitwise_not.default: "logical_not"}
_BINARY = {}
for _name, _op in (("add", "add"), ("sub", "sub"), ("mul", "mul"), ("div", "div"), ("remainder", "remainder"),
                   ("floor_divide", "floor_divide"), ("lt", "lt"), ("le", "le"), ("gt", "gt"), ("ge", "ge"),
                   ("eq", "eq"), ("ne", "ne"), ("minimum", "minimum"), ("maximum", "maximum"), ("min", "minimum"),
                   ("max", "maximum"), ("logical_and", "logical_and"), ("logical_or", "logical_or"),
                   ("logical_xor", "logical_xor"), ("__and__", "logical_and"), ("__or__", "logical_or"),
                   ("__xor__", "logical_xor"), ("bitwise_and", "logical_and"), ("bitwise_or", "logical_or"),
                   ("bitwise_xor", "logical_xor")):
    for _overload in ("Tensor", "Scalar", "other", "default"):
        for _packet in (getattr(aten, _name, None), getattr(aten, _name + "_", None)):
            overload = getattr(_packet, _overload, None) if _packet is not None else None
            if overload is not None and len(overload._schema.arguments) >= 2:  # not min/max over all elements
                _BINARY[overload] = _op
_LOGICAL = {"logical_and", "logical_or", "logical_xor", "logical_not"}
_FILLED = {aten.full.default: 1, aten.full_like.default: 1, aten.new_full.default: 2, aten.scalar_tensor.default: 0}
_ONES = {aten.ones.default, aten.ones_like.default, aten.new_ones.default}
_ZEROS = {aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default}
_PASSTHROUGH = ops.PASSTHROUGH | {aten.detach.default}
_ROLES = {4: ("batch", "head", "query", "key"), 3: ("batch", "query", "key"), 2: ("query", "key")}


class FxProgramTranslator:
    """Pulls index steps up through one block's mask/bias producers into `builder`."""

    def __init__(self, gm: GraphModule, builder: ProgramBuilder):
        self.gm = gm
        self.builder = builder
        self._memo: dict[tuple, int] = {}
        self._tril_offsets: dict[Node, int | None] = {}

    # — reading what steps mean —
    def _reads(self, step: int) -> set[str]:
        seen, stack, axes = set(), [step], set()
        while stack:
            position = stack.pop()
            if position < 0 or position in seen:
                continue
            seen.add(position)
            found = self.builder.steps[position]
            if found.op == "index":
                axes.add(found.attr)
            stack.extend(found.args)
        return axes

    def _const(self, step: int):
        found = self.builder.steps[step] if step >= 0 else None
        return found.attr if found is not None and found.op == "const" else None

    def _op(self, op: str, args, dtype: str) -> int:
        if op == "logical_not":
            return negate(self.builder, args[0])
        if op in ("eq", "ne") and dtype == "bool":  # ``tril_buffer == 0`` on a 0/1 value: a negation
            flags = [self._const(arg) for arg in args]
            for value, other in ((flags[1], args[0]), (flags[0], args[1])):
                flag = self._boolean_source(other)
                if value in (0, 1) and flag is not None:
                    return flag if (value == 1) == (op == "eq") else negate(self.builder, flag)
        if op in ("add", "sub") and self._const(args[1]) == 0 and self.builder.steps[args[0]].dtype == dtype:
            return args[0]  # HF's ``arange + 0`` (a cache offset of 0)
        if op == "logical_and":  # ``True ∧ x`` (HF's new_ones ∧ …) is x, which keeps causal conjuncts visible
            constants = [self._const(arg) for arg in args]
            if constants[0] is True:
                return args[1]
            if constants[1] is True:
                return args[0]
        return self.builder.add(op, tuple(args), None, dtype)

    def _boolean_source(self, step: int) -> int | None:
        """The boolean step whose 0/1 value `step` is (itself, or a cast of it), else None."""
        found = self.builder.steps[step]
        if found.op == "cast" and self.builder.steps[found.args[0]].dtype == "bool":
            return found.args[0]
        return step if found.dtype == "bool" else None

    def _cast(self, step: int, dtype: str) -> int:
        if self.builder.steps[step].dtype == dtype:
            return step
        constant = self._const(step)
        if constant is not None:
            kind = bool if dtype == "bool" else float if dtype.startswith(("float", "bfloat")) else int
            return self.builder.const(kind(constant), dtype)
        return self.builder.add("cast", (step,), None, dtype)

    def operand(self, operand) -> int:
        """The step of a bias or mask `Operand` (of `detect_softmax_attention`) at (batch, head, query, key).

        `operand.order` names the scores' axes in kernel order (batch, heads, query, key; or batch,
        query, key; or query, key) and `operand.labels` the node's axes among them.
        An operand viewed through a (batch·heads) split (`operand.view_shape`, BLOOM's ALiBi on
        (B·H, 1, Lk)) is read at ``batch · H + head`` on its merged axis, for a static head count H.
        """
        return self.translate(operand.node, self._positions(operand))

    def leaf(self, operand) -> int:
        """The step reading a bias `Operand` as it is, at (batch, head, query, key), whatever computes it:
        one of several terms added to the scores in turn, where its producer has no program."""
        return self.builder.load(operand.node, self._positions(operand), dtype_name(operand.node))

    def _positions(self, operand) -> list[int]:
        """The index steps at which `operand` (see `operand`) is read, one per axis of its node."""
        roles = _ROLES[len(operand.order)]

        def index(label: str) -> int:
            return self.builder.index(roles[operand.order.index(label)])

        labels = operand.labels
        if operand.view_shape is not None:
            position = labels.index(FINE[0])
            heads = operand.view_shape[position + 1]
            if not isinstance(heads, int):
                raise ProgramError(f"'{operand.node.name}' is applied through a (batch·heads) view "
                                   f"with a dynamic head count")
            labels = labels[:position] + MERGED + labels[position + 2:]
        indices = []
        for label, size in zip(labels, shape_of(operand.node)):
            if is_one(size):
                indices.append(-1)
            elif label == MERGED:
                batch = self.builder.add("mul", (index(FINE[0]), self.builder.const(heads, "int64")), None, "int64")
                indices.append(self.builder.add("add", (batch, index(FINE[1])), None, "int64"))
            else:
                indices.append(index(label))
        return indices

    # — the translation —
    def translate(self, node, indices: list[int]) -> int:
        """The step of `node`'s value at `indices`; raises ProgramError when it is not expressible."""
        if not isinstance(node, Node):
            if isinstance(node, bool) or not isinstance(node, (int, float)):
                raise ProgramError(f"an operand {node!r} that is neither a tensor nor a number")
            return self.builder.const(node, "bool" if isinstance(node, bool) else
                                      "int64" if isinstance(node, int) else "float32")
        key = (node, tuple(indices))
        if key not in self._memo:
            self._memo[key] = self._translate(node, list(indices))
        return self._memo[key]

    def _translate(self, node: Node, indices: list[int]) -> int:
        if ops.tensor_meta(node) is None:
            if isinstance(node.meta.get("val"), (int, float, torch.SymInt, torch.SymFloat)):
                return self.translate(constant_integer(node), [])
            raise ProgramError(f"'{node.name}' has no recorded tensor value")
        if node.op == "get_attr":
            pattern = self._tril_buffer(node, indices)
            return pattern if pattern is not None else self.builder.load(node, indices, dtype_name(node))
        if node.op == "placeholder":
            return self.builder.load(node, indices, dtype_name(node))
        if node.op != "call_function":
            raise ProgramError(f"'{node.name}' is a {node.op}")
        try:
            return self._call(node, indices)
        except ProgramError as error:
            if self._varies_on_two_axes(indices):
                raise
            logger.debug("'%s' becomes a leaf: %s", node.name, error)
            return self.builder.load(node, indices, dtype_name(node))

    def _varies_on_two_axes(self, indices: list[int]) -> bool:
        reads = [self._reads(step) for step in indices]
        query = {axis for axis, read in enumerate(reads) if "query" in read}
        key = {axis for axis, read in enumerate(reads) if "key" in read}
        return any(first != second for first in query for second in key)

    def _tril_buffer(self, node: Node, indices: list[int]) -> int | None:
        """``key ≤ query + o`` when a constant 0/1 buffer holds a tril of ones (GPT-2's, nanoGPT's ``bias``).

        Reads the buffer once (its size is the model's, not the example's); None for anything else.
        """
        if node not in self._tril_offsets:
            value = operator.attrgetter(node.target)(self.gm)
            offset = None
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter) and value.dim() >= 2 and (
                    value.dtype == torch.bool or bool(((value == 0) | (value == 1)).all())):
                rows, cols = value.shape[-2:]
                offset = causal_offset_of_keep(value.detach().cpu().numpy() != 0, rows, cols)
            self._tril_offsets[node] = offset
        offset = self._tril_offsets[node]
        if offset is None:
            return None
        row, col = (step if step >= 0 else self.builder.const(0, "int64") for step in indices[-2:])
        bound = self._op("add", [row, self.builder.const(offset, "int64")], "int64")
        return self._cast(self.builder.add("le", (col, bound), None, "bool"), dtype_name(node))

    def _broadcast(self, node: Node, arg, indices: list[int]) -> int:
        """`arg` (an input of `node`) at `node`'s `indices`, with right-aligned broadcasting."""
        if not isinstance(arg, Node) or ops.tensor_meta(arg) is None:
            return self.translate(arg if not isinstance(arg, Node) else constant_integer(arg), [])
        shape = shape_of(arg)
        own = indices[len(indices) - len(shape):] if shape else []
        return self.translate(arg, [-1 if is_one(size) else step for size, step in zip(shape, own)])

    def _call(self, node: Node, indices: list[int]) -> int:
        target, args, dtype = node.target, node.args, dtype_name(node)
        if target in ops.IN_PLACE or (target in _BINARY and target._schema.name.endswith("_")):
            if len(ops.value_users(args[0])) != 1:
                raise ProgramError(f"'{node.name}' updates a tensor that other ops read")
        if target in _PASSTHROUGH:
            return self.translate(args[0], indices)
        if target in ops.CASTS or target in (aten.to.device,):
            return self._cast(self.translate(args[0], indices), dtype)
        if target in _UNARY:
            return self._op(_UNARY[target], [self._broadcast(node, args[0], indices)], dtype)
        if target in _BINARY:
            return self._binary(node, _BINARY[target], indices, dtype)
        if target in (aten.rsub.Scalar, aten.rsub.Tensor):
            alpha = node.kwargs.get("alpha", 1)
            scaled = self._binary_steps("mul", self._broadcast(node, args[0], indices), self.translate(alpha, []),
                                        dtype)
            return self._op("sub", [self._broadcast(node, args[1], indices), scaled], dtype)
        if target in ops.WHERE:
            steps = [self._broadcast(node, arg, indices) for arg in args[:3]]
            return self._op("where", [steps[0], self._cast(steps[1], dtype), self._cast(steps[2], dtype)], dtype)
        if target in ops.MASKED_FILL:
            steps = [self._broadcast(node, arg, indices) for arg in (args[1], args[2], args[0])]
            return self._op("where", [steps[0], self._cast(steps[1], dtype), steps[2]], dtype)
        if target in (aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default):
            return self._clamp(node, indices, dtype)
        if target in _FILLED or target in _ONES or target in _ZEROS:
            value = 1 if target in _ONES else 0 if target in _ZEROS else args[_FILLED[target]]
            return self.builder.const(bool(value) if dtype == "bool" else value, dtype)
        if target in (aten.arange.default, aten.arange.start, aten.arange.start_step):
            return self._arange(node, indices, dtype)
        if target in (aten.triu.default, aten.tril.default):
            return self._triangle(node, indices, dtype)
        if target in (aten.index.Tensor,):
            return self._index(node, indices)
        if target is aten.embedding.default:
            weight, positions = args[0], args[1]
            return self.translate(weight, [self.translate(positions, indices[:-1]), indices[-1]])
        if target in ops.EXPAND:
            return self._broadcast(node, args[0], indices)
        return self.translate(*source_positions(node, indices, self.builder))

    def _binary_steps(self, op: str, left: int, right: int, dtype: str) -> int:
        if op in _LOGICAL:
            left, right = self._cast(left, "bool"), self._cast(right, "bool")
        return self._op(op, [left, right], dtype)

    def _binary(self, node: Node, op: str, indices: list[int], dtype: str) -> int:
        args = node.args
        if op in _LOGICAL and dtype != "bool":
            raise ProgramError(f"'{node.name}' is a bitwise op on {dtype}")
        left, right = (self._broadcast(node, arg, indices) for arg in args[:2])
        alpha = node.kwargs.get("alpha", 1)
        if op in ("add", "sub") and alpha != 1:
            right = self._op("mul", [right, self.translate(alpha, [])], self.builder.steps[right].dtype)
        if op == "div":
            mode = node.kwargs.get("rounding_mode")
            if mode == "floor":
                op = "floor_divide"
            elif mode is not None:
                raise ProgramError(f"'{node.name}' divides with rounding_mode={mode!r}")
        return self._binary_steps(op, left, right, dtype)

    def _clamp(self, node: Node, indices: list[int], dtype: str) -> int:
        args = list(node.args) + [None] * 3
        low, high = (args[1], args[2]) if node.target is aten.clamp.default else (
            (args[1], None) if node.target is aten.clamp_min.default else (None, args[1]))
        step = self._broadcast(node, args[0], indices)
        if low is not None:
            step = self._op("maximum", [step, self._broadcast(node, low, indices)], dtype)
        if high is not None:
            step = self._op("minimum", [step, self._broadcast(node, high, indices)], dtype)
        return step

    def _arange(self, node: Node, indices: list[int], dtype: str) -> int:
        args = node.args
        start, step = (0, 1) if node.target is aten.arange.default else (args[0], args[2] if len(args) > 2 else 1)
        position = indices[0] if indices[0] >= 0 else self.builder.const(0, "int64")
        value = position
        if step != 1:
            value = self._op("mul", [value, self.translate(step, [])], dtype)
        if start != 0:
            value = self._op("add", [value, self.translate(start, [])], dtype)
        return self._cast(value, dtype)

    def _triangle(self, node: Node, indices: list[int], dtype: str) -> int:
        """tril keeps x where col − row ≤ d, triu where col − row ≥ d; elsewhere 0 (False)."""
        diagonal = constant_integer(node.args[1] if len(node.args) > 1 else node.kwargs.get("diagonal", 0))
        row, col = (step if step >= 0 else self.builder.const(0, "int64") for step in indices[-2:])
        distance = self.builder.add("sub", (col, row), None, "int64")
        lower = node.target is aten.tril.default
        x = self.translate(node.args[0], indices)
        if dtype == "bool":
            keep = self._op("le" if lower else "ge", [distance, self.builder.const(diagonal, "int64")], "bool")
            return self._op("logical_and", [keep, x], "bool")
        if lower:  # where(col − row > d, 0, x): the `where(hide, 0, x)` form `fill_mask` reads as keep
            hide = self._op("gt", [distance, self.builder.const(diagonal, "int64")], "bool")
        else:
            hide = self._op("lt", [distance, self.builder.const(diagonal, "int64")], "bool")
        return self._op("where", [hide, self.builder.const(0, dtype), x], dtype)

    def _index(self, node: Node, indices: list[int]) -> int:
        """``x[i0, i1, …]`` with index tensors on x's leading axes (no None, no boolean index)."""
        source, positions = node.args[0], node.args[1]
        if any(not isinstance(position, Node) or ops.tensor_meta(position) is None
               or ops.tensor_meta(position).dtype == torch.bool for position in positions):
            raise ProgramError(f"'{node.name}' indexes with a slice, None or a boolean mask")
        rank = len(shape_of(node)) - (len(shape_of(source)) - len(positions))
        leading = indices[:rank]
        source_indices = []
        for position in positions:
            shape = shape_of(position)
            own = leading[len(leading) - len(shape):] if shape else []
            source_indices.append(self.translate(position, [-1 if is_one(size) else step
                                                            for size, step in zip(shape, own)]))
        return self.translate(source, source_indices + indices[rank:])
