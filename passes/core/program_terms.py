"""A block's masks and biases as score programs, sorted into the kernels' terms, IR-neutrally.

A front end translates each bias and mask operand of an accepted block into one shared
`ProgramBuilder` (its own translator, e.g. `passes.fx.score_program_recovery`); this module then:

- `recover_terms`: swaps each operand whose translation succeeds for a `ProgramTerm` (masks in
  keep form), and turns a lone bias ``where(keep, 0, −∞)`` into the keep-mask with fill −∞
  (`score_programs.fill_mask`), which lets the kernels split off the causal flag and skip blocks.
  A finite fill (HF's finfo.min) stays a bias program: on a row whose every key it hides, the
  model's scores ``s + f`` still pass gradients to s (the row's softmax is uniform, not constant),
  which a mask, replacing scores by a constant, would not. Its causal-only form still becomes the
  causal flag (`program_bias_offset`), where no row is fully hidden.
  An operand that is a leaf read as it is (an n×n input) stays the IR's tensor operand.
- `program_bias_offset` / `program_mask_offset`: the causal provers `mask_semantics.sort_score_terms`
  calls for program terms, reading the program only (`score_programs.causal_split`), never an
  n×n tensor. A mask ``causal ∧ rest`` with fill −∞ gives the causal flag and the mask ``rest``;
  a finite fill counts only where `fill_is_neg_inf` allows it (nothing else masks).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

from passes.core.mask_semantics import fill_is_neg_inf
from passes.core.score_algebra import MaskStep
from passes.core.score_programs import ProgramBuilder, ProgramError, causal_split, fill_mask
from rewriter.kernels.score_program import SCORE_ADD, Program

__all__ = ["ProgramTerm", "absorb", "combined_bias", "compact_leaves", "negate", "program_bias_offset",
           "program_mask_offset", "recover_terms", "sum_steps"]

logger = logging.getLogger(__name__)

_NEGATED = {"lt": "ge", "ge": "lt", "le": "gt", "gt": "le", "eq": "ne", "ne": "eq"}
_INTEGER = ("int64", "int32", "int16", "int8", "uint8", "bool")


@dataclasses.dataclass(frozen=True, eq=False)
class ProgramTerm:
    """One mask or bias of a block: step `step` of the block's shared `builder`."""

    builder: ProgramBuilder
    step: int
    dense: Any = None  # the IR operand it was recovered from (None for a part split off a mask)

    @property
    def program(self) -> Program:
        return self.builder.program(self.step)


def absorb(builder: ProgramBuilder, program: Program) -> int:
    """Add `program` (whose leaves are `builder`'s) to `builder`; returns its output step."""
    positions: list[int] = []
    for step in program.steps:
        args = tuple(positions[arg] if arg >= 0 else -1 for arg in step.args)
        positions.append(builder.add(step.op, args, step.attr, step.dtype))
    return positions[-1]


def negate(builder: ProgramBuilder, step: int) -> int:
    """``not step``: a double negation cancels, an integer comparison flips (exact: no NaN)."""
    found = builder.steps[step]
    if found.op == "logical_not":
        return found.args[0]
    if found.op in _NEGATED and all(builder.steps[arg].dtype in _INTEGER for arg in found.args if arg >= 0):
        return builder.add(_NEGATED[found.op], found.args, None, "bool")
    if found.op == "const":
        return builder.const(not found.attr, "bool")
    return builder.add("logical_not", (step,), None, "bool")


def _read_as_is(program: Program) -> bool:
    """Whether the program is one leaf read at (batch|head|query|key) positions, perhaps cast."""
    steps = program.steps
    last = steps[-1] if steps[-1].op != "cast" else steps[steps[-1].args[0]]
    return last.op == "load" and all(arg < 0 or steps[arg].op == "index" for arg in last.args)


def _term(builder: ProgramBuilder, operand, translate: Callable[[Any], int],
          negated: bool = False, leaf: Callable[[Any], int] | None = None) -> ProgramTerm | None:
    """The operand as a program (negated: its logical not), or None where it stays the tensor operand.

    With `leaf` (one of several biases, which the kernels add in turn only as program addends), an
    operand read as it is stays a program, and one that does not translate is read as it is
    (`leaf(operand)`, which may raise ProgramError too)."""
    try:
        step = translate(operand)
    except ProgramError as error:
        try:
            step = leaf(operand) if leaf is not None else None
        except ProgramError as leaf_error:
            error = leaf_error
        if step is None:
            logger.info("a mask or bias stays a tensor: %s", error)
            return None
    term = ProgramTerm(builder, negate(builder, step) if negated else step, operand)
    if leaf is None and _read_as_is(term.program):
        return None  # an input or buffer used as it is: the tensor operand is the same thing
    return term


