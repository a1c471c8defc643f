"""Token choice: pure logits filters, one next-token rule, per-sample RNGs and stop strings.

The rules every decoded sequence follows (``decoder.SequenceDecoder`` applies them one token
at a time; ``sample`` drives decoders offline and re-exports these names). They live apart
from the drivers so that ``decoder`` builds on them and ``sample`` builds on ``decoder``,
with no module importing the other back.

Filters are pure functions on logits arrays ``(..., V)``; each returns a new array in which
removed tokens are ``-inf`` (the input is never modified). They are applied in the order
Hugging Face ``transformers`` applies its logits warpers, and match them exactly:

    allowed mask (ASCII-only, padded vocab)  ->  temperature  ->  top-k  ->  top-p

``select_next`` turns (filtered) logits into token ids: ``argmax`` when the temperature is
0 (greedy; top-k/top-p cannot change the argmax), otherwise one draw per row from the
softmax of the filtered logits with an explicit ``numpy.random.Generator``.

Shapes: ``V`` vocabulary size, ``A`` rows (active sequences).
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from ..core.checks import is_int, log_softmax64
from ..core.kernels import argsort_stable
from ..errors import InputError

__all__ = ["SamplingParams", "ContextSlideWarning", "TokenLogprobs", "top_k_ids", "apply_temperature", "top_k_filter", "top_p_filter", "ascii_mask", "filter_logits", "select_next", "token_logprobs", "sample_rng", "StopMatcher"]


# ------------------------------------------------------------------------ parameters


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen.

    temperature: 0 is greedy (argmax); > 0 divides the logits before the softmax.
    top_k: keep the k highest logits (ties with the k-th are kept too), None for all.
    top_p: nucleus sampling, keep the smallest most-probable set whose probability reaches
        p (at least one token), None (or 1.0) for all.
    ascii_only: only tokens whose bytes are printable ASCII or newline may be drawn.
    seed: integer seed of the draws; None for fresh entropy.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    ascii_only: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise InputError(f"temperature must be a finite number >= 0 (0 means greedy), got {t!r}")
        k = self.top_k
        if k is not None and (not is_int(k) or k < 1):
            raise InputError(f"top_k must be an integer >= 1 (or None for no limit), got {k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float))
                              or not 0.0 < p <= 1.0):
            raise InputError(f"top_p must lie in (0, 1] (or None for no limit), got {p!r}")
        if not isinstance(self.ascii_only, bool):
            raise InputError(f"ascii_only must be True or False, got {self.ascii_only!r}")
        s = self.seed
        if s is not None and (not is_int(s) or s < 0):
            raise InputError(f"seed must be an integer >= 0 (or None), got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class ContextSlideWarning(UserWarning):
    """Generation ran past the model's context and now sees only the most recent tokens."""


