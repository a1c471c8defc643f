"""Prompt-prefix reuse for the engine (``serve/engine.py``): what a cache holds, kept for
the next prompt that starts the same way.

``PrefixPool`` keeps copies of recent prefixes' keys and values, bounded in bytes and
entries, least recently used dropped first; ``Scores`` keeps, per cache position, what a
prompt-logprobs answer reports for the next token, so a scoring request can reuse a prefix
too. Pure bookkeeping over NumPy arrays: the engine decides when to keep and copy.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ..infer.sample import token_logprobs

__all__ = ["common_prefix", "Scores", "PrefixPool"]


def common_prefix(a, b) -> int:
    """How many leading tokens the sequences ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


@dataclass
class Scores:
    """What prompt logprobs report for the token after each cache position t < n: the token
    (at t + 1), its log-probability and the ``top`` most likely tokens with theirs
    (``token_logprobs`` of the logits at t, in float64). Kept beside the keys and values of a
    slot (and of a pool entry), so a prompt that asks for its logprobs can reuse a prefix:
    entry t holds whenever tokens 0..t + 1 are the same."""

    token: np.ndarray  # (P,) int64
    logprob: np.ndarray  # (P,) float64
    top_ids: np.ndarray  # (P, top) int64
    top_lps: np.ndarray  # (P, top) float64
    n: int = 0  # entries 0..n-1 are filled

    @classmethod
    def empty(cls, positions: int, top: int) -> "Scores":
        return cls(np.zeros(positions, np.int64), np.zeros(positions),
                   np.zeros((positions, top), np.int64), np.zeros((positions, top)))

    @property
    def nbytes(self) -> int:
        return self.token.nbytes + self.logprob.nbytes + self.top_ids.nbytes + self.top_lps.nbytes

    def head(self, n: int) -> "Scores":
        """A copy of entries 0..n-1 (n <= self.n)."""
        return Scores(self.token[:n].copy(), self.logprob[:n].copy(), self.top_ids[:n].copy(),
                      self.top_lps[:n].copy(), n)

    def put(self, other: "Scores", n: int) -> None:
        """Take other's entries 0..n-1 (n <= other.n)."""
        for mine, theirs in zip((self.token, self.logprob, self.top_ids, self.top_lps),
                                (other.token, other.logprob, other.top_ids, other.top_lps)):
            mine[:n] = theirs[:n]
        self.n = n

    def extend(self, at: int, logits: np.ndarray, tokens) -> None:
        """Entries at..at + m - 1 from logits (m, V) and the m tokens after them (of the same
        sequence as the entries held); kept only where the filled run reaches ``at``."""
        if at > self.n or not len(tokens):
            return
        m = len(tokens)
        res = token_logprobs(logits, np.asarray(tokens), self.top_ids.shape[1])
        self.token[at:at + m], self.logprob[at:at + m] = tokens, res.logprob
        self.top_ids[at:at + m], self.top_lps[at:at + m] = res.top_ids, res.top_logprobs
        self.n = max(self.n, at + m)


class PrefixPool:
    """Recent prompt prefixes: tokens -> copies of their keys and values (L, nh, n, hs) and
    their ``Scores`` (as far as known), at most ``capacity`` bytes and ``max_entries``
    entries (each admission compares its prompt with every entry), the least recently used
    dropped first."""

    def __init__(self, capacity_bytes: int, max_entries: int = 256):
        self.capacity, self.max_entries = int(capacity_bytes), int(max_entries)
        self._entries: OrderedDict[tuple[int, ...], tuple] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def longest(self, prompt) -> tuple[int, tuple[int, ...] | None]:
        """(n, key): the entry sharing the longest prefix with ``prompt``, n tokens of it."""
        best, key = 0, None
        for tokens in self._entries:
            n = common_prefix(tokens, prompt)
            if n > best:
                best, key = n, tokens
        return best, key

    def get(self, key: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, Scores | None]:
        """(k, v, scores) of an entry, now the most recently used."""
        self._entries.move_to_end(key)
        return self._entries[key]

    def peek(self, key: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, Scores | None]:
        return self._entries[key]

    def covers(self, tokens) -> bool:
        """True when an entry already starts with all of ``tokens``."""
        return any(common_prefix(t, tokens) == len(tokens) for t in self._entries)

    def add(self, tokens, k: np.ndarray, v: np.ndarray, scores: Scores | None = None) -> None:
        """Keep copies of k, v (L, nh, n, hs) for ``tokens`` (and their scores, copied by the
        caller); entries it extends are dropped."""
        size = k.nbytes + v.nbytes + (scores.nbytes if scores is not None else 0)
        if size > self.capacity or not len(tokens) or self.covers(tokens):
            return
        key = tuple(int(t) for t in tokens)
        for old in [t for t in self._entries if common_prefix(t, key) == len(t)]:
            self._drop(old)
        while self._entries and (self.bytes + size > self.capacity
                                 or len(self._entries) >= self.max_entries):
            self._drop(next(iter(self._entries)))
        self._entries[key] = (k.copy(), v.copy(), scores)
        self.bytes += size

    def _drop(self, key) -> None:
        k, v, scores = self._entries.pop(key)
        self.bytes -= k.nbytes + v.nbytes + (scores.nbytes if scores is not None else 0)
