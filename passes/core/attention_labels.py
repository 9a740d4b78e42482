"""Which axis is which in an attention block, proven from einsum-style axis labels alone.

Both IRs label the two products (Q·Kᵀ and P·V) the way einsum would; these functions prove the
roles of the labels, IR-neutrally:

    scores = product(Q, K)    softmax over `key`, the label that comes from K alone;
                              exactly one contracted label (the head dim); batch = the rest
    out    = product(P, V)    P's key label contracted against V, query label kept, one value
                              dim from V alone, no batch label summed away
"""

from __future__ import annotations

import dataclasses

__all__ = ["FINE", "MERGED", "compact_labels", "expand", "LabelError", "PvAxes", "QkAxes", "ScoreAxes", "prove_pv_axes", "prove_qk_axes"]


# A (batch·heads) axis that views split or merge (BLOOM's scores on B·H batches): its label in
# operand labels, and the labels of its (batch, heads) axes once split; never einsum letters.
FINE = "01"
MERGED = "*"


def expand(labels: str) -> str:
    """Labels with the merged axis written as its two split labels."""
    return labels.replace(MERGED, FINE)


class LabelError(Exception):
    """The labels do not prove attention; the text says why."""


def compact_labels(product, split: bool):
    """With batch views (`split`), a labelled product's batch labels renamed: one merged axis
    `MERGED`, two `FINE`. `product` is either IR's record with `left_labels`, `right_labels` and
    `out_labels` (batch labels first in `out_labels`); raises LabelError for other batch counts."""
    if not split:
        return product
    batch = product.out_labels[:-2]
    if len(batch) not in (1, 2):
        raise LabelError(f"a product with {len(batch)} batch axes in a block with batch views")
    names = dict(zip(batch, MERGED if len(batch) == 1 else FINE))

    def rename(labels: str) -> str:
        return "".join(names.get(label, label) for label in labels)

    return dataclasses.replace(product, left_labels=rename(product.left_labels),
                               right_labels=rename(product.right_labels), out_labels=rename(product.out_labels))


@dataclasses.dataclass(frozen=True)
class QkAxes:
    key_on_left: bool
    query: str
    key: str
    head_dim: str
    batch: str  # batch labels in scores order (at most batch and heads)

    @property
    def query_order(self) -> str:
        return self.batch + self.query + self.head_dim

    @property
    def key_order(self) -> str:
        return self.batch + self.key + self.head_dim


@dataclasses.dataclass(frozen=True)
class ScoreAxes:
    """The scores' axis labels and sizes (ints, or the IR's symbolic sizes), and the roles of the labels."""

    labels: str
    dims: tuple
    batch: str
    query: str
    key: str

    @property
    def canonical(self) -> str:
        """The labels in the kernels' order: batch…, query, key."""
        return self.batch + self.query + self.key


@dataclasses.dataclass(frozen=True)
class PvAxes:
    value_order: str  # V's labels (in the P·V product's letters) in op order: batch, key, value dim
    out_canonical: str  # the op output's labels in the product's letters: batch, query, value dim


def _query_label(scores: str, key: str, query_side: str, key_side: str) -> str:
    candidates = [label for label in scores if label in query_side and label not in key_side and label != key]
    if scores[-1] == key and scores[-2] in candidates:
        return scores[-2]
    if len(candidates) == 1:
        return candidates[0]
    raise LabelError("cannot tell the query axis among " + ", ".join(candidates))


def prove_qk_axes(scores: str, left: str, right: str, key: str) -> QkAxes:
    """Roles of the Q·Kᵀ labels, given the label softmax normalises over."""
    contracted = [label for label in left if label in right and label not in scores]
    if len(contracted) != 1:
        raise LabelError(f"Q·Kᵀ contracts {len(contracted)} axes, not one head dim")
    if (key in left) == (key in right):
        raise LabelError("softmax is not over the key axis")
    key_on_left = key in left
    query_side, key_side = (right, left) if key_on_left else (left, right)
    query = _query_label(scores, key, query_side, key_side)
    batch = "".join(label for label in scores if label not in (query, key))
    if len(batch) > 2:
        raise LabelError(f"{len(batch)} batch axes (at most batch and heads are supported)")
    if any(label not in query_side for label in batch):
        raise LabelError("the query broadcasts over a batch axis")
    return QkAxes(key_on_left, query, key, contracted[0], batch)


def prove_pv_axes(qk: QkAxes, scores: str, probabilities: str, value: str, out: str) -> PvAxes:
    """Roles of the P·V labels; `probabilities` are P's labels there, axis for axis with `scores`."""
    if len(probabilities) != len(scores):
        raise LabelError("probabilities change rank before P·V")
    rename = dict(zip(scores, probabilities))
    key, query = rename[qk.key], rename[qk.query]
    if key not in value or key in out:
        raise LabelError("softmax is not over the axis P·V contracts (the key axis)")
    if query in value or query not in out:
        raise LabelError("P·V does not keep the query axis")
    value_dims = [label for label in value if label not in probabilities]
    if len(value_dims) != 1 or any(label not in probabilities + value_dims[0] for label in value):
        raise LabelError("V has axes that are not batch, key or value-dim axes")
    batch = "".join(rename[label] for label in qk.batch)
    out_canonical = batch + query + value_dims[0]
    if sorted(out) != sorted(out_canonical):
        raise LabelError("P·V sums over a batch axis")
    return PvAxes(batch + key + value_dims[0], out_canonical)
