"""Evaluating score programs (`rewriter.kernels.score_program`) with torch, block by block, and their
gradients with respect to their floating-point leaves."""

from __future__ import annotations

import functools
import math
import operator
from typing import Any

import torch

from rewriter.kernels.program_proofs import reachable, relative_steps
from rewriter.kernels.score_program import AXES, Program

__all__ = ["addend_programs", "addend_values", "evaluate", "evaluate_addends", "evaluate_within", "leaf_gradients",
           "relative_view", "trace"]

_TORCH_OPS = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": torch.true_divide,
    "floor_divide": torch.floor_divide, "remainder": torch.remainder, "neg": torch.neg, "abs": torch.abs,
    "log": torch.log, "exp": torch.exp, "floor": torch.floor, "ceil": torch.ceil,
    "minimum": torch.minimum, "maximum": torch.maximum,
    "lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge, "eq": operator.eq, "ne": operator.ne,
    "logical_and": torch.logical_and, "logical_or": torch.logical_or, "logical_xor": torch.logical_xor,
    "logical_not": torch.logical_not, "where": torch.where,
}

_TENSOR_ONLY = {"minimum", "maximum", "logical_and", "logical_or", "logical_xor", "logical_not"}


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _as_tensor(value, dtype: str, device) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=_dtype(dtype), device=device)


def _index(axis: str, sizes: dict[str, tuple[int, int]], device, reverse_rows: bool) -> torch.Tensor:
    start, stop = sizes[axis]
    shape = [1, 1, 1, 1]
    shape[AXES.index(axis)] = stop - start
    if axis == "query" and reverse_rows:
        return torch.arange(stop - 1, start - 1, -1, device=device).view(shape)
    return torch.arange(start, stop, device=device).view(shape)


class _Differences:
    """The ``key − query`` values a block spans, and how to spread a value over them onto the block.

    Difference number d of the block is ``key − query = low + d``; entry (r, c) of the block (rows
    in reverse order: r counts up from the last query) has d = r + c, so the block is
    ``value.unfold(-1, cols, 1)``, a view with strides (1, 1) over the differences that copies nothing.
    In query order it is that view with its rows flipped (a copy, still cheaper than a gather).
    Element-wise ops on such a view lay their results out rows-innermost (torch breaks the stride tie
    towards the shorter axis), which kernels reading keys contiguously would have to transpose; so a
    view that further steps combine is first copied row by row, which is fast.
    """

    def __init__(self, rows, cols, device, reverse_rows: bool):
        self.low = cols[0] - (rows[1] - 1)
        self.cols, self.reverse_rows = cols[1] - cols[0], reverse_rows
        count = self.cols + (rows[1] - rows[0]) - 1
        self.values = torch.arange(self.low, self.low + count, device=device).view(1, 1, 1, count)

    def spread(self, value, view: bool):
        """A (·, ·, 1, differences) value as its (·, ·, rows, cols) block; with rows reversed, the strided
        view where `view`, else a row-major copy."""
        if not isinstance(value, torch.Tensor) or value.size(-1) == 1:
            return value
        block = value.unfold(-1, self.cols, 1).squeeze(-3)
        if not self.reverse_rows:
            return block.flip(-2)
        return block if view else block.contiguous()


def _collapsed(value, rows, cols):
    """A small integer or boolean tensor whose entries are all equal (``query ≥ 0`` over a block's rows) as
    one entry, keeping its number of dimensions (so broadcasting and type promotion are unchanged): the
    steps that combine it with a key-only value then make a row of the block, not the whole block.
    Floating-point values are left alone (0.0 and −0.0 compare equal)."""
    if (not isinstance(value, torch.Tensor) or value.is_floating_point() or value.is_complex()
            or not 1 < value.numel() <= (rows[1] - rows[0]) + (cols[1] - cols[0])):
        return value
    first = value.reshape(-1)[:1]
    if not bool((value == first).all()):
        return value
    return first.view((1,) * value.dim())


class _TooLarge(Exception):
    """A step of `evaluate_within` would hold more entries than its limit."""


