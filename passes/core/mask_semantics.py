"""What masks and biases do to the scores, IR-neutrally: the rules both front ends apply.

- `EFFECTIVELY_NEG_INF`: a finite fill at or below −1e30 hides a key as −∞ does, once the row keeps
  one real score: exp(fill − max) underflows to exactly 0 in every float type for scores of any
  realistic magnitude (< 1e29).
- `sort_score_terms`: which of a block's biases and boolean masks are its causal mask (becoming the
  kernel's causal flag and offset), which stay operands, and the orders that would change a result
  (a finite fill after the causal mask, two different causal masks, several boolean masks).
- `mask_kind`: the report's word for what is left.

Rows whose every key is masked: a hand-written softmax gives NaN; SDPA, ``aten._safe_softmax``,
Attention-23 and exports that zero such rows give 0. A match records which (``zero_masked_rows``)
and every kernel and lowering reproduces it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from passes.core.score_algebra import ChainError, MaskStep
from rewriter.kernels.program_proofs import EFFECTIVELY_NEG_INF

__all__ = ["EFFECTIVELY_NEG_INF", "ScoreSemantics", "fill_is_neg_inf", "mask_kind", "sort_score_terms"]



def fill_is_neg_inf(fill: float, offset: int, only_masking: bool) -> bool:
    """Whether a causal mask filled with `fill` may become the kernel's −∞ causal flag.

    A finite fill counts only when it is the block's only mask or bias and no row is fully hidden
    (offset ≥ 0 keeps key 0 for every query).
    """
    if fill == -math.inf:
        return True
    return fill <= EFFECTIVELY_NEG_INF and offset >= 0 and only_masking


@dataclasses.dataclass(kw_only=True)
class ScoreSemantics:
    """What one block does to its scores, in the kernels' order: ``scale`` → soft-cap
    (``softcap·tanh(s/softcap)`` folded as in `score_algebra`) → ``+ Σ factor·bias`` → where the
    mask hides a key, ``mask_fill`` (or the value of ``fill_program`` there) → causal (``key ≤ query + causal_offset``, else −∞); rows whose
    every key ends up hidden give NaN, or 0 with ``zero_masked_rows``. Operands are the IR's values.

    Both IRs' match records extend it, so each field means the same everywhere.
    """

    scale: float = 1.0
    softcap: float = 0.0
    biases: list[tuple[Any, float]] = dataclasses.field(default_factory=list)
    mask: Any = None
    mask_keep_when_true: bool = True
    mask_fill: float = -math.inf
    fill_step: Any = None  # the mask's `MaskStep` when the model adds to its fill (`MaskStep.fill_terms`)
    fill_program: Any = None  # the masked entries' values as a program (`passes.core.fill_programs`)
    causal: bool = False
    causal_offset: int = 0
    zero_masked_rows: bool = False


def sort_score_terms(semantics: ScoreSemantics, biases: list[tuple[Any, float]], masks: list[MaskStep],
                     bias_offset: Callable[[Any, float, bool], int | None],
                     mask_offset: Callable[[Any, MaskStep, bool], int | tuple | None]) -> None:
    """Sort `biases` ((operand, factor)) and `masks` into `semantics`: causal flag, remaining biases, mask.

    `bias_offset(operand, factor, only_masking)` and `mask_offset(operand, step, only_masking)` are
    the IR's provers: the causal offset o when the term is exactly ``key ≤ query + o`` (checked with
    `fill_is_neg_inf`), else None; `mask_offset` may also give (o, rest) for a mask
    ``causal ∧ rest`` whose part `rest` stays a mask with the same fill. The operands in `masks` are
    already aligned with the scores. Raises ChainError for the combinations no kernel computes exactly.
    """
    only_masking = len(biases) + len(masks) == 1
    offsets, remaining_biases = [], []
    for operand, factor in biases:
        proven = bias_offset(operand, factor, only_masking)
        if proven is None:
            remaining_biases.append((operand, factor))
        else:
            offsets.append(proven)
    remaining = []
    for step in masks:
        # A per-entry fill is no causal flag: the fill decides the rows whose every key is masked.
        proven = None if step.fill_terms else mask_offset(step.condition, step, only_masking)
        if isinstance(proven, tuple):
            proven, rest = proven
            remaining.append(dataclasses.replace(step, condition=rest))
        if proven is None:
            if offsets and math.isfinite(step.fill):
                # Keys hidden by both would hold the fill in the model but −∞ in the kernel.
                raise ChainError("a mask with a finite fill is applied after the causal mask")
            remaining.append(step)
        else:
            offsets.append(proven)
    if len(set(offsets)) > 1:
        raise ChainError("two different causal masks")
    if len(remaining) > 1:
        raise ChainError("several boolean masks on one block")
    if offsets:
        semantics.causal, semantics.causal_offset = True, offsets[0]
    semantics.biases = remaining_biases
    if remaining:
        step = remaining[0]
        semantics.mask, semantics.mask_keep_when_true, semantics.mask_fill = (
            step.condition, step.keep_when_true, step.fill)
        semantics.fill_step = step if step.fill_terms else None


def mask_kind(has_mask: bool, has_bias: bool) -> str:
    """"none", "boolean", "additive" or "boolean+additive"."""
    return {(False, False): "none", (True, False): "boolean", (False, True): "additive"}.get(
        (has_mask, has_bias), "boolean+additive")
