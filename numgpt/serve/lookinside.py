"""POST /v1/inspect: the playground's logit-lens and patching views, bounded.

The numbers come from ``numgpt.inspect`` (``logit_lens``, ``patch``), the same functions
``numgpt inspect`` runs and tests/test_inspect.py checks against TransformerLens; this module
only validates a request and shapes the answer. Requests (JSON):

* ``{"view": "logit-lens", "prompt": str | [ids], "target": str | id (optional), "top_k": 1-10}``
  at most ``MAX_LENS_TOKENS`` tokens; answer: ``layers`` (L + 1 labels), ``top_tokens`` and
  ``top_probs`` (L + 1, T, k), ``target_probs`` (L + 1, T) or null;
* ``{"view": "patch", "prompt": clean, "corrupted": str | [ids], "answer": ..., "wrong": ...}``
  of equal length, at most ``MAX_PATCH_TOKENS`` tokens (a patching run costs 2 L forward
  passes of batch T and nh); answer: ``resid`` (L, T) and ``heads`` (L, nh) normalised logit
  differences, ``clean_diff``, ``corrupted_diff``.

A target, answer or wrong token is a token id or a text that encodes to exactly one token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.checks import is_int
from ..errors import InputError
from ..inspect import logit_lens, patch
from . import internals
from .protocol import APIError, _bad, _check_object_and_model, _parse_prompt, _typed, token_str

__all__ = ["VIEWS", "MAX_LENS_TOKENS", "MAX_PATCH_TOKENS", "InspectSpec", "parse_inspect", "run"]

VIEWS = ("logit-lens", "patch")
MAX_LENS_TOKENS = internals.MAX_TOKENS
MAX_PATCH_TOKENS = 32
MAX_TOP_K = 10


@dataclass
class InspectSpec:
    view: str
    ids: list[int]
    corrupted: list[int] | None = None
    target: int | None = None
    answer: int | None = None
    wrong: int | None = None
    top_k: int = 5


def _one_prompt(body: dict, name: str, tokenizer, vocab_size: int, max_tokens: int,
                max_chars: int | None) -> list[int]:
    prompts, _ = _parse_prompt(body.get(name), tokenizer, vocab_size, max_chars)
    if len(prompts) != 1:
        raise _bad(name, f"{name!r} must be one prompt (a string or a list of token ids), got "
                         f"{len(prompts)}", code="invalid_prompt")
    if len(prompts[0]) > max_tokens:
        raise _bad(name, f"{name!r} has {len(prompts[0])} tokens; this view takes at most "
                         f"{max_tokens}, so shorten it", code="prompt_too_long")
    return prompts[0]


def _token(body: dict, name: str, tokenizer, vocab_size: int, required: bool) -> int | None:
    """A token id, or a text that encodes to exactly one token."""
    value = body.get(name)
    if value is None:
        if required:
            raise _bad(name, f"{name!r} is required: a token id or a one-token text")
        return None
    if is_int(value) and 0 <= value < vocab_size:
        return int(value)
    if isinstance(value, str) and value:
        ids = tokenizer.encode(value)
        if len(ids) == 1:
            return ids[0]
        raise _bad(name, f"{name!r} encodes to {len(ids)} tokens; give a text that is one token "
                         f"(mind the leading space) or a token id")
    raise _bad(name, f"{name!r} must be a token id in [0, {vocab_size}) or a one-token text")


def parse_inspect(body: Any, *, tokenizer, vocab_size: int, block_size: int,
                  max_chars: int | None = None) -> InspectSpec:
    """Validate a /v1/inspect request (see the module docstring); 400 naming what is wrong."""
    _check_object_and_model(body)
    view = body.get("view")
    if view not in VIEWS:
        raise _bad("view", f"'view' must be one of {list(VIEWS)}, got {str(view)[:40]!r}")
    if view == "logit-lens":
        ids = _one_prompt(body, "prompt", tokenizer, vocab_size, min(MAX_LENS_TOKENS, block_size), max_chars)
        top_k = _typed(body, "top_k", is_int, "an integer", 5)
        if not 1 <= top_k <= MAX_TOP_K:
            raise _bad("top_k", f"'top_k' must lie in [1, {MAX_TOP_K}], got {top_k}")
        return InspectSpec(view, ids, target=_token(body, "target", tokenizer, vocab_size, False),
                           top_k=top_k)
    limit = min(MAX_PATCH_TOKENS, block_size)
    ids = _one_prompt(body, "prompt", tokenizer, vocab_size, limit, max_chars)
    corrupted = _one_prompt(body, "corrupted", tokenizer, vocab_size, limit, max_chars)
    if len(corrupted) != len(ids):
        raise _bad("corrupted", f"the prompt has {len(ids)} tokens and 'corrupted' {len(corrupted)}; "
                                f"patching lines positions up, so give prompts of equal length")
    return InspectSpec(view, ids, corrupted, answer=_token(body, "answer", tokenizer, vocab_size, True),
                       wrong=_token(body, "wrong", tokenizer, vocab_size, True))


def _finite(*arrays) -> None:
    if not all(np.isfinite(a).all() for a in arrays):
        raise APIError(500, "the model's activations are not finite (NaN or infinity) for this "
                            "prompt; this checkpoint's weights need fixing",
                       type="server_error", code="non_finite_internals")


def run(model, spec: InspectSpec, model_name: str) -> dict:
    """Compute the view and return the JSON answer."""
    tok = model.tokenizer
    words = lambda ids: [token_str(tok, int(t)) for t in ids]  # noqa: E731
    out = {"object": "inspect", "view": spec.view, "model": model_name,
           "tokens": words(spec.ids), "token_ids": list(spec.ids)}
    try:
        if spec.view == "logit-lens":
            lens = logit_lens(model, spec.ids, spec.target, spec.top_k)
            _finite(lens.top_probs)
            return {**out, "layers": lens.layers, "top_k": spec.top_k,
                    "top_tokens": [[words(pos) for pos in layer] for layer in lens.top_ids],
                    "top_probs": lens.top_probs.tolist(),
                    "target": None if spec.target is None else token_str(tok, spec.target),
                    "target_probs": None if lens.target_probs is None else lens.target_probs.tolist()}
        result = patch(model, spec.ids, spec.corrupted, spec.answer, spec.wrong)
    except InputError as exc:  # e.g. both prompts give the same logit difference
        raise _bad("prompt", str(exc)) from exc
    _finite(result.resid, result.heads)
    return {**out, "corrupted_tokens": words(spec.corrupted), "answer": token_str(tok, spec.answer),
            "wrong": token_str(tok, spec.wrong), "clean_diff": result.clean_diff,
            "corrupted_diff": result.corrupted_diff, "resid": result.resid.tolist(),
            "heads": result.heads.tolist()}