def recover_terms(builder: ProgramBuilder, biases: list[tuple[Any, float]], masks: list[MaskStep],
                  translate: Callable[[Any], int], zero_masked_rows: bool,
                  leaf: Callable[[Any], int] | None = None) -> tuple[list[tuple[Any, float]], list[MaskStep]]:
    """`biases` ((operand, factor)) and `masks` with each translatable operand a `ProgramTerm`.

    Several biases all become programs where they can (`leaf(operand)` reads one that does not
    translate as it is): the kernels add a program's addends to the scores in turn, as the model
    does, where a dense sum would round ``s + (B₁ + B₂)`` differently.

    A lone bias ``where(keep, 0, −∞)`` becomes a keep-mask only with `zero_masked_rows`: where a
    row whose every key it hides is NaN, the bias passes that NaN to the gradients of the scores,
    which a mask (replacing the scores) would not.

    `translate(operand)` adds the operand's value at (batch, head, query, key) to `builder` and
    returns its step, or raises ProgramError. Masks come back in keep form (keep_when_true).
    """
    recovered_masks = []
    for step in masks:
        term = _term(builder, step.condition, translate, negated=not step.keep_when_true)
        recovered_masks.append(step if term is None else dataclasses.replace(step, condition=term, keep_when_true=True))
    recovered_biases = []
    several = len(biases) > 1
    for operand, factor in biases:
        term = _term(builder, operand, translate, leaf=leaf if several else None)
        convertible = term is not None and not recovered_masks and factor > 0 and zero_masked_rows
        found = fill_mask(term.program) if convertible else None
        if found is not None and found[1] * factor == -math.inf:
            keep, fill = found
            recovered_masks.append(MaskStep(ProgramTerm(builder, absorb(builder, keep), operand), True, fill * factor))
        else:
            recovered_biases.append((term if term is not None else operand, factor))
    return recovered_biases, recovered_masks


def program_bias_offset(term: ProgramTerm, factor: float, only_masking: bool) -> int | None:
    """o when the bias is exactly ``where(key ≤ query + o, 0, f)`` and f may become −∞ there."""
    found = fill_mask(term.program)
    if found is None or factor <= 0:
        return None
    keep, fill = found
    offset, rest = causal_split(keep)
    if offset is None or rest is not None:
        return None
    return offset if fill_is_neg_inf(fill * factor, offset, only_masking) else None


def program_mask_offset(term: ProgramTerm, step: MaskStep, only_masking: bool) -> int | tuple | None:
    """o for a keep-mask exactly ``key ≤ query + o``; (o, rest term) for ``causal ∧ rest`` with fill −∞."""
    offset, rest = causal_split(term.program)
    if offset is None:
        return None
    if rest is None:
        return offset if fill_is_neg_inf(step.fill, offset, only_masking) else None
    if not fill_is_neg_inf(step.fill, offset, False):
        return None
    return offset, ProgramTerm(term.builder, absorb(term.builder, rest))


def combined_bias(biases: list[tuple[ProgramTerm, float]]) -> int:
    """The step of ``Σ factor · bias`` over program biases that share one builder (`sum_steps`)."""
    return sum_steps(biases[0][0].builder, [(term.step, factor) for term, factor in biases])


_HALF = ("float16", "bfloat16")


def sum_steps(builder: ProgramBuilder, terms: list[tuple[int, float]]) -> int:
    """The step of ``Σ factor · step``, its additions marked as score-chain additions (`SCORE_ADD`):
    the kernels add each term to the scores in turn, in `terms`' order (the model's). Several half-precision terms are summed in fp32, as the kernels
    add each to fp32 scores: a half-precision sum would round ``alibi + (−10000)`` to the fill's ulp
    (8 in fp16), a rounding the model, which adds each bias to the scores, does not make."""
    total = None
    for step, factor in terms:
        dtype = builder.steps[step].dtype
        if len(terms) > 1 and dtype in _HALF:
            step, dtype = builder.add("cast", (step,), None, "float32"), "float32"
        if factor != 1.0:
            step = builder.add("mul", (step, builder.const(float(factor), dtype)), None, dtype)
        total = step if total is None else builder.add("add", (total, step), SCORE_ADD, _wider(builder, total, step))
    return total


def _wider(builder: ProgramBuilder, first: int, second: int) -> str:
    dtypes = {builder.steps[first].dtype, builder.steps[second].dtype}
    return dtypes.pop() if len(dtypes) == 1 else "float64" if "float64" in dtypes else "float32"


def compact_leaves(programs: list[Program | None], leaves: list) -> tuple[list[Program | None], list]:
    """The programs with only the leaves they load, renumbered in order (None programs stay None)."""
    used = sorted({step.attr for program in programs if program is not None
                   for step in program.steps if step.op == "load"})
    number = {old: new for new, old in enumerate(used)}

    def renumbered(program: Program | None) -> Program | None:
        if program is None:
            return None
        return Program(tuple(dataclasses.replace(step, attr=number[step.attr]) if step.op == "load" else step
                             for step in program.steps))

    return [renumbered(program) for program in programs], [leaves[old] for old in used]
