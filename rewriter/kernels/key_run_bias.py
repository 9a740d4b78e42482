"""A bias ``x + where(keep, 0, f)`` whose keep-mask reads only the key, fed to the fused kernel as x alone.

HF T5 adds its padding mask to its bucket bias (`rewriter.kernels.program_proofs.added_fill`). The
keep-mask is evaluated once per call, as one row of keys (`evaluate_within` refuses before anything
rows × keys exists), and split into runs of kept and hidden keys. Each run of kept keys becomes a
part of the chunk whose mask is x alone: x + 0 is x (up to the sign of a zero, which no score sees).
The hidden keys are left out, which is exact where x + f is at or below `EFFECTIVELY_NEG_INF` there
(checked per chunk: exp() of such a score is exactly 0 in a row that keeps a key). Where x reads
the positions only through ``key − query`` it is one strided view for the whole call
(`relative_view`), so a chunk's mask is a slice of it and nothing rows × keys is written; its rows'
maxima come from its rows + keys − 1 differences (`row_max`).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from rewriter.kernels.chunked_attention import BlockTerms, ScoreTerms
from rewriter.kernels.program_proofs import EFFECTIVELY_NEG_INF, added_fill
from rewriter.kernels.score_program import Program
from rewriter.kernels.score_program_torch import evaluate_within, relative_view

__all__ = ["KeyRunBias", "kernel_layout", "row_max"]

logger = logging.getLogger(__name__)

_MAX_RUNS = 8  # runs of kept keys a chunk is split into; more: the caller builds the whole bias


class KeyRunBias:
    """The bias program of one call as x on runs of kept keys (see the module docstring).

    `applies` returns None where the bias is not ``x + where(keep, 0, f)`` with a key-only keep.
    """

    def __init__(self, x: BlockTerms, fill: float, runs: list[tuple[int, int, bool]], view: torch.Tensor | None,
                 query_len: int, dtype: torch.dtype):
        self.x, self.fill, self.runs, self.view = x, fill, runs, view
        self.query_len, self.dtype = query_len, dtype

    @classmethod
    def applies(cls, terms: ScoreTerms, q: torch.Tensor, key_len: int) -> KeyRunBias | None:
        """q (B, H, Lq, D); the call's keys number `key_len`. Builds nothing rows × keys."""
        if terms.bias_program is None or terms.mask is not None or terms.mask_program is not None:
            return None
        found = added_fill(terms.bias_program)
        if found is None:
            return None
        x, keep, fill = found
        if len(x.addends) > 1:  # x is fed as one sum; its addends' order is checked blockwise (`fused_rows`)
            return None
        keys = _key_row(keep, list(terms.leaves), q, key_len)
        if keys is None:
            return None
        view = relative_view(x, list(terms.leaves), q.size(0), q.size(1), q.size(-2), key_len, q.device)
        logger.debug("bias x + where(keep[key], 0, %g): x on runs of kept keys%s", fill,
                     ", one strided view" if view is not None else "")
        return cls(BlockTerms(dataclasses.replace(terms, bias_program=x), q, kv_heads=q.size(1)), fill,
                   _runs(keys, key_len), view, q.size(-2), q.dtype)

    def parts(self, q0: int, q1: int, k0: int, k1: int, reverse_rows: bool) -> list[tuple[int, int, torch.Tensor]] | None:
        """(start, stop, mask (B|1, H|1, rows, stop − start)) for each run of kept keys in k0:k1, rows q0:q1
        last first with `reverse_rows` (the view's slices need that order); [] when all are hidden. None
        where a hidden key's x + f is above `EFFECTIVELY_NEG_INF`, x's dtype is not the query's, or the
        runs are more than `_MAX_RUNS`: the caller then builds the whole bias."""
        if self.view is not None and reverse_rows:
            view = self.view
            bias = view[..., self.query_len - q1:self.query_len - q0, :] if view.size(-2) > 1 else view
            bias = bias[..., k0:k1] if view.size(-1) > 1 else bias
        else:
            bias = self.x.bias_block(q0, q1, k0, k1, reverse_rows).squeeze(2)
        runs = [(max(start, k0), min(stop, k1), kept) for start, stop, kept in self.runs if start < k1 and stop > k0]
        if bias.dtype != self.dtype or sum(kept for *_, kept in runs) > _MAX_RUNS:
            return None
        parts = []
        for start, stop, kept in runs:
            block = bias if bias.size(-1) == 1 else bias[..., start - k0:stop - k0]
            if kept:
                parts.append((start, stop, kernel_layout(block)))
            elif not float(row_max(block).amax() + self.fill) <= EFFECTIVELY_NEG_INF:  # NaN fails too
                return None
        return parts


def _key_row(keep: Program, leaves: list[torch.Tensor], q: torch.Tensor, keys: int) -> torch.Tensor | None:
    """The keep-mask over all rows as one (keys,) row (or one entry for all), where it reads only the key
    (``query ≥ 0 ∧ pad[0, key]``); None otherwise, having made nothing larger than (rows + keys) · B · H."""
    batch, heads, rows = q.size(0), q.size(1), q.size(-2)
    value = evaluate_within(keep, leaves, batch, heads, (0, rows), (0, keys), q.device, batch * heads * (rows + keys))
    if value is None or any(size != 1 for size in value.shape[:-1]):
        return None
    return value.reshape(-1)


def _runs(keep: torch.Tensor, count: int) -> list[tuple[int, int, bool]]:
    """(start, stop, kept) for each maximal run of equal entries of a (count,) boolean row, or of one
    entry standing for all `count`."""
    if keep.numel() == 1:
        return [(0, count, bool(keep))]
    edges = (torch.nonzero(keep[1:] != keep[:-1]).flatten() + 1).tolist()
    starts = [0] + edges
    return list(zip(starts, edges + [count], keep[starts].tolist()))


def row_max(mask: torch.Tensor) -> torch.Tensor:
    """Each row's largest entry of a (·, ·, rows, keys) mask. A Toeplitz view (strides 1, 1 on rows and
    keys: `relative_view`'s blocks) is read through its rows + keys − 1 differences d: row r holds
    d[r : r + keys] = d[r : rows − 1] ∪ d[rows − 1 : keys] ∪ d[keys : keys + r], so a max over the
    shared middle and running maxima over the two ends give every row without reading rows × keys."""
    rows, keys = mask.shape[-2:]
    if rows < 2 or keys < rows or mask.stride()[-2:] != (1, 1):
        return mask.amax(-1)
    differences = mask.as_strided(mask.shape[:-2] + (rows + keys - 1,), mask.stride()[:-2] + (1,))
    if bool(differences.isnan().any()):  # NaN propagates through amax; keep that without relying on cummax
        return mask.amax(-1)
    largest = differences[..., rows - 1:keys].amax(-1, keepdim=True).expand(mask.shape[:-1]).clone()
    first = differences[..., :rows - 1].flip(-1).cummax(-1).values.flip(-1)  # max d[r : rows − 1], r < rows − 1
    last = differences[..., keys:].cummax(-1).values  # max d[keys : keys + r], r ≥ 1
    largest[..., :rows - 1] = torch.maximum(largest[..., :rows - 1], first)
    largest[..., 1:] = torch.maximum(largest[..., 1:], last)
    return largest


def kernel_layout(mask: torch.Tensor) -> torch.Tensor:
    """The additive mask as PyTorch's fused CPU kernel reads it: any strides on the other axes (a Toeplitz
    view has row stride 1), but consecutive keys adjacent."""
    return mask if mask.size(-1) == 1 or mask.stride(-1) == 1 else mask.contiguous()
