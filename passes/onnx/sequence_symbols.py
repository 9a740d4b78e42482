"""Which symbolic input dims of an ONNX model are the sequence lengths of its attention blocks.

Detection already proves which axis of each block's Q and K is the query / key axis (the
second-to-last label of the operand's kernel order; the length axis of a Performer block's
(batch, heads, length, dim) q and k, or the axis its layout's permutation takes there). The dims of those axes are read from the model's shape facts;
every free symbol of the graph inputs that occurs in one (``seq``, or both ``past`` and ``seq`` in
``past + seq``) is a sequence length. This is what a memory estimate at "sequence length n" binds,
whatever the exporter named the dims (``s0``, ``sequence_length``, ``unk__3``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from passes.onnx.linear_block import OnnxLinearAttentionMatch
from passes.onnx.onnx_match import AnalysisContext, OnnxAttentionMatch

__all__ = ["sequence_symbols"]

logger = logging.getLogger(__name__)

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _length_dims(ctx: AnalysisContext, match: OnnxAttentionMatch | OnnxLinearAttentionMatch) -> Iterable:
    if isinstance(match, OnnxLinearAttentionMatch):
        # q and k as (batch, heads, length, dim), proven by the detector; in another layout (fast-transformers'
        # (N, L, H, D)) the permutation to it says which axis is the length
        layouts = match.permutations[:2] if match.permutations else ((0, 1, 2, 3),) * 2
        for feature_map, to_bhld in zip((match.query, match.key), layouts):
            dims = ctx.facts.dims(feature_map.source) if feature_map is not None else None
            if dims is not None and len(dims) == 4:
                yield dims[to_bhld[2]]
        return
    for operand in (match.query, match.key_source or match.key):
        if operand is not None and len(operand.order) >= 2:
            yield ctx.dim_of(operand, operand.order[-2])


def sequence_symbols(ctx: AnalysisContext,
                     matches: Iterable[OnnxAttentionMatch | OnnxLinearAttentionMatch]) -> list[str]:
    """Free symbols of the graph inputs (in input order) that occur in the query or key length of a
    match: accepted ones and near-misses whose operands were found. Empty when every length is static."""
    free = set(ctx.facts.free_symbols)
    found: set[str] = set()
    for match in matches:
        for dim in _length_dims(ctx, match):
            if isinstance(dim, str):
                found.update(name for name in _IDENTIFIER.findall(dim) if name in free)
    logger.debug("sequence symbols: %s", sorted(found))
    return [symbol for symbol in ctx.facts.free_symbols if symbol in found]