def _run(program: Program, leaves, batch: int, heads: int, rows, cols, device, keep: bool,
         reverse_rows: bool = False, limit: int | None = None) -> list:
    sizes = {"batch": (0, batch), "head": (0, heads), "query": rows, "key": cols}
    values: list[Any] = [None] * len(program.steps)
    last_use = program.last_use
    roots, relative = ({}, frozenset()) if keep or limit is not None else relative_steps(program)
    differences = _Differences(rows, cols, device, reverse_rows) if relative else None
    spread: set[int] = set()
    for position, step in enumerate(program.steps):
        if relative and position not in relative:
            for arg in step.args:
                if arg in relative and arg not in spread:
                    values[arg] = differences.spread(values[arg], view=False)
                    spread.add(arg)
        args = [values[arg] for arg in step.args if arg >= 0]
        if limit is not None:
            shapes = [arg.shape for arg in args if isinstance(arg, torch.Tensor)]
            if shapes and math.prod(torch.broadcast_shapes(*shapes)) > limit:
                raise _TooLarge
        if position in roots:  # key − query + c, over the block's differences only
            value = (differences.values + roots[position]).to(_dtype(step.dtype))
        elif step.op == "index":
            value = _index(step.attr, sizes, device, reverse_rows)
        elif step.op == "const":
            value = step.attr  # a Python scalar: torch's scalar promotion, as in the model's own code
        elif step.op == "load":
            value = leaves[step.attr][tuple(values[arg] if arg >= 0 else 0 for arg in step.args)]
        elif step.op == "cast":
            value = torch.as_tensor(args[0], device=device).to(_dtype(step.dtype))
        else:
            if step.op in _TENSOR_ONLY or not any(isinstance(arg, torch.Tensor) for arg in args):
                args = [_as_tensor(arg, program.steps[index].dtype, device) for arg, index in zip(args, step.args)]
            value = _TORCH_OPS[step.op](*args)
            if value.dtype != _dtype(step.dtype):
                value = value.to(_dtype(step.dtype))
        values[position] = _collapsed(value, rows, cols)
        if not keep:
            for arg in step.args:
                if arg >= 0 and last_use[arg] == position:
                    values[arg] = None
    last = len(values) - 1
    if last in relative and last not in spread:
        values[last] = differences.spread(values[last], view=True)
    values[-1] = _as_tensor(values[-1], program.dtype, device)
    return values


def evaluate(program: Program, leaves: list[torch.Tensor], batch: int, heads: int,
             rows: tuple[int, int], cols: tuple[int, int], device: torch.device,
             reverse_rows: bool = False) -> torch.Tensor:
    """The program's values for queries rows[0]:rows[1] and keys cols[0]:cols[1].

    Returns a tensor broadcastable to (batch, heads, rows[1] − rows[0], cols[1] − cols[0]) in the
    program's dtype, its rows in reverse order (last query first) with `reverse_rows`. Each step's
    value is dropped after its last use, so the peak is a few block-sized temporaries; the steps that
    depend on positions only through ``key − query`` are computed once per difference the block
    spans (`program_proofs.relative_steps`), not per entry, and with `reverse_rows` reach the block as
    a strided view of those differences (the result may be such a view: its last axis has stride 1).
    """
    return _run(program, leaves, batch, heads, rows, cols, device, keep=False, reverse_rows=reverse_rows)[-1]


@functools.lru_cache(maxsize=64)
def addend_programs(program: Program) -> tuple[Program, ...]:
    """Each addend of `program` (`score_program.addend_steps`) as a program of its own, in the model's
    order; `(program,)` where it has one."""
    addends = program.addends
    return (program,) if len(addends) == 1 else tuple(reachable(program.steps, step) for step in addends)


def evaluate_addends(program: Program, leaves: list[torch.Tensor], batch: int, heads: int,
                     rows: tuple[int, int], cols: tuple[int, int], device: torch.device,
                     reverse_rows: bool = False) -> list[torch.Tensor]:
    """`evaluate` of each addend of `program` (its one value where it has one addend), in the order the
    model adds them to the scores."""
    parts = (program,) if len(program.addends) == 1 else addend_programs(program)  # no hashing for one
    return [evaluate(part, leaves, batch, heads, rows, cols, device, reverse_rows) for part in parts]


def addend_values(program: Program, values: list, device: torch.device) -> list[torch.Tensor]:
    """The addends' values among `trace`'s `values` of `program`, as tensors, in the model's order."""
    return [_as_tensor(values[step], program.steps[step].dtype, device) for step in program.addends]


def evaluate_within(program: Program, leaves: list[torch.Tensor], batch: int, heads: int,
                    rows: tuple[int, int], cols: tuple[int, int], device: torch.device,
                    limit: int) -> torch.Tensor | None:
    """`evaluate`'s result, or None where a step would hold more than `limit` entries (checked before the
    step runs, so nothing larger is made). All-equal small values collapse as in `evaluate`, so a mask
    such as ``query ≥ 0 ∧ pad[key]`` evaluated over all rows at once is one row of keys."""
    try:
        return _run(program, leaves, batch, heads, rows, cols, device, keep=False, limit=limit)[-1]
    except _TooLarge:
        return None


