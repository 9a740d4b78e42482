"""The algebra of the ops between Q·Kᵀ and softmax, shared by the FX and ONNX passes.

A score-chain walker (one per IR) records what it passes, in graph order, as steps:

    ("scale", c)                   scores · c (c a scalar constant)
    ("tanh", None)                 tanh(scores)
    ("bias", (value, f[, dtype]))  scores + f · value (dtype: the sum's, where a finite fill may precede it)
    ("mask", MaskStep)             where(keep, scores, fill)
    ("shift", (c, dtype))          scores + c (c a scalar constant; dtype: the scores')

`reduce_score_steps` folds them into the kernels' order ``scale → softcap → +bias → mask``, or
raises ChainError when that would change a result: a non-positive scale, soft-capping after a
bias, mask or shift. The model's order is kept where it matters through the IEEE identity
``where(c, s, F) + B == where(c, s + B, F + B)`` (elementwise): a bias added after a mask with
fill F is applied before the mask, and the mask fills with ``F + B`` per entry, computed in
the model's order and dtype (`MaskStep.fill_terms`, built into a fill program by
`passes.core.fill_programs`). A shift before a finite-fill mask is the constant bias it is
(`ConstantBias`: ``where(c, s + C, F)`` is the kernels' ``+bias → mask``); elsewhere a shift moves
a whole row and is dropped (softmax is invariant to it).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["ChainError", "ConstantBias", "MaskStep", "ReducedScores", "reduce_score_steps", "scores_side_of_sum"]


class ChainError(Exception):
    """The ops between the product and softmax are not a form we can prove; the text says why."""


@dataclasses.dataclass(frozen=True)
class MaskStep:
    condition: Any  # the IR's boolean value
    keep_when_true: bool
    fill: float
    dtype: str | None = None  # the scores' dtype where the mask applies ("float32", …), when known
    # What the model does to the masked entries after the mask, in its order: ("bias", value, factor,
    # dtype of the sum) and ("scale", c). Empty: the fill is the constant `fill`.
    fill_terms: tuple = ()

    def __post_init__(self):
        # The fill as the masked scores hold it: fp32's finfo.min written into bf16/fp16 scores is −∞ there.
        object.__setattr__(self, "fill", held_as(self.fill, self.dtype))


def held_as(value: float, dtype: str | None) -> float:
    """`value` rounded to nearest even in `dtype` ("float32", "float16", "bfloat16"; others and None:
    as it is), past the dtype's range ±∞, as storing it in a tensor of that dtype does."""
    if dtype not in ("float32", "float16", "bfloat16") or not math.isfinite(value):
        return value
    with np.errstate(over="ignore"):
        if dtype == "float16":
            return float(np.float16(value))
        single = np.float32(value)
    if dtype == "float32":
        return float(single)
    bits = int(np.array(single).view(np.uint32))
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return float(np.array(bits & 0xFFFFFFFF, dtype=np.uint32).view(np.float32))


@dataclasses.dataclass(frozen=True)
class ConstantBias:
    """A scalar constant added to the scores before a finite-fill mask: a bias, not a shift."""

    value: float
    dtype: str = "float32"


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
    shifts: list[tuple[int, tuple[ConstantBias, float]]] = []  # constants added since the last finite-fill
    # mask, each with the number of biases before it (the kernels add biases in the model's order)
    for kind, payload in steps_top_down:
        if kind == "scale":
            if not payload > 0:
                raise ChainError(f"scores are scaled by a non-positive factor {payload}")
            if capped:
                post_tanh_scale *= payload
            else:
                pre_tanh_scale *= payload
            reduced.biases = [(bias, factor * payload) for bias, factor in reduced.biases]
            shifts = [(position, (bias, factor * payload)) for position, (bias, factor) in shifts]
            reduced.masks = [dataclasses.replace(m, fill_terms=m.fill_terms + (("scale", payload),)) if m.fill_terms
                             else dataclasses.replace(m, fill=m.fill * payload) for m in reduced.masks]
        elif kind == "tanh":
            if capped or reduced.biases or reduced.masks or shifted:
                raise ChainError("soft-capping after a bias, a mask, a shift or another tanh")
            capped = True
        elif kind == "bias":
            value, factor, *dtype = payload
            # where(c, s, F) + B == where(c, s + B, F + B): the bias moves before the mask, its fill follows
            # it. For F = −∞ too: the values stay −∞, but on a row whose every key is masked (NaN) the
            # model's bias gets NaN gradients through the masked entries.
            reduced.masks = [dataclasses.replace(m, fill_terms=m.fill_terms + (
                ("bias", value, factor, dtype[0] if dtype else m.dtype),)) for m in reduced.masks]
            reduced.biases.append((value, factor))
        elif kind == "mask":
            if math.isfinite(payload.fill):
                for inserted, (position, shift) in enumerate(shifts):  # where(c, s + C, F): the kernels' +bias → mask
                    reduced.biases.insert(position + inserted, shift)
                shifts = []
            reduced.masks.append(payload)
        elif kind == "shift":
            shifted = True
            if not any(math.isfinite(m.fill) for m in reduced.masks):  # after one, it moves the whole row
                shifts.append((len(reduced.biases), (ConstantBias(*payload), 1.0)))  # payload: (value, dtype)
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
