"""The keys a chunk of query rows can keep, from the causal flag and what the score programs prove.

A row q keeps no key above ``q + upper`` (the causal flag's offset, or a keep-mask conjunct
``key ≤ query + o``) nor below ``q + lower`` (a sliding window's far edge ``key ≥ query + o``),
read from the programs alone by `program_proofs.key_bounds` (a keep-mask program) or
`program_proofs.filled_bias_bounds` (a bias ``where(keep, x, f)`` with f ≤ −1e30, HF eager's
``where(mask, 0, finfo.min)``, used only when no mask hides keys too). Rows q0..q1−1 together keep
keys in `KeyRange.span` only, so a kernel visits no block outside it.

Skipping a key is exact when its score is −∞ (it adds exp(−∞) = 0; a row with no key left is NaN
either way). A key a program hides with a finite fill f (`KeyRange.fill`) is exactly 0 after exp()
only in a row that has a score more than `UNDERFLOW` above f; a row with none (every key hidden)
averages V over *all* keys in the original, so the kernel must then visit the skipped keys too.
"""

from __future__ import annotations

import dataclasses
import logging
import math

from rewriter.kernels.program_proofs import bias_fill, filled_bias_bounds, key_bounds
from rewriter.kernels.score_program import Program

__all__ = ["UNDERFLOW", "KeyRange", "key_range"]

logger = logging.getLogger(__name__)

# exp(x) rounds to exactly 0 in fp32 for x < −103.98 (the smallest subnormal is 1.4e−45).
UNDERFLOW = 110.0


@dataclasses.dataclass(frozen=True)
class KeyRange:
    """Row q keeps only keys in [q + lower, q + upper] (None: no bound on that side).

    `fill` is None when every key outside the bounds scores −∞; otherwise the finite score a
    program gives those keys (see the module docstring for when skipping them is exact).
    """

    upper: int | None = None
    lower: int | None = None
    fill: float | None = None

    @property
    def bounded(self) -> bool:
        return self.upper is not None or self.lower is not None

    def span(self, q0: int, q1: int, key_len: int) -> tuple[int, int]:
        """(k0, k1): every key rows q0..q1−1 may keep is in k0..k1−1, with 0 ≤ k0 ≤ k1 ≤ key_len."""
        stop = key_len if self.upper is None else min(max(q1 + self.upper, 0), key_len)
        start = 0 if self.lower is None else min(max(q0 + self.lower, 0), stop)
        return start, stop


def key_range(*, mask_program: Program | None, bias_program: Program | None, dense_mask: bool,
              mask_fill: float, per_entry_fill: bool, causal: bool, causal_offset: int) -> KeyRange:
    """The bounds the causal flag and the programs prove for one call of the attention op.

    `dense_mask`: a mask tensor is given (its hidden keys take `mask_fill`, whatever a bias
    program's fill says, so a bias program's bounds are not used then). `per_entry_fill`: a fill
    program gives each hidden key its own value, so only the causal flag (−∞ whatever the fill)
    bounds the keys.
    """
    upper = causal_offset if causal else None
    if per_entry_fill:
        return KeyRange(upper=upper)
    if mask_program is not None:
        program_upper, lower, _ = key_bounds(mask_program)
        fill = mask_fill
    elif bias_program is not None and not dense_mask and filled_bias_bounds(bias_program) is not None:
        program_upper, lower, _ = filled_bias_bounds(bias_program)
        fill = bias_fill(bias_program)
    else:
        return KeyRange(upper=upper)
    tighter = program_upper is not None and (upper is None or program_upper < upper)
    if tighter:
        upper = program_upper
    finite = fill != -math.inf and (tighter or lower is not None)
    bounds = KeyRange(upper, lower, fill if finite else None)
    logger.debug("key range: keys in [q %+s, q %+s], finite fill %s", lower, upper, bounds.fill)
    return bounds
