"""Biases and masks on the scores: align them with the score axes and prove which are causal.

A bias or mask operand must broadcast to the scores without enlarging them; its axes are the
scores' axes aligned from the right. One that depends only on shapes (a sliced causal buffer, a
``Trilu`` of a filled matrix, a ``Range`` comparison) is evaluated at several shapes of the free
symbols (all equal, twice, and all distinct); when every evaluation is exactly ``key ≤ query + o``
with the same ``o``, it becomes the kernel's causal flag instead of a materialised tensor. Operands
that are functions of the positions over O(n) leaves become score programs instead
(`program_operands`), proven on the programs without evaluating anything.
"""

from __future__ import annotations

import dataclasses
import numpy as np

from passes.core.attention_labels import FINE, MERGED
from passes.onnx.axis_labels import Operand
from passes.onnx.batch_views import BatchSplit, merged_operand, same_size
from passes.core.causal_proofs import causal_offset_of_bias, causal_offset_of_keep
from passes.onnx.onnx_match import AnalysisContext, OnnxAttentionMatch, Rejected
from passes.onnx.program_operands import recover_programs
from passes.core.attention_labels import ScoreAxes
from passes.core.mask_semantics import fill_is_neg_inf, sort_score_terms
from passes.core.fill_programs import aligned_fill_terms
from passes.core.score_algebra import ChainError, ConstantBias, MaskStep

__all__ = ["fill_masks"]


def _aligned(ctx: AnalysisContext, value, scores: ScoreAxes, what: str, split: BatchSplit | None) -> Operand:
    """A bias or mask, its axes aligned from the right with the scores' axes where the model applies
    it: with the merged (batch·heads) scores when it meets them before a batch view (`batch_views`)."""
    dims = ctx.facts.dims(value)
    if dims is None:
        raise Rejected(f"the shape of {what} '{value.name}' is unknown")
    labels, full_dims = scores.labels, tuple(scores.dims)
    merged = split is not None and value in split.merged_values
    if merged:
        position = labels.index(FINE[0])
        labels = labels.replace(FINE, MERGED)
        full_dims = full_dims[:position] + (full_dims[position:position + 2],) + full_dims[position + 2:]
    if len(dims) > len(labels):
        raise Rejected(f"{what} '{value.name}' has more axes than the scores")
    for dim, full in zip(dims, full_dims[len(full_dims) - len(dims):]):
        if dim != 1 and not same_size(dim, full):
            raise Rejected(f"cannot prove that {what} '{value.name}' of shape {list(dims)} does not enlarge "
                           f"the scores {list(scores.dims)}")
    labels = labels[len(labels) - len(dims):]
    if MERGED in labels:
        return merged_operand(value, labels, scores.canonical, split, dims)
    return Operand(value, labels, scores.canonical)


def _canonical_array(array: np.ndarray, operand: Operand) -> np.ndarray:
    labels = operand.labels
    for label in operand.order:
        if label not in labels:
            array, labels = array[..., None], labels + label
    return np.transpose(array, [labels.index(label) for label in operand.order])


def _proven_offset(ctx: AnalysisContext, operand: Operand, scores: ScoreAxes, prove) -> int | None:
    """The causal offset `prove(array, lq, lk)` finds at every evaluated shape, if they all agree."""
    if operand.merged or not ctx.folder.depends_only_on_shapes(operand.value):
        return None
    found = set()
    for index, assignment in enumerate(ctx.assignments):
        lengths = [ctx.facts.resolve(scores.dims[scores.labels.index(x)], assignment) for x in (scores.query,
                                                                                                 scores.key)]
        array = ctx.folder.evaluate(operand.value, assignment)
        evaluated = array is not None and None not in lengths
        offset = prove(_canonical_array(array, operand), *lengths) if evaluated else None
        if offset is None and (index < 2 or evaluated):
            # It must hold at the equal-size shapes and wherever the mask evaluates; only a distinct-size
            # shape that cannot be evaluated (an input the model cannot take) may be passed over.
            return None
        if offset is not None:
            found.add(offset)
    return found.pop() if len(found) == 1 else None


def fill_masks(ctx: AnalysisContext, match: OnnxAttentionMatch, scores: ScoreAxes,
               biases: list[tuple[object, float]], masks: list[MaskStep], split: BatchSplit | None = None) -> None:
    """Sort biases and masks into the match: causal flag, remaining biases, at most one mask
    (`mask_semantics.sort_score_terms`, with offsets proven on shape-only evaluations). `split`:
    the block's batch views, which say where each operand meets the scores."""
    def bias_offset(operand, factor, only_masking):
        def prove(array, lq, lk):
            found = causal_offset_of_bias(array, lq, lk) if factor > 0 else None
            if found is None or not fill_is_neg_inf(found[1] * factor, found[0], only_masking):
                return None
            return found[0]
        return _proven_offset(ctx, operand, scores, prove)

    def mask_offset(operand, step, only_masking):
        def prove(array, lq, lk):
            if array.dtype != np.bool_:
                return None
            offset = causal_offset_of_keep(array if step.keep_when_true else ~array, lq, lk)
            return offset if offset is not None and fill_is_neg_inf(step.fill, offset, only_masking) else None
        return _proven_offset(ctx, operand, scores, prove)

    def term(value, what):
        return value if isinstance(value, ConstantBias) else _aligned(ctx, value, scores, what, split)

    try:
        aligned_biases = [(term(value, "bias"), factor) for value, factor in biases]
        aligned_masks = [aligned_fill_terms(
            dataclasses.replace(step, condition=_aligned(ctx, step.condition, scores, "mask", split)),
            lambda value: _aligned(ctx, value, scores, "bias", split)) for step in masks]
    except ValueError as error:
        raise Rejected(str(error)) from None
    # A constant bias and a per-entry fill exist only as programs.
    required = any(isinstance(value, ConstantBias) for value, _ in biases) or any(step.fill_terms for step in masks)
    # Operands recovered as score programs are proven on the programs, never evaluated.
    programs = recover_programs(ctx, match, scores, aligned_biases, aligned_masks, required)
    if programs is not None:
        bias_offset, mask_offset = programs.bias_offset, programs.mask_offset
    try:
        sort_score_terms(match, aligned_biases, aligned_masks, bias_offset, mask_offset)
    except ChainError as error:
        raise Rejected(str(error)) from error
    if programs is not None:
        programs.apply(match)