def relative_view(program: Program, leaves: list[torch.Tensor], batch: int, heads: int, query_len: int,
                  key_len: int, device: torch.device) -> torch.Tensor | None:
    """All of a program whose value depends on the positions only through ``key − query`` (T5's bucket
    bias, ALiBi's distances), rows last first: a 4-D view broadcastable to (batch, heads, query_len,
    key_len) over its query_len + key_len − 1 differences, of which rows q0:q1 are rows
    query_len − q1 : query_len − q0. None for other programs. Evaluated once, it serves every block."""
    if len(program.steps) - 1 not in relative_steps(program)[1]:
        return None
    value = evaluate(program, leaves, batch, heads, (0, query_len), (0, key_len), device, reverse_rows=True)
    return value.reshape((1,) * (4 - value.dim()) + tuple(value.shape))


def trace(program: Program, leaves: list[torch.Tensor], batch: int, heads: int,
          rows: tuple[int, int], cols: tuple[int, int], device: torch.device) -> list:
    """Every step's value (the last is `evaluate`'s result), for `leaf_gradients`."""
    return _run(program, leaves, batch, heads, rows, cols, device, keep=True)


def _sum_to(grad: torch.Tensor, value) -> torch.Tensor | None:
    if not isinstance(value, torch.Tensor):
        return None
    extra = grad.dim() - value.dim()
    grad = grad.sum(tuple(range(extra))) if extra > 0 else grad
    axes = tuple(axis for axis in range(value.dim()) if value.size(axis) == 1 and grad.size(axis) != 1)
    return grad.sum(axes, keepdim=True) if axes else grad


def _local_gradients(op: str, args: list, value: torch.Tensor, grad: torch.Tensor) -> list:
    """d(op)/d(args)ᵀ · grad for each argument (torch's own conventions, ties split as torch does)."""
    if op == "add":
        return [grad, grad]
    if op == "sub":
        return [grad, -grad]
    if op == "mul":
        return [grad * args[1], grad * args[0]]
    if op == "div":
        return [grad / args[1], -grad * value / args[1]]
    if op == "neg":
        return [-grad]
    if op == "abs":
        return [grad * torch.sign(args[0])]
    if op == "log":
        return [grad / args[0]]
    if op == "exp":
        return [grad * value]
    if op in ("minimum", "maximum"):
        first, second = args
        chosen = first < second if op == "minimum" else first > second
        tie = first == second
        return [torch.where(tie, grad / 2, grad * chosen), torch.where(tie, grad / 2, grad * ~chosen)]
    if op == "where":
        condition = args[0]
        return [None, torch.where(condition, grad, 0.0), torch.where(condition, 0.0, grad)]
    if op == "cast":
        return [grad]
    return [None] * len(args)  # comparisons, logic, floor, …: no gradient


def leaf_gradients(program: Program, values: list, leaves: list[torch.Tensor], wanted: list[bool],
                   grad: torch.Tensor) -> list[torch.Tensor | None]:
    """The gradient of Σ grad · program(leaves) with respect to each wanted leaf (None for the others).

    `values` comes from `trace`; `grad` broadcasts like the program's result. Reverse mode over the
    steps, with the same local derivatives as torch's autograd.
    """
    grads: list[Any] = [None] * len(program.steps)
    grads[-1] = grad
    results: list[torch.Tensor | None] = [None] * len(leaves)
    for position in range(len(program.steps) - 1, -1, -1):
        step, upstream = program.steps[position], grads[position]
        if upstream is None or not values[position].is_floating_point():
            continue
        if step.op == "load":
            if wanted[step.attr]:
                leaf = leaves[step.attr]
                indices = [values[arg] if arg >= 0 else torch.zeros((), dtype=torch.long, device=leaf.device)
                           for arg in step.args]
                shape = torch.broadcast_shapes(*(index.shape for index in indices), upstream.shape)
                total = results[step.attr]
                if total is None:
                    total = results[step.attr] = torch.zeros(leaf.shape, dtype=upstream.dtype, device=leaf.device)
                total.index_put_(tuple(index.expand(shape) for index in indices), upstream.expand(shape),
                                 accumulate=True)
            continue
        args = [values[arg] for arg in step.args]
        for arg, local in zip(step.args, _local_gradients(step.op, args, values[position], upstream)):
            reduced = None if local is None else _sum_to(local, values[arg])
            if reduced is not None and values[arg].is_floating_point():
                grads[arg] = reduced if grads[arg] is None else grads[arg] + reduced
    return results
