"""Causal proofs on evaluated masks and biases: is this exactly ``key ≤ query + o``, and for which o?

Both front ends evaluate a mask or bias that depends on no input (a sliced ``tril`` buffer, a
``Trilu`` of a filled matrix, a ``Range`` comparison) and ask these functions, with the array's
axes already in (…, query, key) order. Leading axes must hold the same matrix (broadcast).
"""

from __future__ import annotations

import numpy as np

__all__ = ["causal_offset_of_bias", "causal_offset_of_keep"]


def _tril(query_len: int, key_len: int, offset: int) -> np.ndarray:
    return np.tril(np.ones((query_len, key_len), dtype=bool), offset)


def _single_matrix(array: np.ndarray, query_len: int, key_len: int) -> np.ndarray | None:
    """The (query, key) matrix of `array`, when every leading slice is that same matrix."""
    if array.ndim < 2 or array.shape[-2:] != (query_len, key_len):
        return None
    flat = array.reshape(-1, query_len, key_len)
    return flat[0] if all(np.array_equal(flat[0], other) for other in flat[1:]) else None


def causal_offset_of_keep(keep: np.ndarray, query_len: int, key_len: int) -> int | None:
    """`o` when `keep` (identical over leading axes) is exactly `key ≤ query + o`, else None."""
    if keep.dtype != np.bool_:
        return None
    matrix = _single_matrix(keep, query_len, key_len)
    if matrix is None:
        return None
    offset = int(matrix[-1].sum()) - query_len
    return offset if np.array_equal(matrix, _tril(query_len, key_len, offset)) else None


def causal_offset_of_bias(bias: np.ndarray, query_len: int, key_len: int) -> tuple[int, float] | None:
    """(offset, fill) when `bias` is 0 on and below a causal diagonal and one negative fill above."""
    if not np.issubdtype(bias.dtype, np.floating):
        return None
    matrix = _single_matrix(bias, query_len, key_len)
    if matrix is None:
        return None
    offset = causal_offset_of_keep(matrix == 0, query_len, key_len)
    if offset is None:
        return None
    hidden = matrix[~_tril(query_len, key_len, offset)]
    if hidden.size == 0 or np.isnan(hidden[0]) or not (hidden[0] < 0 and (hidden == hidden[0]).all()):
        return None
    return offset, float(hidden[0])
