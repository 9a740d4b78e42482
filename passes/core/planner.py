"""Chunk sizes for each rewritten attention block, from its shapes and a memory budget."""

from __future__ import annotations

import logging
import re

from passes.core.attention_spec import AttentionSpec, ChunkSizes

__all__ = ["AUTO", "CHUNKED", "DEFAULT_BLOCK_BUDGET", "ONNX_ATTENTION", "ORT", "TARGETS", "default_slice_size", "parse_size", "plan_chunk_sizes"]

logger = logging.getLogger(__name__)

# What a user may ask an ONNX block to become (`--target`); here, not in onnx_api, so that the CLI
# builds its parser without importing onnx_ir (and sympy): `rewriter --help` starts fast.
AUTO, CHUNKED, ORT, ONNX_ATTENTION = TARGETS = ("auto", "chunked", "ort", "onnx-attention")
DEFAULT_BLOCK_BUDGET = 32 * 2**20
DEFAULT_QUERY_CHUNK, DEFAULT_KEY_CHUNK = 1024, 4096  # Rabe & Staats' defaults
DEFAULT_SLICE = 256  # keys per slice of a linear-attention (Performer) block
# fp32 blocks alive at once in the backward's step (scores/probabilities, tanh, dP) plus slack.
_LIVE_BLOCKS = 4
_MIN_QUERY_CHUNK, _MIN_KEY_CHUNK = 16, 128
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30}


def parse_size(text: str | int) -> int:
    """Bytes from an int or a string like '512MiB', '2g', '1048576'."""
    if isinstance(text, int):
        return text
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not found or found.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 256MiB, 2GiB)")
    return int(float(found.group(1)) * _UNITS[found.group(2).lower()])


def plan_chunk_sizes(
    spec: AttentionSpec, memory_budget: int | str | None = None, chunk_size: tuple[int, int] | None = None
) -> ChunkSizes:
    """Largest blocks (up to 1024 queries × 4096 keys) whose working set fits the budget.

    The budget bounds the fp32 blocks alive at once, summed over batch and heads. Key chunks shrink
    first (longer query chunks amortise K/V reads), never below 128 keys × 16 queries.
    """
    if chunk_size is not None:
        return ChunkSizes(*chunk_size)
    budget = DEFAULT_BLOCK_BUDGET if memory_budget is None else parse_size(memory_budget)
    rows = (spec.batch_size or 1) * (spec.num_heads or 1)
    query = min(spec.seq_len_q or DEFAULT_QUERY_CHUNK, DEFAULT_QUERY_CHUNK)
    key = min(spec.seq_len_k or DEFAULT_KEY_CHUNK, DEFAULT_KEY_CHUNK)
    while rows * query * key * 4 * _LIVE_BLOCKS > budget:
        if key > max(query, _MIN_KEY_CHUNK):
            key //= 2
        elif query > _MIN_QUERY_CHUNK:
            query //= 2
        else:
            logger.warning("memory budget %d bytes is below the smallest block (%d queries × %d keys over %d "
                           "batch·heads rows, %d bytes); using that block", budget, query, key, rows,
                           rows * query * key * 4 * _LIVE_BLOCKS)
            break
    return ChunkSizes(max(query, 1), max(key, 1))


def default_slice_size(spec: AttentionSpec) -> int:
    """Slices of 256 keys: the state (M × Dv) dominates per slice, and 256 rows keep matmuls efficient."""
    return DEFAULT_SLICE
