"""One sequence's decoding rules, shared by offline generation and the server.

A ``SequenceDecoder`` holds what belongs to one sequence being generated: its sampling
params, its generator (``sample_rng(seed, index)``), its stop strings, its count of new
tokens and its finish reason. The caller owns the model and the KV cache; each step it
runs every decoder's ``feed`` through the model and hands each decoder the logits row
after its newest token. ``step`` then

    chooses the next token     ``select_next`` with the params, the generator, the allowed mask
    ends at end-of-text        finish "stop"; the token is counted but never released
    matches stop strings       ``StopMatcher``: a token is released once it cannot start a
                               stop string; a stop string ends with finish "stop"
    counts new tokens          finish "length" at ``max_new_tokens``
    handles a full context     slide, or finish "length" (below)
    releases text              incremental UTF-8: a character split over tokens comes whole

and sets the next ``feed``. Offline ``generate`` steps one decoder (or one per prompt of a
batch); the server's engine steps one per active KV-cache slot after each batched forward,
so the same request gets the same tokens from both.

The context policy is the ``slide`` argument. The model sees at most ``context``
positions per sequence:

    slide=None  the sequence ends with finish "length" once prompt + new tokens fill the
                context (the server: a completion never outgrows it, as OpenAI counts);
    slide=k     the sequence goes on: when its slot is full and a token must be fed, the
                slot is cleared and re-prefilled with its most recent k tokens (offline
                generate; k = context is nanoGPT's crop to the last block_size tokens).

Shapes: ``V`` vocabulary size.
"""

from __future__ import annotations

import codecs
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

from ..core.checks import is_int
from ..errors import InputError
from .choice import SamplingParams, StopMatcher, sample_rng, select_next, token_logprobs

__all__ = ["SequenceDecoder", "ReleasedToken", "Feed", "FINISH_STOP", "FINISH_LENGTH"]

FINISH_STOP = "stop"  # end-of-text or a stop string
FINISH_LENGTH = "length"  # max_new_tokens, or the context is full (slide=None)


@dataclass(frozen=True)
class ReleasedToken:
    """One generated token released to the caller.

    text: the new text this token completes ('' while it ends inside a multi-byte
        character, and always '' without a tokenizer); that text comes with the next token.
    text_offset: characters of generated text before this token.
    logprob / top: the token's log-probability under the model and the top alternatives
        as ((id, logprob), ...), when the decoder was asked for logprobs.
    """

    token_id: int
    text: str
    text_offset: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] | None = None


class Feed(NamedTuple):
    """What the model must see before the decoder's next step.

    prefill False: ``tokens`` is the one newest token, fed at the slot's next position.
    prefill True: clear the slot, then run ``tokens`` as a prompt (the first feed, and
        every slide).
    """

    tokens: list[int]
    prefill: bool


