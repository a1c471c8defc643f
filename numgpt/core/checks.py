"""The small rules every boundary shares, each written once.

``is_int``          an integer that is not a bool (``True`` is an ``int`` in Python)
``check_token_ids`` ids are integers inside the vocabulary and fit the context
``log_softmax64``   log-probabilities of logits in float64, for scoring and sampling
"""
from __future__ import annotations

import numbers

import numpy as np

from ..errors import InputError

__all__ = ["is_int", "check_token_ids", "log_softmax64"]


def is_int(x) -> bool:
    """True for Python and NumPy integers; False for bools, floats and everything else."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_token_ids(ids, vocab_size: int, block_size: int | None = None, *,
                    what: str = "token ids", hint: str = "") -> np.ndarray:
    """``ids`` as an int64 array of any shape, after checking that every id lies in
    ``[0, vocab_size)`` and, when ``block_size`` is given, that the last axis holds at most
    ``block_size`` positions. InputError names the first offending id, its position and the
    limit, then ``hint`` (how to fix it)."""
    arr = np.asarray(ids)
    if arr.size == 0:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{what} must be integers, got an array of {arr.dtype}")
    outside = (arr < 0) | (arr >= vocab_size)
    if outside.any():
        where = np.unravel_index(int(np.argmax(outside)), arr.shape)
        pos = where[0] if len(where) == 1 else tuple(int(i) for i in where)
        raise InputError(f"{what}: token id {int(arr[where])} at position {pos} is outside the "
                         f"vocabulary [0, {vocab_size}){'; ' + hint if hint else ''}")
    if block_size is not None and arr.ndim and arr.shape[-1] > block_size:
        raise InputError(f"{what} hold {arr.shape[-1]} positions, more than the context length "
                         f"block_size={block_size}")
    return arr.astype(np.int64, copy=False)


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, computed in float64: (..., V) -> (..., V).

    z - max(z) - log(sum(exp(z - max(z)))): the shift makes exp overflow-free and the sum at
    least 1, so the log is finite; float64 keeps log-probabilities of rare tokens exact enough
    to sum thousands of them (perplexity) without float32 drift."""
    z = np.asarray(logits, dtype=np.float64)
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
