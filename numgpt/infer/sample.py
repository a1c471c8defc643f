"""Sampling: KV-cached generation, with the token-choice rules of ``choice`` re-exported.

Each generated sequence is one ``decoder.SequenceDecoder`` (token choice with these rules,
end-of-text, stop strings, max tokens, released text); the server's engine drives the same
decoder, so offline and served tokens agree.

The rules (logits filters, ``select_next``, ``sample_rng``, ``StopMatcher``) are documented
in ``choice``.

Generation (``generate``, ``stream``, ``generate_batch``) prefills a KV cache with the
prompt and then feeds one token per step. When a sequence fills the model's context
(``block_size`` positions) it *slides* (the decoder's ``slide`` policy; the server ends
the sequence instead): the cache slot is cleared and re-prefilled with the
most recent ``window`` tokens (default ``block_size // 2``), and one ``ContextSlideWarning``
is issued per call (Python ``warnings``). ``window=block_size`` reproduces nanoGPT's
"crop to the last block_size tokens at every step" exactly, at the cost of a full
prefill per token once the context is full; half the context amortises that cost.

Randomness: sample ``i`` of a call draws from ``sample_rng(seed, i)``, so ``generate``,
``stream``, row ``i`` of ``generate_batch`` and sample ``i`` of ``numgpt generate`` give the
same tokens for the same seed, whatever else is in the batch.

Shapes: ``V`` vocabulary size, ``A`` rows (active sequences).
"""

from __future__ import annotations

import warnings
from typing import Iterator, Sequence

import numpy as np

from ..core.checks import check_token_ids
from ..errors import InputError
from .choice import (ContextSlideWarning, SamplingParams, StopMatcher, TokenLogprobs,  # noqa: F401
                     apply_temperature, ascii_mask, filter_logits, sample_rng, select_next,
                     token_logprobs, top_k_filter, top_k_ids, top_p_filter)
from .decoder import SequenceDecoder

__all__ = [
    "SamplingParams",
    "ContextSlideWarning",
    "TokenLogprobs",
    "top_k_ids",
    "apply_temperature",
    "top_k_filter",
    "top_p_filter",
    "ascii_mask",
    "filter_logits",
    "select_next",
    "token_logprobs",
    "sample_rng",
    "check_prompt",
    "allowed_tokens",
    "StopMatcher",
    "generate",
    "stream",
    "generate_batch",
]


# -------------------------------------------------------------------------- prompts


