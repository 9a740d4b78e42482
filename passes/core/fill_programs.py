"""The per-entry fill of a mask that the model follows with biases: a score program, IR-neutrally.

HF GPT-2 (transformers 4.x) and code written like it mask first and add the padding bias after::

    w = where(causal, s, F)             F = finfo.min, a finite fill
    w = w + B                           B = (1 − m)[:, None, None, :] · finfo.min

Elementwise and exactly in IEEE arithmetic ``where(c, s, F) + B == where(c, s + B, F + B)``, so the
kernels' order (``+bias → mask``) computes the same scores when the mask fills with ``F + B`` per
entry instead of the constant F. `score_algebra.reduce_score_steps` records what follows the mask in
`MaskStep.fill_terms`; `fill_program_step` writes it as a program in the model's order and dtype
(``finfo(fp16).min + finfo(fp16).min`` is −∞ in fp16 but −131008 in fp32; the program rounds as the
model does). Kernels replace masked entries by the program's values, which decide the rows whose
every key is masked (a uniform row, −∞ entries, or NaN, as in the model). For F = −∞ the values stay
−∞, but the gradients of B on a row of NaN are NaN in the model, and are through the fill program.
A bias operand that does not translate into a program leaves the fill unexpressible
(`fill_program_term` raises ChainError with the reason), and the block is left alone.

A constant added before such a mask (`score_algebra.ConstantBias`) is a bias, written as a
constant step by `term_step`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

from passes.core.program_terms import ProgramTerm
from passes.core.score_algebra import ChainError, ConstantBias, MaskStep
from passes.core.score_programs import ProgramBuilder, ProgramError

__all__ = ["aligned_fill_terms", "fill_program_step", "fill_program_term", "term_step", "unexpressible"]

logger = logging.getLogger(__name__)


def term_step(builder: ProgramBuilder, operand: Any, translate: Callable[[Any], int]) -> int:
    """The step of a bias operand: a constant for a `ConstantBias`, else `translate(operand)`
    (which raises `ProgramError` where the operand is no program)."""
    if isinstance(operand, ConstantBias):
        return builder.const(float(operand.value), operand.dtype)
    return translate(operand)


def _scaled(builder: ProgramBuilder, step: int, factor: float, dtype: str) -> int:
    if factor == 1.0:
        return step
    if factor == -1.0:
        return builder.add("neg", (step,), None, dtype)
    return builder.add("mul", (step, builder.const(float(factor), dtype)), None, dtype)


def fill_program_step(builder: ProgramBuilder, step: MaskStep, translate: Callable[[Any], int]) -> int:
    """The step computing the mask's fill (`step.fill` then `step.fill_terms`) per entry: F rounded to the mask's dtype, then each fill
    term in the model's order, each result rounded to the dtype the model computes it in.

    `translate(operand)` gives a bias operand's step (raising `ProgramError` where there is none).
    """
    dtype = step.dtype or "float32"
    value = builder.add("cast", (builder.const(float(step.fill), "float32"),), None, dtype)
    for term in step.fill_terms:
        if term[0] == "scale":
            value = builder.add("mul", (value, builder.const(float(term[1]), dtype)), None, dtype)
            continue
        _, operand, factor, dtype = term
        dtype = dtype or "float32"
        bias = term_step(builder, operand, translate)
        if factor == -1.0:  # x − B, as the model's subtraction rounds it
            value = builder.add("sub", (value, bias), None, dtype)
        else:
            value = builder.add("add", (value, _scaled(builder, bias, factor, builder.steps[bias].dtype)), None, dtype)
    return value


def aligned_fill_terms(step: MaskStep, align: Callable[[Any], Any]) -> MaskStep:
    """`step` with each bias operand of its fill terms passed through `align` (a `ConstantBias` as it is)."""
    def term(entry):
        if entry[0] != "bias" or isinstance(entry[1], ConstantBias):
            return entry
        return (entry[0], align(entry[1]), *entry[2:])
    return dataclasses.replace(step, fill_terms=tuple(term(entry) for entry in step.fill_terms))


def unexpressible(biases: list[tuple[Any, float]], is_program: Callable[[Any], bool]) -> str | None:
    """Why the kernels cannot take these biases: every one is a constant (`ConstantBias`) that did
    not become a program (score programs off), so no tensor carries it; else None."""
    if biases and all(isinstance(operand, ConstantBias) and not is_program(operand) for operand, _ in biases):
        return ("a constant is added to the scores before a mask with a finite fill: a bias that needs "
                "score programs")
    return None


def fill_program_term(builder: ProgramBuilder, step: MaskStep, translate: Callable[[Any], int],
                      programs: bool = True) -> ProgramTerm | None:
    """The fill of `step` (a mask with fill terms) as a `ProgramTerm` of `builder`; ChainError with
    the reason where it is no program (score programs off, or a bias that does not translate).

    With score programs off, a −∞ fill stays the constant −∞ (None): the values are the same, only
    the bias's gradients on rows whose every key is masked (NaN in the model) are 0 instead."""
    if not programs and step.fill == -math.inf:
        logger.info("score programs off: a bias after a −∞ mask keeps the constant fill")
        return None
    if not programs:
        raise ChainError("a bias is added after a mask, whose per-entry fill (fill + bias) needs score programs")
    try:
        return ProgramTerm(builder, fill_program_step(builder, step, translate))
    except ProgramError as error:
        raise ChainError(f"a bias added after a mask is not a score program ({error}), so the masked "
                         "entries' values (fill + bias) cannot be computed per block") from error