# --------------------------------------------------------------------------- filters


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``logits / temperature`` (a new array, same dtype). temperature must be > 0:
    greedy (temperature 0) is an argmax, not a division, and is handled by ``select_next``."""
    if not temperature > 0:
        raise InputError(f"apply_temperature needs temperature > 0, got {temperature!r} "
                         f"(temperature 0 is greedy: take the argmax instead)")
    logits = np.asarray(logits)
    return logits / logits.dtype.type(temperature)


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the logits >= the k-th largest of each row; the rest become -inf.

    As ``transformers.TopKLogitsWarper``: tokens tied with the k-th value are all kept, so
    more than k may survive; k >= V keeps everything. logits (..., V) -> (..., V).
    """
    logits = np.asarray(logits)
    V = logits.shape[-1]
    if k < 1:
        raise InputError(f"top_k must be >= 1, got {k}")
    if k >= V:
        return logits.copy()
    kth = -np.partition(-logits, k - 1, axis=-1)[..., k - 1:k]  # (..., 1) the k-th largest
    return np.where(logits < kth, -np.inf, logits).astype(logits.dtype, copy=False)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filter: keep the smallest set of most probable tokens whose probability
    reaches ``p``; always at least one token. logits (..., V) -> (..., V).

    Exactly ``transformers.TopPLogitsWarper`` (min_tokens_to_keep=1): sort ascending with a
    stable sort (tied logits: the lower id comes first), take the cumulative softmax, and
    remove every token whose cumulative probability is <= 1 - p, except the last (largest).
    Among tied logits at the boundary the higher ids are kept. (transformers uses torch's
    default, unstable sort, so which of several tied boundary tokens it keeps is
    arbitrary; how many it keeps, and their values, are the same as here.)
    """
    if not 0.0 < p <= 1.0:
        raise InputError(f"top_p must lie in (0, 1], got {p}")
    logits = np.asarray(logits)
    order = argsort_stable(logits)  # (..., V) ascending, = np.argsort(kind="stable"), faster
    ascending = np.take_along_axis(logits, order, axis=-1)
    shifted = ascending - ascending[..., -1:]  # the max is last
    e = np.exp(shifted)
    cumulative = np.cumsum(e / e.sum(axis=-1, keepdims=True), axis=-1)  # (..., V)
    remove_sorted = cumulative <= logits.dtype.type(1 - p)
    remove_sorted[..., -1] = False  # keep at least the most probable token
    remove = np.empty_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)  # back to vocabulary order
    return np.where(remove, -np.inf, logits).astype(logits.dtype, copy=False)


_ASCII_BYTES = np.zeros(256, dtype=bool)
_ASCII_BYTES[0x20:0x7F] = True  # printable ASCII, space to tilde
_ASCII_BYTES[ord("\n")] = True
_ascii_cache: "weakref.WeakKeyDictionary[object, np.ndarray]" = weakref.WeakKeyDictionary()
_ascii_lock = threading.Lock()


def ascii_mask(tokenizer) -> np.ndarray:
    """bool (tokenizer.vocab_size,): True for tokens whose bytes are all printable ASCII
    (0x20-0x7E) or newline, plus the end-of-text token (so generation can still end).

    Computed once per tokenizer object and cached (read-only array)."""
    with _ascii_lock:
        cached = _ascii_cache.get(tokenizer)
    if cached is not None:
        return cached
    mask = np.zeros(tokenizer.vocab_size, dtype=bool)
    for token_id in range(tokenizer.vocab_size):
        raw = np.frombuffer(tokenizer.token_bytes(token_id), dtype=np.uint8)
        mask[token_id] = raw.size > 0 and bool(_ASCII_BYTES[raw].all())
    if tokenizer.eot_id is not None:
        mask[tokenizer.eot_id] = True
    mask.setflags(write=False)
    with _ascii_lock:
        _ascii_cache[tokenizer] = mask
    return mask


def _check_allowed(allowed: np.ndarray | None, V: int) -> np.ndarray | None:
    if allowed is None:
        return None
    allowed = np.asarray(allowed, dtype=bool)
    if allowed.shape != (V,):
        raise InputError(f"allowed mask has shape {allowed.shape}, logits have V={V} tokens; "
                         f"the mask must be ({V},)")
    if not allowed.any():
        raise InputError("the allowed-token mask excludes every token; nothing can be drawn")
    return allowed


def filter_logits(logits: np.ndarray, params: SamplingParams,
                  allowed: np.ndarray | None = None) -> np.ndarray:
    """Everything ``select_next`` applies before its draw, in transformers' order:
    disallowed tokens -> -inf, then temperature (if > 0), top-k, top-p. (..., V) -> (..., V)."""
    logits = np.asarray(logits)
    allowed = _check_allowed(allowed, logits.shape[-1])
    if allowed is not None:
        logits = np.where(allowed, logits, -np.inf).astype(logits.dtype, copy=False)
    if params.temperature > 0:
        logits = apply_temperature(logits, params.temperature)
    if params.top_k is not None:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p is not None and params.top_p < 1.0:
        logits = top_p_filter(logits, params.top_p)
    return logits


# ---------------------------------------------------------------------- next token


def _draw(probs: np.ndarray, rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """One inverse-CDF draw per row: probs (A, V) -> ids (A,). Row a uses rngs[a]
    (or all rows share rngs[0]). A token with probability 0 is never drawn."""
    cdf = np.cumsum(probs, axis=-1)  # (A, V)
    if len(rngs) == 1:
        u = rngs[0].random(len(probs))
    else:
        u = np.array([r.random() for r in rngs])
    # first index whose cdf exceeds u * total; u < 1 so one always exists
    return np.argmax(cdf > (u * cdf[:, -1])[:, None], axis=-1)


def select_next(logits: np.ndarray, params: SamplingParams,
                rng: np.random.Generator | Sequence[np.random.Generator] | None = None,
                allowed: np.ndarray | None = None):
    """The next token of each row: logits (V,) -> int, or (A, V) -> ids (A,) int64.

    Greedy (temperature 0): the argmax of the allowed logits (lowest id on ties).
    Otherwise a draw from ``softmax(filter_logits(logits, params, allowed))`` using ``rng``
    (one Generator shared by the rows, or a sequence of A, one per row).
    ``allowed`` (V,) bool restricts the tokens (ASCII-only: ``ascii_mask(tokenizer)``).
    """
    logits = np.asarray(logits)
    single = logits.ndim == 1
    rows = logits[None] if single else logits  # (A, V)
    if rows.ndim != 2:
        raise InputError(f"logits must be (V,) or (A, V), got shape {logits.shape}")
    if params.ascii_only and allowed is None:
        raise InputError("ascii_only needs the allowed mask: pass allowed=ascii_mask(tokenizer)")
    if params.greedy:
        allowed = _check_allowed(allowed, rows.shape[-1])
        masked = rows if allowed is None else np.where(allowed, rows, -np.inf)
        ids = np.argmax(masked, axis=-1)
    else:
        if rng is None:
            raise InputError("sampling (temperature > 0) needs a numpy.random.Generator; "
                             "pass rng=sample_rng(seed)")
        rngs = [rng] if isinstance(rng, np.random.Generator) else list(rng)
        if len(rngs) not in (1, len(rows)):
            raise InputError(f"got {len(rngs)} generators for {len(rows)} rows; give 1 or {len(rows)}")
        ids = _draw(np.exp(log_softmax64(filter_logits(rows, params, allowed))), rngs)
    return int(ids[0]) if single else ids.astype(np.int64)


class TokenLogprobs(NamedTuple):
    """Log-probabilities for the server's ``logprobs``: of the chosen token, and the top k
    alternatives in descending order (lowest id first on ties)."""

    logprob: float | np.ndarray  # () or (A,)
    top_ids: np.ndarray  # (k,) or (A, k) int64
    top_logprobs: np.ndarray  # (k,) or (A, k) float64


def token_logprobs(logits: np.ndarray, chosen, k: int = 0) -> TokenLogprobs:
    """``log_softmax`` of logits (V,) or (A, V) in float64; the chosen token's entry and the
    k most likely tokens. Pass raw model logits for the model's own distribution, or
    ``filter_logits(...)`` output for the distribution actually sampled from."""
    z = np.asarray(logits, dtype=np.float64)
    single = z.ndim == 1
    z = z[None] if single else z  # (A, V)
    if not 0 <= k <= z.shape[-1]:
        raise InputError(f"k must lie in [0, {z.shape[-1]}], got {k}")
    logp = log_softmax64(z)  # (A, V)
    chosen = np.atleast_1d(np.asarray(chosen, dtype=np.int64))  # (A,)
    picked = logp[np.arange(len(logp)), chosen]  # (A,)
    top = top_k_ids(logp, k)  # (A, k)
    top_lp = np.take_along_axis(logp, top, axis=-1)
    if single:
        return TokenLogprobs(float(picked[0]), top[0], top_lp[0])
    return TokenLogprobs(picked, top, top_lp)


def top_k_ids(values: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest entries of each row of values (A, V), largest first, ties in
    ascending id order: exactly ``np.argsort(-values, kind="stable")[:, :k]``, without
    sorting all V entries (scoring asks for k <= 5 of 50,257 at every position).

    Each row's k-th largest value is found by lowering a threshold from the row's maximum
    to the next smaller value until at least k entries reach it (at most k - 1 passes of
    ``max``, far cheaper than ``np.partition`` for small k); only the entries at or above it
    (k of them, more on a tie at the boundary) are sorted, stably, so the tied ones keep
    their ascending ids and the first k are argsort's first k."""
    A, V = values.shape
    if k == 0:
        return np.zeros((A, 0), dtype=np.int64)
    if 4 * k >= V:  # nothing to gain: sort it all
        return np.argsort(-values, axis=-1, kind="stable")[:, :k]
    kth = values.max(axis=-1)  # (A,) NaN where the row holds a NaN
    for _ in range(k - 1):
        short = (values >= kth[:, None]).sum(axis=-1) < k  # (A,) rows with < k candidates
        if not short.any():
            break
        rows = values[short]  # (A', V)
        kth[short] = np.where(rows < kth[short, None], rows, -np.inf).max(axis=-1)
    top = np.empty((A, k), dtype=np.int64)
    for a in range(A):
        ids = np.flatnonzero(values[a] >= kth[a])  # ascending ids, >= k of them
        if len(ids) < k:  # NaN in the row: no order to exploit, argsort's NaN-last rule
            top[a] = np.argsort(-values[a], kind="stable")[:k]
            continue
        order = np.argsort(-values[a, ids], kind="stable")[:k]
        top[a] = ids[order]
    return top


