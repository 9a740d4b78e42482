"""Biases and masks on the scores: align them with the score axes and prove which are causal.

A bias or mask operand must broadcast to the scores without enlarging them; its axes are the
scores' axes aligned from the right. One that depends only on shapes (a sliced causal buffer, a
``Trilu`` of a filled matrix, a ``Range`` comparison) is evaluated at several shapes of the free
symbols (all equal, twice, and all distinct); when every evaluation is exactly ``key ≤ query + o``
with the same ``o``, it becomes the kernel's causal flag instead of a materialised tensor.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from passes.onnx.axis_labels import Operand
from passes.onnx.constant_folding import causal_offset_of_bias, causal_offset_of_keep
from passes.onnx.onnx_match import AnalysisContext, OnnxAttentionMatch, Rejected
from passes.score_algebra import MaskStep
from passes.onnx.shape_facts import ShapeFacts

__all__ = ["Scores", "fill_masks", "EFFECTIVELY_NEG_INF"]

# A finite mask fill this negative is as good as −∞ once every row keeps a real score: exp(fill − max)
# underflows to exactly 0 in every float type for scores of any realistic magnitude (< 1e29).
EFFECTIVELY_NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class Scores:
    labels: str
    dims: tuple
    batch: str
    query: str
    key: str

    @property
    def canonical(self) -> str:
        return self.batch + self.query + self.key


def _aligned(ctx: AnalysisContext, value, scores: Scores, what: str) -> Operand:
    dims = ctx.facts.dims(value)
    if dims is None:
        raise Rejected(f"the shape of {what} '{value.name}' is unknown")
    if len(dims) > len(scores.labels):
        raise Rejected(f"{what} '{value.name}' has more axes than the scores")
    for dim, full in zip(dims, scores.dims[len(scores.dims) - len(dims):]):
        if dim != 1 and not ShapeFacts.same(dim, full):
            raise Rejected(f"cannot prove that {what} '{value.name}' of shape {list(dims)} does not enlarge "
                           f"the scores {list(scores.dims)}")
    return Operand(value, scores.labels[len(scores.labels) - len(dims):], scores.canonical)


def _canonical_array(array: np.ndarray, operand: Operand) -> np.ndarray:
    labels = operand.labels
    for label in operand.target:
        if label not in labels:
            array, labels = array[..., None], labels + label
    return np.transpose(array, [labels.index(label) for label in operand.target])


def _fill_is_neg_inf(fill: float, offset: int, only_masking: bool) -> bool:
    if fill == -math.inf:
        return True
    return fill <= EFFECTIVELY_NEG_INF and offset >= 0 and only_masking


def _proven_offset(ctx: AnalysisContext, operand: Operand, scores: Scores, prove) -> int | None:
    """The causal offset `prove(array, lq, lk)` finds at every evaluated shape, if they all agree."""
    if not ctx.folder.depends_only_on_shapes(operand.value):
        return None
    found = set()
    for index, assignment in enumerate(ctx.assignments):
        lengths = [ctx.facts.resolve(scores.dims[scores.labels.index(x)], assignment) for x in (scores.query,
                                                                                                 scores.key)]
        array = ctx.folder.evaluate(operand.value, assignment)
        offset = None
        if array is not None and None not in lengths:
            offset = prove(_canonical_array(array, operand), *lengths)
        if offset is None and index < 2:
            return None  # must hold at the equal-size shapes; distinct sizes may be impossible inputs
        if offset is not None:
            found.add(offset)
    return found.pop() if len(found) == 1 else None


def fill_masks(ctx: AnalysisContext, match: OnnxAttentionMatch, scores: Scores,
               biases: list[tuple[object, float]], masks: list[MaskStep]) -> None:
    """Sort biases and masks into the match: causal flag, remaining biases, at most one mask."""
    only_masking = len(biases) + len(masks) == 1
    causal_offsets, remaining_biases, remaining_masks = [], [], []
    for value, factor in biases:
        operand = _aligned(ctx, value, scores, "bias")

        def bias_offset(array, lq, lk, factor=factor):
            found = causal_offset_of_bias(array, lq, lk) if factor > 0 else None
            if found is None or not _fill_is_neg_inf(found[1] * factor, found[0], only_masking):
                return None
            return found[0]

        proven = _proven_offset(ctx, operand, scores, bias_offset)
        if proven is None:
            remaining_biases.append((operand, factor))
        else:
            causal_offsets.append(proven)
    for step in masks:
        operand = _aligned(ctx, step.condition, scores, "mask")

        def mask_offset(array, lq, lk, step=step):
            if array.dtype != np.bool_:
                return None
            offset = causal_offset_of_keep(array if step.keep_when_true else ~array, lq, lk)
            return offset if offset is not None and _fill_is_neg_inf(step.fill, offset, only_masking) else None

        proven = _proven_offset(ctx, operand, scores, mask_offset)
        if proven is None:
            if causal_offsets and math.isfinite(step.fill):
                # Keys hidden by both would hold the fill in the model but −∞ in the kernel.
                raise Rejected("a mask with a finite fill is applied after the causal mask")
            remaining_masks.append((operand, step))
        else:
            causal_offsets.append(proven)
    if len(set(causal_offsets)) > 1:
        raise Rejected("two different causal masks")
    if causal_offsets:
        match.causal, match.causal_offset = True, causal_offsets[0]
    match.biases = remaining_biases
    if len(remaining_masks) > 1:
        raise Rejected("several boolean masks on one block")
    if remaining_masks:
        operand, step = remaining_masks[0]
        match.mask, match.mask_keep_when_true, match.mask_fill = operand, step.keep_when_true, step.fill
