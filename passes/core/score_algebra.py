"""The algebra of the ops between Q·Kᵀ and softmax, shared by the FX and ONNX passes.

A score-chain walker (one per IR) records what it passes, in graph order, as steps:

    ("scale", c)            scores · c (c a scalar constant)
    ("tanh", None)          tanh(scores)
    ("bias", (value, f))    scores + f · value
    ("mask", MaskStep)      where(keep, scores, fill)
    ("shift", None)         scores + constant

`reduce_score_steps` folds them into the kernels' order ``scale → softcap → +bias → mask``, or
raises ChainError when that would change a result: a non-positive scale, soft-capping after a
bias, mask or shift, a bias after a finite-fill mask (the masked entries would differ), a shift
before a finite-fill mask (the kept scores move, the fill does not).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

__all__ = ["ChainError", "MaskStep", "ReducedScores", "reduce_score_steps", "scores_side_of_sum"]


class ChainError(Exception):
    """The ops between the product and softmax are not a form we can prove; the text says why."""


@dataclasses.dataclass(frozen=True)
class MaskStep:
    condition: Any  # the IR's boolean value
    keep_when_true: bool
    fill: float


@dataclasses.dataclass
class ReducedScores:
    scale: float = 1.0
    softcap: float = 0.0
    biases: list[tuple[Any, float]] = dataclasses.field(default_factory=list)
    masks: list[MaskStep] = dataclasses.field(default_factory=list)


def reduce_score_steps(steps_top_down: list[tuple[str, Any]]) -> ReducedScores:
    """Fold the steps, in graph order, into scale / softcap / biases / masks."""
    reduced = ReducedScores()
    pre_tanh_scale, post_tanh_scale, capped, shifted = 1.0, 1.0, False, False
    for kind, payload in steps_top_down:
        if kind == "scale":
            if not payload > 0:
                raise ChainError(f"scores are scaled by a non-positive factor {payload}")
            if capped:
                post_tanh_scale *= payload
            else:
                pre_tanh_scale *= payload
            reduced.biases = [(bias, factor * payload) for bias, factor in reduced.biases]
            reduced.masks = [dataclasses.replace(m, fill=m.fill * payload) for m in reduced.masks]
        elif kind == "tanh":
            if capped or reduced.biases or reduced.masks or shifted:
                raise ChainError("soft-capping after a bias, a mask, a shift or another tanh")
            capped = True
        elif kind == "bias":
            if any(math.isfinite(m.fill) for m in reduced.masks):
                raise ChainError("a bias is added after a mask with a finite fill value")
            reduced.biases.append(payload)
        elif kind == "mask":
            if shifted and math.isfinite(payload.fill):
                raise ChainError("a constant is added to the scores before a mask with a finite fill value")
            reduced.masks.append(payload)
        elif kind == "shift":
            shifted = True
        else:
            raise ValueError(f"unknown score step {kind!r}")
    reduced.softcap = post_tanh_scale if capped else 0.0
    reduced.scale = post_tanh_scale * pre_tanh_scale if capped else pre_tanh_scale
    return reduced


def scores_side_of_sum(name: str, left, right, walk: Callable[[Any, list, list], Any]):
    """Which operand of the sum `name` leads back to the scores: (scores, bias, found, steps, nodes).

    `walk(operand, steps, nodes)` follows an operand to the product, recording its steps and nodes,
    and raises ChainError when it does not get there; exactly one operand may.
    """
    paths = []
    for scores, bias in ((left, right), (right, left)):
        steps, nodes = [], []
        try:
            found = walk(scores, steps, nodes)
        except ChainError:
            continue
        paths.append((scores, bias, found, steps, nodes))
    if len(paths) != 1:
        raise ChainError(f"cannot tell scores from bias in '{name}'")
    return paths[0]