class SequenceDecoder:
    """Token choice and ending rules for one sequence (see the module docstring).

    prompt_ids: the prompt, 1 to ``context`` tokens (validated by the caller: ids inside
        the vocabulary).
    max_new_tokens: tokens to generate at most (0 finishes at once).
    params: temperature / top-k / top-p / ascii-only / seed.
    context: positions the model sees per sequence (block_size, or a server slot's length).
    slide: None to finish with "length" when the context is full; k to keep the last k
        tokens and go on.
    index / rng: the generator is ``rng`` if given, else ``sample_rng(params.seed, index)``.
    stop: stop string(s); need a tokenizer.
    tokenizer: for end-of-text, stop strings and released text (None: no end-of-text,
        text is '').
    stop_at_eot: end at the tokenizer's end-of-text token.
    allowed: (V,) bool drawable tokens (``sample.allowed_tokens``); required for ascii_only.
    logprobs: None, or k: each released token carries its logprob and the top k.
    """

    def __init__(self, prompt_ids: Sequence[int], max_new_tokens: int, params: SamplingParams, *,
                 context: int, slide: int | None = None, index: int = 0,
                 rng: np.random.Generator | None = None, stop: str | Sequence[str] | None = None,
                 tokenizer=None, stop_at_eot: bool = True, allowed: np.ndarray | None = None,
                 logprobs: int | None = None):
        if not is_int(max_new_tokens) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if not is_int(context) or context < 1:
            raise InputError(f"context must be an integer >= 1, got {context!r}")
        if slide is not None and (not is_int(slide) or not 1 <= slide <= context):
            raise InputError(f"window must lie in [1, {context}] (the context length), "
                             f"got {slide!r}")
        if not 1 <= len(prompt_ids) <= context:
            raise InputError(f"the prompt has {len(prompt_ids)} tokens; it must hold 1 to "
                             f"{context} (the context length)")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if stops and tokenizer is None:
            raise InputError("stop strings need a tokenizer (pass tokenizer=, or attach one "
                             "to the model)")
        if params.ascii_only and allowed is None:
            raise InputError("ascii_only needs the allowed mask: pass "
                             "allowed=allowed_tokens(model, tokenizer, params)")
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.max_new_tokens, self.params = int(max_new_tokens), params
        self.context, self.slide = int(context), slide
        self.rng = rng if rng is not None else sample_rng(params.seed, index)
        self.tokenizer, self.allowed, self.logprobs = tokenizer, allowed, logprobs
        self.eot = tokenizer.eot_id if (stop_at_eot and tokenizer is not None) else None
        self.matcher = StopMatcher(stops, tokenizer) if stops else None
        self.tokens = list(self.prompt_ids)  # prompt + generated tokens (end-of-text excluded)
        self.generated = 0  # tokens chosen, end-of-text included (the completion's usage)
        self.slides = 0
        self.finish_reason: str | None = None if max_new_tokens > 0 else FINISH_LENGTH
        self.feed: Feed | None = Feed(self.prompt_ids, True) if max_new_tokens > 0 else None
        self._cached = 0  # this sequence's positions in its cache slot, feed included
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._chars = 0
        self._unreleased_logprobs: deque = deque()  # (logprob, top) of tokens not yet released

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def step(self, logits: np.ndarray) -> list[ReleasedToken]:
        """Choose the next token from logits (V,), the model's output after this decoder's
        ``feed``; return the tokens now safe to release. Afterwards ``finish_reason`` is set
        when the sequence ended, else ``feed`` says what the model must see next."""
        if self.finished:
            raise InputError(f"the sequence already finished ({self.finish_reason}); "
                             f"it cannot take another step")
        self._cached = (0 if self.feed.prefill else self._cached) + len(self.feed.tokens)
        token = int(select_next(logits, self.params, self.rng, self.allowed))
        self.generated += 1
        if self.eot is not None and token == self.eot:
            return self._finish(FINISH_STOP, self._flush())
        self.tokens.append(token)
        if self.logprobs is not None:
            res = token_logprobs(logits, token, self.logprobs)
            self._unreleased_logprobs.append(
                (res.logprob, tuple(zip(res.top_ids.tolist(), res.top_logprobs.tolist()))))
        released = self._release(self.matcher.push(token) if self.matcher else [token])
        if self.matcher is not None and self.matcher.stopped:
            return self._finish(FINISH_STOP, released)
        context_full = self.slide is None and len(self.tokens) >= self.context
        if self.generated >= self.max_new_tokens or context_full:
            return self._finish(FINISH_LENGTH, released + self._flush())
        if self.slide is not None and self._cached == self.context:
            self.slides += 1
            self.feed = Feed(self.tokens[-self.slide:], True)
        else:
            self.feed = Feed([token], False)
        return released

    def close(self, reason: str | None = None) -> str:
        """End the sequence (with ``reason``, e.g. "cancelled", unless it already finished on
        its own) and return the text still held: the start of a character that never
        completed. Call it once, when the sequence ends."""
        if self.finish_reason is None:
            self.finish_reason = reason
        self.feed = None
        return self._utf8.decode(b"", final=True)

    # ---------------------------------------------------------------- internals
    def _flush(self) -> list[ReleasedToken]:
        """The generation ended without a stop string: every held token is safe."""
        return self._release(self.matcher.flush()) if self.matcher else []

    def _finish(self, reason: str, released: list[ReleasedToken]) -> list[ReleasedToken]:
        self.finish_reason, self.feed = reason, None
        return released

    def _release(self, tokens: list[int]) -> list[ReleasedToken]:
        out = []
        for token in tokens:
            lp, top = (self._unreleased_logprobs.popleft() if self.logprobs is not None
                       else (None, None))
            raw = self.tokenizer.token_bytes(token) if self.tokenizer is not None else b""
            text = self._utf8.decode(raw)
            out.append(ReleasedToken(token, text, self._chars, lp, top))
            self._chars += len(text)
        return out