def _start_hint(model) -> str:
    """What an empty prompt can start from instead: the tokenizer's end-of-text token when it
    has one (GPT-2's '<|endoftext|>', 50256), else a newline (a byte model has no special
    tokens: its newline is byte 10)."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return "any id below the model's vocab_size"
    if tok.eot_id is not None:
        return f"a text can start from '<|endoftext|>', id {tok.eot_id}"
    newline = tok.encode("\n")
    return (f"this model's tokenizer has no '<|endoftext|>': start from a newline, "
            f"id{'s' if len(newline) > 1 else ''} {', '.join(map(str, newline))}, or any text")


def check_prompt(model, prompt_ids) -> list[int]:
    """The prompt as a list of ints, or InputError if empty, too long for the context, or
    holding ids the model cannot take."""
    ids = np.asarray(prompt_ids)
    if ids.size == 0:
        raise InputError(f"the prompt is empty; give at least one token ({_start_hint(model)})")
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"prompt ids must be a flat sequence of integers, got shape "
                         f"{ids.shape} and dtype {ids.dtype}")
    T = model.config.block_size
    ids = check_token_ids(ids, model.config.vocab_size, what="prompt",
                          hint="was the prompt encoded with another tokenizer?")
    if len(ids) > T:
        raise InputError(f"the prompt has {len(ids)} tokens but the model's context is "
                         f"block_size={T}; shorten it (e.g. keep its last {T} tokens)")
    return ids.tolist()


def allowed_tokens(model, tokenizer, params: SamplingParams) -> np.ndarray | None:
    """(V,) bool of drawable tokens: ASCII-only if asked, and never an id the tokenizer
    cannot decode (a model vocabulary padded past the tokenizer's, e.g. 50304)."""
    V = model.config.vocab_size
    if params.ascii_only and tokenizer is None:
        raise InputError("ascii_only needs a tokenizer (the model has none attached; pass tokenizer=)")
    if tokenizer is None or (tokenizer.vocab_size >= V and not params.ascii_only):
        return None
    allowed = np.zeros(V, dtype=bool)
    n = min(V, tokenizer.vocab_size)
    allowed[:n] = ascii_mask(tokenizer)[:n] if params.ascii_only else True
    return allowed


# ------------------------------------------------------------------------ generation


def _window_size(model, window: int | None) -> int:
    """Tokens kept when a sequence slides past block_size (default half the context)."""
    return max(1, model.config.block_size // 2) if window is None else window


def _decoders(model, prompts, max_new_tokens, params, stop, stop_at_eot, tokenizer, window,
              rng=None) -> list:
    """One ``SequenceDecoder`` per prompt, sliding its window past block_size. Decoder i
    draws from ``sample_rng(params.seed, i)`` unless ``rng`` (one prompt) is given."""
    if not isinstance(params, SamplingParams):
        raise InputError(f"params must be a SamplingParams, got {type(params).__name__}")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    prompts = [check_prompt(model, p) for p in prompts]
    allowed = allowed_tokens(model, tokenizer, params)
    keep = _window_size(model, window)
    return [SequenceDecoder(p, max_new_tokens, params, context=model.config.block_size, slide=keep,
                            index=i, rng=rng, stop=stop, tokenizer=tokenizer,
                            stop_at_eot=stop_at_eot, allowed=allowed)
            for i, p in enumerate(prompts)]


def _decode_events(model, decoders: list) -> Iterator[tuple[int, int]]:
    """The offline loop: yields (row, token) as each decoder releases tokens.

    Each iteration runs every running decoder's feed through the model (prefills, i.e.
    prompts and slides, one slot at a time; newest tokens as one batched step over the
    rows), then hands each decoder its logits row. A row leaves once its decoder finishes.
    """
    running = [i for i, d in enumerate(decoders) if not d.finished]
    if not running:
        return
    T = model.config.block_size
    # a cache shorter than block_size is never full: no sequence outgrows prompt + new tokens
    cache = model.new_cache(len(decoders), min(T, max(len(d.prompt_ids) + d.max_new_tokens
                                                      for d in decoders)))
    logits: dict[int, np.ndarray] = {}  # row -> (V,) logits after the row's feed
    warned = False
    while running:
        prefill = [i for i in running if decoders[i].feed.prefill]
        step = [i for i in running if not decoders[i].feed.prefill]
        if not warned and any(decoders[i].slides for i in prefill):
            keep = decoders[prefill[0]].slide
            warnings.warn(f"the context passed block_size={T} tokens; from now on each sequence "
                          f"keeps only its most recent {keep} tokens (window={keep})",
                          ContextSlideWarning, stacklevel=3)
            warned = True
        for i in prefill:  # a prompt, or a slide: the most recent tokens into a cleared slot
            cache.reset([i])
            feed = np.asarray([decoders[i].feed.tokens])  # (1, Tn)
            logits[i] = model.forward_cached(feed, cache, rows=[i])[0]
        if step:
            last = np.asarray([decoders[i].feed.tokens for i in step])  # (A, 1)
            logits.update(zip(step, model.forward_cached(last, cache, rows=np.asarray(step))))
        for i in running:
            yield from ((i, t.token_id) for t in decoders[i].step(logits[i]))
        running = [i for i in running if not decoders[i].finished]


def stream(model, prompt_ids, max_new_tokens: int, params: SamplingParams = SamplingParams(), *,
           stop: str | Sequence[str] | None = None, stop_at_eot: bool = True, tokenizer=None,
           window: int | None = None, rng: np.random.Generator | None = None) -> Iterator[int]:
    """Yield each new token id as it is produced (see ``generate`` for the arguments).

    With stop strings, a token is yielded once it can no longer be part of a stop string,
    so it may come a step or two late; the stop string itself is never yielded.
    """
    decoders = _decoders(model, [prompt_ids], max_new_tokens, params, stop, stop_at_eot,
                         tokenizer, window, rng)
    for _, token in _decode_events(model, decoders):
        yield token


def generate(model, prompt_ids, max_new_tokens: int, params: SamplingParams = SamplingParams(), *,
             stop: str | Sequence[str] | None = None, stop_at_eot: bool = True, tokenizer=None,
             window: int | None = None, rng: np.random.Generator | None = None) -> list[int]:
    """Generate up to ``max_new_tokens`` token ids after ``prompt_ids`` (prompt not included).

    params: temperature / top-k / top-p / ascii-only / seed (``SamplingParams``).
    stop: string(s) that end generation when they appear in the generated text; the stop
        string (and any token overlapping it) is not returned.
    stop_at_eot: end at the tokenizer's end-of-text token (not returned).
    tokenizer: defaults to ``model.tokenizer``; needed for stop strings, end-of-text and
        ascii-only.
    window: tokens kept when the context passes block_size (default block_size // 2); a
        ``ContextSlideWarning`` is issued once per call when that happens.
    rng: overrides the generator made from ``params.seed``.
    Raises InputError for an empty prompt, a prompt longer than block_size, or ids outside
    the vocabulary.
    """
    return list(stream(model, prompt_ids, max_new_tokens, params, stop=stop, stop_at_eot=stop_at_eot,
                       tokenizer=tokenizer, window=window, rng=rng))


def generate_batch(model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   params: SamplingParams = SamplingParams(), *,
                   stop: str | Sequence[str] | None = None, stop_at_eot: bool = True,
                   tokenizer=None, window: int | None = None) -> list[list[int]]:
    """``generate`` for several prompts (of any lengths) at once: one KV cache with a slot
    per prompt, each slot prefilled alone, then batched one-token decode steps over the
    rows still running. Row i draws from ``sample_rng(params.seed, i)``, so it gets the
    same tokens as ``generate`` would give for that prompt and generator."""
    if len(prompts) == 0:
        raise InputError("generate_batch needs at least one prompt")
    decoders = _decoders(model, prompts, max_new_tokens, params, stop, stop_at_eot, tokenizer,
                         window)
    out: list[list[int]] = [[] for _ in prompts]
    for row, token in _decode_events(model, decoders):
        out[row].append(token)
    return out