def sample_rng(seed: int | None, index: int = 0) -> np.random.Generator:
    """The generator of sample ``index`` for ``seed``: independent streams per sample
    (``SeedSequence(seed, spawn_key=(index,))``); fresh entropy when seed is None."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


# ---------------------------------------------------------------------- stop strings


class StopMatcher:
    """Cuts one sequence's generated tokens at the first stop string, holding tokens back
    while they could be the start of one.

    Matching is on the UTF-8 bytes of the generated tokens (exact for UTF-8 stop strings,
    and immune to multi-byte characters split over tokens). A token that contains any part
    of a stop string is never released, so ``tokenizer.decode(released)`` never contains
    a stop string; a token holding text before *and* the start of a stop string is dropped
    whole (token granularity).
    """

    def __init__(self, stops: Sequence[str], tokenizer):
        self.stops = [s.encode("utf-8") for s in stops]
        if any(not s for s in self.stops):
            raise InputError("stop strings must not be empty")
        self.tokenizer = tokenizer
        self.text = b""
        self.ends: list[int] = []  # byte offset where each pending token ends
        self.pending: list[int] = []
        self.released_bytes = 0
        self.stopped = False

    def push(self, token: int) -> list[int]:
        """Add one generated token; return the tokens that are now safe to emit (none once
        a stop string has been seen)."""
        if self.stopped:
            return []
        if not self.stops:
            return [token]
        start = max(0, len(self.text) - max(map(len, self.stops)) + 1)
        self.text += self.tokenizer.token_bytes(token)
        self.pending.append(token)
        self.ends.append(len(self.text))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._release_until(min(hits))
        return self._release_until(self._hold_from())

    def flush(self) -> list[int]:
        """End of generation without a stop: everything pending is safe."""
        if self.stopped:
            return []
        return self._release_until(len(self.text))

    def _hold_from(self) -> int:
        """Byte offset of the earliest tail of the text that is a proper prefix of a stop."""
        n = len(self.text)
        for i in range(max(self.released_bytes, n - max(map(len, self.stops)) + 1), n):
            tail = self.text[i:]
            if any(s.startswith(tail) for s in self.stops):
                return i
        return n

    def _release_until(self, offset: int) -> list[int]:
        """Release the pending tokens that end at or before byte ``offset``."""
        count = 0
        while count < len(self.pending) and self.ends[count] <= offset:
            count += 1
        if count:
            self.released_bytes = self.ends[count - 1]
        out, self.pending, self.ends = self.pending[:count], self.pending[count:], self.ends[count:]
        return out
