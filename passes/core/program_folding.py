"""Folding boolean forms of score-program steps into the ones the causal and fill proofs read.

Front ends meet masks spelled many ways: ``cast(where(c, 1, 0), bool)`` (a ``Trilu`` of ones),
``tril(ones) == 0`` (SDPA's ``is_causal`` decomposition), ``where(hide, f, 0)``
(``full(f).triu(1)``), ``¬(k > q)``. These helpers add steps to a `ProgramBuilder` in the forms
`score_programs.causal_split` and `fill_mask` read (comparisons of affine index forms, conjunctions,
``where(keep, 0, f)``), with the same values: a comparison is negated by flipping it only over
integers (no NaN), and a comparison of a constant-branch ``where`` is folded branch by branch.
"""

from __future__ import annotations

import logging
import operator

from passes.core.score_programs import ProgramBuilder

__all__ = ["compare_branches", "negation", "where"]

logger = logging.getLogger(__name__)

_COMPARE = {"eq": operator.eq, "lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge}
_INTEGERS = ("int64", "int32", "int16", "int8", "uint8")


def where(builder: ProgramBuilder, condition: int, kept: int, other: int, dtype: str, cast: bool = False) -> int:
    """where(condition, kept, other) in `dtype`; with constant true/false branches, the condition
    itself or its negation. `cast`: the branches are converted to `dtype` first."""
    steps = builder.steps
    if steps[kept].op == steps[other].op == "const" and dtype == "bool":
        pair = (bool(steps[kept].attr), bool(steps[other].attr))
        if pair == (True, False):
            return condition
        if pair == (False, True):
            return negation(builder, condition)
        return builder.const(pair[0], "bool")
    if cast:
        kept, other = (builder.add("cast", (branch,), dtype=dtype) for branch in (kept, other))
    elif steps[kept].op == "const" and steps[other].op == "const" and steps[other].attr == 0 != steps[kept].attr:
        # where(hide, f, 0) as where(keep, 0, f): the form `fill_mask` reads (e.g. full(f).triu(1))
        condition, kept, other = negation(builder, condition), other, kept
    return builder.add("where", (condition, kept, other), dtype=dtype)


def compare_branches(builder: ProgramBuilder, op: str, left: int, right: int) -> int | None:
    """op(where(c, a, b), z) with constants a, b, z as c, ¬c or a constant (SDPA's
    ``tril(ones) == 0``), or None."""
    steps = builder.steps
    chosen, other, swapped = (left, right, False) if steps[left].op == "where" else (right, left, True)
    if steps[chosen].op != "where" or steps[other].op != "const":
        return None
    condition, kept, hidden = steps[chosen].args
    if steps[kept].op != "const" or steps[hidden].op != "const":
        return None
    z = steps[other].attr
    results = [_COMPARE[op](z, v) if swapped else _COMPARE[op](v, z)
               for v in (steps[kept].attr, steps[hidden].attr)]
    return where(builder, condition, builder.const(results[0], "bool"), builder.const(results[1], "bool"), "bool")


def negation(builder: ProgramBuilder, condition: int) -> int:
    """¬condition; a comparison flips (what `causal_split` reads), others get a logical_not."""
    step = builder.steps[condition]
    flipped = {"lt": "ge", "ge": "lt", "le": "gt", "gt": "le", "eq": "ne", "ne": "eq"}.get(step.op)
    if flipped is None or any(builder.steps[arg].dtype not in _INTEGERS for arg in step.args):  # NaN
        return builder.add("logical_not", (condition,), dtype="bool")
    return builder.add(flipped, step.args, dtype="bool")
