"""Views inside an attention block that only split or merge its batch and head axes.

BLOOM forms its scores on (B·H) batches and views them as (B, H, Lq, Lk) around the mask add and
the softmax, then back to (B·H, Lq, Lk) for P·V::

    baddbmm(alibi, Q, Kᵀ) ─ view(B, H, Lq, Lk) ─ + mask ─ softmax ─ view(B·H, Lq, Lk) ─ bmm(·, V)

Row-major views that keep the two trailing (query, key) axes and turn a leading (B·H,) into
(B, H) or back move no score to another row or key, so such a block is still attention. The match
then works on the split form: a product written on merged batches has its merged label written
`MERGED` in operand labels and `FINE` in kernel orders, and each operand holding the merged
axis is viewed as (B, H) (or (1, 1) where it broadcasts) before it reaches the op.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import sympy
from torch.fx import Node

from passes.fx import aten_vocabulary as ops

__all__ = ["BatchSplit", "BatchViewError", "batch_split", "is_batch_view", "sizes", "split_shape", "unflatten_sizes"]

logger = logging.getLogger(__name__)


class BatchViewError(ValueError):
    """The shapes in a block are not views of one another's batch axes; the text says why."""


def sizes(node) -> tuple | None:
    """Sizes of `node`: ints, or sympy expressions for dynamic sizes (compared without guards); None
    when export recorded none."""
    meta = ops.tensor_meta(node)
    return None if meta is None else tuple(size if isinstance(size, int) else size.node.expr for size in meta.shape)


def _same(first, second) -> bool:
    """Two sizes (ints or sympy expressions) that are equal for every value of their symbols."""
    return sympy.expand(first - second) == 0


def is_batch_view(node: Node) -> bool:
    """A reshape/view keeping the two trailing sizes and the number of elements before them.

    Dynamic sizes (HF BLOOM exported with a dynamic batch and length: (4·s0, s1, s1) viewed as
    (s0, 4, s1, s1)) are compared as polynomials in their symbols, so no guard is added.
    """
    if not ops.is_call(node, ops.RESHAPE):
        return False
    before, after = sizes(node.args[0]), sizes(node)
    if before is None or after is None or len(before) < 3 or len(after) < 3:
        return False
    return all(_same(a, b) for a, b in zip(before[-2:], after[-2:])) and _same(
        math.prod(before[:-2]), math.prod(after[:-2]))


@dataclasses.dataclass(frozen=True)
class BatchSplit:
    """The (batch, heads) sizes the merged (batch·heads) axis of a block splits into (ints or
    sympy expressions; at most one of them dynamic, see `unflatten_sizes`)."""

    sizes: tuple

    @property
    def merged(self) -> int:
        return self.sizes[0] * self.sizes[1]


def batch_split(shapes: list[tuple]) -> BatchSplit | None:
    """The split shared by every shape of a block, or None when all have the same batch axes.

    Each shape is (…batch, Lq, Lk); the batch axes must be (B·H,) or (B, H) for one (B, H).
    Raises BatchViewError otherwise.
    """
    prefixes = {tuple(shape[:-2]) for shape in shapes}
    if len({tuple(shape[-2:]) for shape in shapes}) > 1:
        raise BatchViewError("a view between the products and softmax changes the query or key axis")
    if len(prefixes) == 1:
        return None
    split = [prefix for prefix in prefixes if len(prefix) == 2]
    merged = [prefix for prefix in prefixes if len(prefix) == 1]
    if len(split) != 1 or len(split) + len(merged) != len(prefixes) or any(
            not _same(prefix[0], math.prod(split[0])) for prefix in merged):
        raise BatchViewError(
            "views between the products and softmax reshape more than the batch and head axes "
            f"(batch axes {sorted(prefixes, key=str)})")
    return BatchSplit(split[0])


def split_shape(shape: tuple, position: int, split: BatchSplit) -> tuple:
    """`shape` with its merged axis at `position` viewed as (B, H), or as (1, 1) where it broadcasts."""
    size = shape[position]
    if _same(size, split.merged):
        parts = split.sizes
    elif size == 1:
        parts = (1, 1)
    else:
        raise BatchViewError(f"an operand of batch size {size} does not view as {split.sizes}")
    return tuple(shape[:position]) + tuple(parts) + tuple(shape[position + 1:])


def unflatten_sizes(parts: tuple) -> list[int]:
    """The (batch, heads) sizes of a split as `unflatten` takes them: a dynamic one becomes −1.

    Raises BatchViewError when both are dynamic (the split would not be determined by the sizes).
    """
    if not any(isinstance(part, int) for part in parts):
        raise BatchViewError(f"a (batch·heads) axis splits into two dynamic sizes {parts}")
    return [part if isinstance(part, int) else -1 for part in parts]
