"""OpenAI's legacy completions and its chat completions, in pure Python (no HTTP library,
no socket).

Two directions, each written once:

- in:  ``parse_completion`` turns a decoded JSON body into a ``CompletionSpec`` or raises
  ``APIError`` naming the first bad field (``parse_json_body`` decodes the raw bytes);
- out: ``CompletionFold`` folds the engine's events (``PromptEvent``, ``TokenEvent``,
  ``FinishEvent``) for one request into OpenAI's shapes: the stream's server-sent events as
  they happen, and the whole response body as the fold's final state.

Every error is OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``
(``error_body``). Every string anywhere in a body must be valid Unicode text (a lone
surrogate such as ``"\\ud800"`` is refused with 400 naming the field). Extensions beyond OpenAI's fields: ``top_k`` (int, 0 or -1 for no limit),
``truncate`` (bool: keep the end of a prompt that is too long for the context), ``ascii_only``
(bool). Unknown fields are ignored, as OpenAI does. ``model`` is optional and may name any
model: a server of one model answers every request with it, as llama-server does, and names
it in the answer.

Every body and server-sent event out is strict JSON (no ``NaN`` or ``Infinity``). A
log-probability below ``LOGPROB_FLOOR`` (-9999), minus infinity included (a probability
that underflowed to 0), is sent as -9999.0: vLLM's clamp, so clients that sum or compare
logprobs (lm-evaluation-harness) get finite numbers, where ``null`` would break their sums.
NaN never gets this far: the engine fails a sequence whose logits are not finite.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..core.checks import check_token_ids, is_int
from ..errors import InputError, NumGPTError
from ..infer.sample import SamplingParams
from ..io import chat
from .engine import MAX_LOGPROBS, FinishEvent, PromptEvent, TokenEvent

__all__ = ["MAX_STOP", "LOGPROB_FLOOR", "PROMPT_CHARS_PER_CONTEXT", "PROMPT_TOKENS_PER_CONTEXT", "APIError",
           "error_body", "CompletionSpec", "parse_json_body", "parse_completion",
           "parse_tokenize", "parse_detokenize", "tokenizer_info", "tokenize_json",
           "detokenize_json", "token_str", "Logprobs", "choice_json", "sse", "SSE_DONE",
           "Choice", "CompletionFold", "InternalsSpec", "parse_internals", "internals_json",
           "parse_chat_completion", "ChatFold"]

MAX_STOP = 4  # OpenAI allows up to 4 stop sequences
LOGPROB_FLOOR = -9999.0  # vLLM's clamp: lower log-probabilities (and -inf) are sent as this
SSE_DONE = "data: [DONE]\n\n"  # the stream's last event
# Default prompt caps, per prompt, as multiples of the context: a prompt longer than the
# context is only useful with "truncate", and tokenizing megabytes for it wastes a core.
PROMPT_CHARS_PER_CONTEXT = 32
PROMPT_TOKENS_PER_CONTEXT = 8


class APIError(NumGPTError):
    """An error answered to the client in OpenAI's shape, with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _generation_failed(ev: FinishEvent | None = None) -> APIError:
    """The answer to a failed sequence: the engine's own message when it is meant for the
    client (``ev.code`` set, e.g. non-finite logits), else a generic one (details in the log)."""
    if ev is not None and ev.code:
        return APIError(500, ev.message, type="server_error", code=ev.code)
    return APIError(500, "generation failed; see the server log", type="server_error",
                    code="generation_failed")


# ------------------------------------------------------------------------ validation


@dataclass
class CompletionSpec:
    """A validated completion request. prompts: token ids per prompt; prompt_texts: the
    text each prompt stands for (what ``echo`` prepends)."""

    prompts: list[list[int]]
    prompt_texts: list[str]
    max_tokens: int
    params: SamplingParams
    n: int = 1
    stop: tuple[str, ...] = ()
    stream: bool = False
    echo: bool = False
    logprobs: int | None = None
    include_usage: bool = False


def parse_json_body(raw: bytes) -> Any:
    """The request body's JSON value; 400 for bad UTF-8, malformed or too deeply nested JSON."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})",
                       code="invalid_encoding") from None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}",
                       code="invalid_json") from None
    _check_text(value)
    return value


def _check_text(value: Any) -> None:
    """400 naming the first string (key or value) that is not valid Unicode text: JSON's
    ``\\uD800`` escapes decode to lone surrogates, which no UTF-8 encoder accepts."""
    stack: list[tuple[Any, str]] = [(value, "")]  # (value, its path), iterative: nesting is deep
    while stack:
        v, path = stack.pop()
        if isinstance(v, dict):
            for k, item in v.items():
                here = f"{path}.{k}" if path else str(k)
                _encodable(k, here + " (a key)", path.split(".")[0].split("[")[0] or k)
                stack.append((item, here))
        elif isinstance(v, list):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(v))
        elif isinstance(v, str):
            _encodable(v, path or "the body", path.split(".")[0].split("[")[0] or None)


def _encodable(text: str, where: str, param: str | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = ord(text[e.start])
        where, param = _escaped(where), _escaped(param) if param is not None else None
        raise APIError(400, f"{where!r} holds a lone surrogate (U+{bad:04X} at character "
                            f"{e.start}), which is not valid Unicode text; send valid UTF-8",
                       param=param, code="invalid_encoding") from None


def _escaped(text: str) -> str:
    """``text`` with lone surrogates spelled ``\\udXXX``: the answer must be encodable too."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_number(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _is_bool(x: Any) -> bool:
    return isinstance(x, bool)


def _bad(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code or "invalid_value")


def _typed(body: dict, name: str, check: Callable[[Any], bool], what: str, default: Any) -> Any:
    """body[name] if present and of the right type; the default when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise APIError(400, f"{name!r} must be {what}, got {json.dumps(value)[:80]} "
                            f"({type(value).__name__})", param=name, code="invalid_type")
    return value


def _check_prompt_ids(i: int, ids: list[int], vocab_size: int) -> None:
    """The vocabulary check every boundary shares; the API names the first id outside it."""
    try:
        check_token_ids(ids, vocab_size, what=f"prompt {i}")
    except InputError:  # also ids past int64, which NumPy holds as objects
        bad = next(t for t in ids if not 0 <= t < vocab_size)
        raise APIError(400, f"prompt {i} holds token id {bad}, outside the model's "
                            f"vocabulary [0, {vocab_size})", param="prompt",
                       code="invalid_token_id") from None


def _parse_prompt(raw: Any, tokenizer, vocab_size: int, max_chars: int | None = None,
                  max_tokens: int | None = None) -> tuple[list[list[int]], list[str]]:
    """A string, a list of strings, a list of token ids, or a list of such lists ->
    (ids per prompt, text per prompt). A prompt past ``max_chars`` characters (checked
    before tokenizing) or ``max_tokens`` tokens is refused with 400 naming the limit."""
    shape = ("'prompt' must be a non-empty string, a list of non-empty strings, a list of "
             "token ids, or a list of lists of token ids")
    if raw is None:
        raise APIError(400, "'prompt' is required: " + shape, param="prompt", code="missing_prompt")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and all(is_int(t) for t in raw)):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise APIError(400, shape, param="prompt", code="invalid_prompt")
    ids, texts = [], []
    for i, p in enumerate(raw):
        if isinstance(p, str):
            if not p:
                raise APIError(400, f"prompt {i} is empty; give at least one character",
                               param="prompt", code="empty_prompt")
            _check_prompt_size(i, len(p), max_chars, "characters")
            ids.append(tokenizer.encode(p, allow_special=True))  # as `numgpt generate` does
            texts.append(p)
        elif isinstance(p, list) and p and all(is_int(t) for t in p):
            _check_prompt_ids(i, p, vocab_size)
            ids.append(list(p))
            texts.append(tokenizer.decode([t for t in p if t < tokenizer.vocab_size]))
        else:
            raise APIError(400, f"prompt {i}: {shape}", param="prompt", code="invalid_prompt")
        _check_prompt_size(i, len(ids[-1]), max_tokens, "tokens")
    return ids, texts


def _check_prompt_size(i: int, size: int, limit: int | None, unit: str) -> None:
    if limit is not None and size > limit:
        flag = "--max-prompt-chars" if unit == "characters" else "--max-prompt-tokens"
        raise APIError(400, f"prompt {i} has {size} {unit}; this server takes at most {limit} "
                            f"per prompt (numgpt serve {flag}); shorten it",
                       param="prompt", code="prompt_too_long")


def _parse_stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(400, "'stop' must be a string or a list of strings", param="stop",
                       code="invalid_type")
    if len(stops) > MAX_STOP:
        raise _bad("stop", f"'stop' has {len(stops)} strings; at most {MAX_STOP} are allowed")
    if any(not s for s in stops):
        raise _bad("stop", "stop strings must not be empty")
    return tuple(stops)


def _fit_context(ids: list[int], max_tokens: int, context: int, truncate: bool) -> list[int]:
    """The prompt if it leaves room to generate (a score-only request, max_tokens 0, may fill
    the whole context), its last tokens with ``truncate``, else 400."""
    if truncate and len(ids) + max_tokens > context:
        return ids[-max(1, context - max(max_tokens, 1)):] if max_tokens else ids[-context:]
    room = context if max_tokens == 0 else context - 1
    if len(ids) > room:
        raise APIError(400, f"the prompt has {len(ids)} tokens but the model's context is "
                            f"{context} tokens, leaving no room to generate; shorten the prompt, "
                            f"send \"truncate\": true to keep its last tokens, or tell the client "
                            f"the context (lm-evaluation-harness: --model_args "
                            f"max_length={context}; GET /v1/models reports it as max_model_len)",
                       param="prompt", code="context_length_exceeded")
    return ids


def _parse_sampling(body: dict) -> SamplingParams:
    """temperature, top_p, top_k (extension), seed and ascii_only (extension)."""
    temperature = _typed(body, "temperature", _is_number, "a number", 1.0)
    if temperature < 0:
        raise _bad("temperature", f"'temperature' must be >= 0 (0 is greedy), got {temperature}")
    top_p = _typed(body, "top_p", _is_number, "a number", 1.0)
    if not 0 < top_p <= 1:
        raise _bad("top_p", f"'top_p' must lie in (0, 1], got {top_p}")
    top_k = _typed(body, "top_k", is_int, "an integer", 0)
    if top_k < -1:
        raise _bad("top_k", f"'top_k' must be >= 1, or 0 / -1 for no limit, got {top_k}")
    seed = _typed(body, "seed", is_int, "an integer", None)
    if seed is not None and not 0 <= seed < 2 ** 64:
        raise _bad("seed", f"'seed' must lie in [0, 2**64), got {seed}")
    ascii_only = _typed(body, "ascii_only", _is_bool, "true or false", False)
    return SamplingParams(temperature=float(temperature), top_k=top_k if top_k > 0 else None,
                          top_p=float(top_p) if top_p < 1 else None, ascii_only=ascii_only,
                          seed=seed)


def _parse_include_usage(body: dict) -> bool:
    """``stream_options.include_usage``: a final chunk with the usage (streams only)."""
    options = _typed(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    include_usage = options.get("include_usage", False)
    if include_usage is not None and not _is_bool(include_usage):
        raise APIError(400, f"'stream_options.include_usage' must be true or false, got "
                            f"{json.dumps(include_usage)[:80]} ({type(include_usage).__name__})",
                       param="stream_options.include_usage", code="invalid_type")
    return bool(include_usage)


def _check_object_and_model(body: Any) -> None:
    """A request body is a JSON object; its ``model``, if given, is a string. Any name is
    accepted: this server has one model and answers with it whatever a client calls it
    (llama-server does the same; clients such as the README's send ``"gpt2"``)."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}",
                       code="invalid_body")
    _typed(body, "model", lambda v: isinstance(v, str), "a string", None)


def parse_completion(body: Any, *, tokenizer, vocab_size: int, context: int,
                     max_tokens_limit: int, max_n: int, max_sequences: int,
                     max_prompt_chars: int | None = None,
                     max_prompt_tokens: int | None = None) -> CompletionSpec:
    """Validate an OpenAI completion request body; APIError names the first bad field.
    Prompt caps default to ``PROMPT_CHARS_PER_CONTEXT`` / ``PROMPT_TOKENS_PER_CONTEXT``
    times the context. ``max_tokens: 0`` is accepted with ``echo`` (score the prompt only)."""
    _check_object_and_model(body)
    if body.get("suffix") is not None:
        raise _bad("suffix", "'suffix' (insertion) is not supported by this server")
    ids, texts = _parse_prompt(body.get("prompt"), tokenizer, vocab_size,
                               max_prompt_chars or PROMPT_CHARS_PER_CONTEXT * context,
                               max_prompt_tokens or PROMPT_TOKENS_PER_CONTEXT * context)
    max_tokens = _typed(body, "max_tokens", is_int, "an integer", 16)
    echo = _typed(body, "echo", _is_bool, "true or false", False)
    least = 0 if echo else 1  # echo with max_tokens 0 scores the prompt and generates nothing
    if not least <= max_tokens <= max_tokens_limit:
        raise _bad("max_tokens", f"'max_tokens' must lie in [{least}, {max_tokens_limit}], got "
                                 f"{max_tokens}" + ("" if echo or max_tokens != 0 else
                                                    " (0 is allowed with \"echo\": true)"))
    n = _typed(body, "n", is_int, "an integer", 1)
    if not 1 <= n <= max_n:
        raise _bad("n", f"'n' must lie in [1, {max_n}], got {n}")
    if n * len(ids) > max_sequences:
        raise _bad("n", f"{len(ids)} prompts x n={n} asks for {n * len(ids)} sequences; this "
                        f"server queues at most {max_sequences}")
    logprobs = _typed(body, "logprobs", is_int, "an integer", None)
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise _bad("logprobs", f"'logprobs' must lie in [0, {MAX_LOGPROBS}], got {logprobs}")
    flags = {k: _typed(body, k, _is_bool, "true or false", False)
             for k in ("stream", "echo", "truncate")}
    include_usage = _parse_include_usage(body)
    fitted = [_fit_context(p, max_tokens, context, flags["truncate"]) for p in ids]
    texts = [t if len(f) == len(p) else tokenizer.decode(f)  # echo what the model saw
             for t, f, p in zip(texts, fitted, ids)]
    return CompletionSpec(fitted, texts, max_tokens, _parse_sampling(body), n, _parse_stop(body),
                          flags["stream"], flags["echo"], logprobs, include_usage)


# ------------------------------------------------------------------------- responses


def token_str(tokenizer, token_id: int) -> str:
    """A token as OpenAI shows it: its text, or ``bytes:\\xNN`` when not whole UTF-8."""
    if not 0 <= token_id < tokenizer.vocab_size:  # a model vocabulary padded past the tokenizer's
        return f"<|token {token_id}|>"
    raw = tokenizer.token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


@dataclass
class Logprobs:
    """OpenAI's legacy logprobs object, built a token at a time."""

    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, tokenizer, token_id: int, logprob: float | None, top, offset: int) -> None:
        self.tokens.append(token_str(tokenizer, token_id))
        logprob = _floored(logprob)
        self.token_logprobs.append(logprob)
        if top is None:
            self.top_logprobs.append(None)
        else:  # OpenAI always includes the sampled token among the alternatives
            alts = {token_str(tokenizer, t): _floored(lp) for t, lp in top}
            alts.setdefault(self.tokens[-1], logprob)
            self.top_logprobs.append(alts)
        self.text_offset.append(offset)

    def extend(self, other: "Logprobs") -> None:
        for mine, theirs in zip(self._lists(), other._lists()):
            mine.extend(theirs)

    def _lists(self) -> tuple[list, list, list, list]:
        return self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}


def _floored(logprob: float | None) -> float | None:
    """A log-probability as sent: at least ``LOGPROB_FLOOR`` (so -inf is -9999.0)."""
    assert logprob is None or not math.isnan(logprob), "NaN logprob: the engine checks logits"
    return None if logprob is None else max(float(logprob), LOGPROB_FLOOR)


def _prompt_logprobs(tokenizer, ids: list[int], ev: PromptEvent | None) -> Logprobs:
    """Logprobs entries for the echoed prompt (offsets count characters from 0)."""
    out, offset = Logprobs(), 0
    for t, token in enumerate(ids):
        lp, top = (ev.logprobs[t], ev.top[t]) if ev is not None else (None, None)
        out.add(tokenizer, token, lp, top, offset)
        offset += len(tokenizer.decode([token])) if token < tokenizer.vocab_size else 0
    return out


def choice_json(text: str, index: int, logprobs: Logprobs | None,
                finish_reason: str | None) -> dict:
    """One entry of a response's (or a stream chunk's) ``choices``."""
    return {"text": text, "index": index,
            "logprobs": logprobs.to_json() if logprobs is not None else None,
            "finish_reason": finish_reason}


def sse(body: dict) -> str:
    """One server-sent event carrying a JSON body: strict JSON, like every plain answer
    (``NaN`` or ``Infinity`` raise ValueError here instead of reaching a client's parser)."""
    return f"data: {json.dumps(body, allow_nan=False)}\n\n"


@dataclass
class Choice:
    """What has arrived for one choice: sample ``sample`` (of n) of prompt ``prompt``."""

    index: int
    prompt: int
    sample: int
    opened: bool = False  # echo text (and the prompt's logprobs) placed
    text: list[str] = field(default_factory=list)
    logprobs: Logprobs | None = None
    finish: FinishEvent | None = None


class CompletionFold:
    """One completion request folded from its engine events, choice by choice.

    ``start()`` and each ``apply(choice_index, event)`` return the server-sent events that step
    produces (none unless ``spec.stream``); once ``done``, ``response()`` is the whole response
    body. One fold serves both answers, so a streamed and a plain request cannot disagree.
    Choices are prompt-major: prompt p's samples j=0..n-1 are choices p*n .. p*n+n-1.

    A choice *opens* (its echo text, and with logprobs its prompt's entries, are placed) the
    first time any of these happens: at ``start`` when no logprobs were asked for (nothing to
    wait for), when its prompt's ``PromptEvent`` arrives (the engine sends it before that
    sequence's tokens), or at its own first event."""

    def __init__(self, spec: CompletionSpec, model_name: str, tokenizer, *, id: str,
                 created: int):
        self.spec, self.model_name, self.tokenizer = spec, model_name, tokenizer
        self.id, self.created = id, created
        self.choices = [Choice(p * spec.n + j, p, j)
                        for p in range(len(spec.prompts)) for j in range(spec.n)]
        self.prompt_events: dict[int, PromptEvent] = {}
        self.remaining = len(self.choices)
        self.failed = False  # a sequence ended in "error" or "cancelled"
        self.failure: FinishEvent | None = None  # the first such FinishEvent

    @property
    def done(self) -> bool:
        return self.remaining == 0 or self.failed

    def start(self) -> list[str]:
        if self.spec.logprobs is not None:
            return []
        return [s for c in self.choices for s in self._open(c)]

    def apply(self, index: int, ev: PromptEvent | TokenEvent | FinishEvent) -> list[str]:
        c = self.choices[index]
        if isinstance(ev, PromptEvent):
            self.prompt_events[c.prompt] = ev
            return [s for d in self.choices if d.prompt == c.prompt for s in self._open(d)]
        out = self._open(c)
        if isinstance(ev, TokenEvent):
            return out + self._token(c, ev)
        return out + self._finish(c, ev)

    def response(self) -> dict:
        """The whole non-streamed body; APIError 500 if a sequence failed."""
        assert self.done, "response() before every choice finished"
        if self.failed:
            raise _generation_failed(self.failure)
        choices = [choice_json("".join(c.text), c.index, c.logprobs, c.finish.reason)
                   for c in self.choices]
        return self._body(choices, self.usage())

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.spec.prompts)
        done = sum(c.finish.completion_tokens for c in self.choices if c.finish is not None)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    # --------------------------------------------------------------- one step each

    def _open(self, c: Choice) -> list[str]:
        if c.opened:
            return []
        c.opened = True
        echo = self.spec.prompt_texts[c.prompt] if self.spec.echo else ""
        c.text.append(echo)
        if self.spec.logprobs is not None:
            ev = self.prompt_events.get(c.prompt)
            c.logprobs = (_prompt_logprobs(self.tokenizer, self.spec.prompts[c.prompt], ev)
                          if self.spec.echo else Logprobs())
        if not self.spec.echo:
            return []
        return self._chunk([choice_json(echo, c.index, c.logprobs, None)])

    def _token(self, c: Choice, ev: TokenEvent) -> list[str]:
        c.text.append(ev.text)
        entry = None
        if c.logprobs is not None:
            entry = Logprobs()
            entry.add(self.tokenizer, ev.token_id, ev.logprob, ev.top,
                      self._offset_base(c) + ev.text_offset)
            c.logprobs.extend(entry)
        return self._chunk([choice_json(ev.text, c.index, entry, None)])

    def _finish(self, c: Choice, ev: FinishEvent) -> list[str]:
        c.finish, self.remaining = ev, self.remaining - 1
        if ev.reason in ("error", "cancelled"):
            self.failed, self.failure = True, self.failure or ev
            return [sse(_generation_failed(ev).body())] if self.spec.stream else []
        c.text.append(ev.text)
        out = self._last_chunks(c, ev)
        if self.remaining == 0 and self.spec.stream:
            if self.spec.include_usage:
                out += self._chunk([], usage=self.usage())
            out.append(SSE_DONE)
        return out

    def _last_chunks(self, c: Choice, ev: FinishEvent) -> list[str]:
        """A finished choice's last chunk: its released tail text and the finish reason."""
        return self._chunk([choice_json(ev.text, c.index, None, ev.reason)])

    def _offset_base(self, c: Choice) -> int:
        """Generated text's offsets count from the start of the echoed prompt, if echoed."""
        return len(self.spec.prompt_texts[c.prompt]) if self.spec.echo else 0

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> list[str]:
        if not self.spec.stream:
            return []
        return [sse(self._body(choices, usage))]

    def _body(self, choices: list[dict], usage: dict | None) -> dict:
        body = {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model_name, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body


# ------------------------------------------------- POST /v1/chat/completions (OpenAI chat)
#
# A chat request is a completion request whose one prompt is its messages rendered with the
# model's chat template and the generation prompt (numgpt.io.chat): the same engine, decoder
# and sampling, so a greedy chat reply is the tokens `numgpt generate` gives for that text.
# Only the shapes differ: ``message``/``delta`` instead of ``text``, and logprobs as
# ``{"content": [{token, logprob, bytes, top_logprobs}]}``.

# OpenAI's newer name for the system role; its content parts ([{"type": "text", "text"}])
CHAT_ROLE_ALIASES = {"developer": "system"}


def _chat_messages(raw: Any) -> list[dict]:
    """OpenAI's messages as the template's ``{"role", "content"}`` list: text content parts
    joined, ``developer`` read as ``system``; 400 naming the first bad message."""
    if raw is None:
        raise APIError(400, "'messages' is required: a non-empty list of {\"role\", \"content\"} "
                            "objects", param="messages", code="missing_messages")
    if isinstance(raw, list):
        raw = [_plain_message(i, m) for i, m in enumerate(raw)]
    try:
        return chat.check_messages(raw, "messages")
    except InputError as e:
        raise APIError(400, str(e), param="messages", code="invalid_messages") from None


def _plain_message(i: int, m: Any) -> Any:
    if not isinstance(m, dict):
        return m
    role = m.get("role")
    m = {**m, "role": CHAT_ROLE_ALIASES.get(role, role) if isinstance(role, str) else role}
    content = m.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise APIError(400, f"messages[{i}].content: this server reads text only; each "
                                f"content part must be {{\"type\": \"text\", \"text\": str}}",
                           param="messages", code="invalid_messages")
        m["content"] = "".join(p["text"] for p in content)
    return m


def parse_chat_completion(body: Any, *, tokenizer, template: str | None, vocab_size: int,
                          context: int, max_tokens_limit: int, max_n: int, max_sequences: int,
                          max_prompt_chars: int | None = None,
                          max_prompt_tokens: int | None = None) -> CompletionSpec:
    """Validate an OpenAI chat request body into the ``CompletionSpec`` of its rendered
    prompt; APIError names the first bad field. ``max_completion_tokens`` (or the older
    ``max_tokens``) defaults to what the context leaves; ``logprobs`` is a bool and
    ``top_logprobs`` the count of alternatives. A tokenizer without an end-of-text token
    stops at the template's separator (``chat.stop_text``) besides the request's stops."""
    _check_object_and_model(body)
    messages = _chat_messages(body.get("messages"))
    chars = sum(len(m["content"]) for m in messages)
    _check_prompt_size(0, chars, max_prompt_chars or PROMPT_CHARS_PER_CONTEXT * context,
                       "characters")
    try:
        text = chat.render(template, messages, tokenizer, add_generation_prompt=True, check=False)
    except InputError as e:
        raise APIError(400, str(e), param="messages", code="invalid_messages") from None
    ids = tokenizer.encode(text, allow_special=True)  # as `numgpt generate --prompt TEXT`
    _check_prompt_size(0, len(ids), max_prompt_tokens or PROMPT_TOKENS_PER_CONTEXT * context,
                       "tokens")
    if len(ids) >= context:
        raise APIError(400, f"the messages render to {len(ids)} tokens but the model's context "
                            f"is {context} tokens, leaving no room to reply; send fewer or "
                            f"shorter messages", param="messages", code="context_length_exceeded")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    room = min(max_tokens_limit, context - len(ids))
    max_tokens = _typed(body, name, is_int, "an integer", room)
    if not 1 <= max_tokens <= max_tokens_limit:
        raise _bad(name, f"{name!r} must lie in [1, {max_tokens_limit}], got {max_tokens}")
    n = _typed(body, "n", is_int, "an integer", 1)
    if not 1 <= n <= max_n:
        raise _bad("n", f"'n' must lie in [1, {max_n}], got {n}")
    if n > max_sequences:
        raise _bad("n", f"n={n} asks for {n} sequences; this server queues at most {max_sequences}")
    want = _typed(body, "logprobs", _is_bool, "true or false", False)
    top = _typed(body, "top_logprobs", is_int, "an integer", None)
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise _bad("top_logprobs", f"'top_logprobs' must lie in [0, {MAX_LOGPROBS}], got {top}")
    if top is not None and not want:
        raise _bad("top_logprobs", "'top_logprobs' needs \"logprobs\": true")
    stops = _parse_stop(body)
    extra = chat.stop_text(tokenizer)
    if extra is not None and extra not in stops:
        stops += (extra,)
    stream = _typed(body, "stream", _is_bool, "true or false", False)
    return CompletionSpec([ids], [text], max_tokens, _parse_sampling(body), n, stops, stream,
                          False, (top or 0) if want else None, _parse_include_usage(body))


def _chat_logprob(tokenizer, token_id: int, logprob: float | None, top) -> dict:
    """One entry of ``choices[].logprobs.content``: the token, its log-probability, its
    UTF-8 bytes (a token may be part of a character) and its top alternatives, each the same
    shape without ``top_logprobs`` (OpenAI's schema)."""
    def one(t: int, lp: float | None) -> dict:
        raw = tokenizer.token_bytes(t) if 0 <= t < tokenizer.vocab_size else b""
        return {"token": token_str(tokenizer, t), "logprob": _floored(lp), "bytes": list(raw)}

    entry = one(token_id, logprob)
    entry["top_logprobs"] = [one(t, lp) for t, lp in (top or ())]
    return entry


class ChatFold(CompletionFold):
    """A chat request folded from its engine events: ``CompletionFold``'s bookkeeping with
    the chat shapes. A stream sends, per choice, a first chunk with
    ``delta {"role": "assistant", "content": ""}``, then one ``delta {"content"}`` per
    released token, then ``delta {}`` with the finish reason; with ``include_usage`` a last
    chunk with no choices and the usage; then ``[DONE]``."""

    def start(self) -> list[str]:
        out = []
        for c in self.choices:
            c.opened = True  # nothing to echo, no prompt logprobs to wait for
            c.logprobs = [] if self.spec.logprobs is not None else None
            out += self._chunk([self._delta(c, {"role": "assistant", "content": ""})])
        return out

    def response(self) -> dict:
        assert self.done, "response() before every choice finished"
        if self.failed:
            raise _generation_failed(self.failure)
        choices = [{"index": c.index,
                    "message": {"role": "assistant", "content": "".join(c.text)},
                    "logprobs": None if c.logprobs is None else {"content": c.logprobs},
                    "finish_reason": c.finish.reason} for c in self.choices]
        return self._body(choices, self.usage(), "chat.completion")

    def _token(self, c: Choice, ev: TokenEvent) -> list[str]:
        c.text.append(ev.text)
        entry = None
        if c.logprobs is not None:
            entry = [_chat_logprob(self.tokenizer, ev.token_id, ev.logprob, ev.top)]
            c.logprobs.extend(entry)
        return self._chunk([self._delta(c, {"content": ev.text}, entry)])

    def _last_chunks(self, c: Choice, ev: FinishEvent) -> list[str]:
        """The released tail as a content delta (if any), then an empty delta with the reason."""
        out = self._chunk([self._delta(c, {"content": ev.text})]) if ev.text else []
        return out + self._chunk([self._delta(c, {}, finish=ev.reason)])

    def _delta(self, c: Choice, delta: dict, entry: list | None = None,
               finish: str | None = None) -> dict:
        return {"index": c.index, "delta": delta,
                "logprobs": None if entry is None else {"content": entry},
                "finish_reason": finish}

    def _chunk(self, choices: list[dict], usage: dict | None = None) -> list[str]:
        if not self.spec.stream:
            return []
        return [sse(self._body(choices, usage, "chat.completion.chunk"))]

    def _body(self, choices: list[dict], usage: dict | None,
              object: str = "chat.completion.chunk") -> dict:
        body = {"id": self.id, "object": object, "created": self.created,
                "model": self.model_name, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body


# ------------------------------------------- remote tokenizer (vLLM's shapes, llama.cpp's too)


def tokenizer_info(tokenizer, context: int) -> dict:
    """GET /tokenizer_info, as vLLM answers it: the special tokens as text (None where the
    tokenizer has none; GPT-2's one special token is its end-of-text, also its bos and unk,
    and it has no pad token) and the context length."""
    eot = tokenizer.decode([tokenizer.eot_id]) if tokenizer.eot_id is not None else None
    return {"tokenizer_class": type(tokenizer).__name__, "eos_token": eot, "bos_token": eot,
            "unk_token": eot, "pad_token": None, "eos_token_id": tokenizer.eot_id,
            "vocab_size": tokenizer.vocab_size, "model_max_length": context,
            "max_model_len": context}


def parse_tokenize(body: Any, *, max_chars: int) -> str:
    """POST /tokenize: ``{"prompt": str, "add_special_tokens": bool}`` (vLLM; llama.cpp sends
    ``content``). The text to encode. ``add_special_tokens`` asks for a BOS token, which
    GPT-2 never adds, so it changes nothing; ``<|endoftext|>`` in the text is always the
    special token, as in every numgpt prompt."""
    _check_object_and_model(body)
    key = "prompt" if "prompt" in body else "content"
    text = body.get(key)
    if not isinstance(text, str):
        raise APIError(400, f"'prompt' (or llama.cpp's 'content') must be a string, got "
                            f"{type(text).__name__}", param="prompt", code="invalid_type")
    _typed(body, "add_special_tokens", _is_bool, "true or false", True)
    _check_prompt_size(0, len(text), max_chars, "characters")
    return text


def parse_detokenize(body: Any, *, vocab_size: int) -> list[int]:
    """POST /detokenize: ``{"tokens": [int, ...]}`` (vLLM and llama.cpp). The ids, checked
    against the vocabulary."""
    _check_object_and_model(body)
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(is_int(t) for t in ids):
        raise APIError(400, "'tokens' must be a list of token ids", param="tokens",
                       code="invalid_type")
    if ids:
        try:
            check_token_ids(ids, vocab_size, what="tokens")
        except InputError:
            bad = next(t for t in ids if not 0 <= t < vocab_size)
            raise APIError(400, f"'tokens' holds token id {bad}, outside the model's vocabulary "
                                f"[0, {vocab_size})", param="tokens",
                           code="invalid_token_id") from None
    return ids


def tokenize_json(ids: list[int], context: int) -> dict:
    """vLLM's answer (``tokens``, ``count``, ``max_model_len``); llama.cpp reads ``tokens``."""
    return {"tokens": ids, "count": len(ids), "max_model_len": context}


def detokenize_json(text: str) -> dict:
    """vLLM reads ``prompt``, llama.cpp ``content``: both carry the text."""
    return {"prompt": text, "content": text}


# ------------------------------------------------------- POST /v1/internals (playground)


@dataclass
class InternalsSpec:
    """A validated internals request: one prompt's token ids and the layer to show."""

    ids: list[int]
    layer: int


def parse_internals(body: Any, *, tokenizer, vocab_size: int, n_layer: int, max_tokens: int,
                    max_chars: int | None = None) -> InternalsSpec:
    """``{"prompt": str | [ids], "layer": int (default 0), "model": str}``; the prompt must
    encode to at most ``max_tokens`` tokens (the endpoint stays cheap and its answer small),
    and a text prompt hold at most ``max_chars`` characters, checked before tokenizing."""
    _check_object_and_model(body)
    prompts, _ = _parse_prompt(body.get("prompt"), tokenizer, vocab_size, max_chars)
    if len(prompts) != 1:
        raise _bad("prompt", f"'prompt' must be one prompt (a string or a list of token ids), "
                             f"got {len(prompts)}", code="invalid_prompt")
    ids = prompts[0]
    if len(ids) > max_tokens:
        raise _bad("prompt", f"the prompt has {len(ids)} tokens; /v1/internals takes at most "
                             f"{max_tokens}, so shorten it", code="prompt_too_long")
    layer = _typed(body, "layer", is_int, "an integer", 0)
    if not 0 <= layer < n_layer:
        raise _bad("layer", f"'layer' must lie in [0, {n_layer - 1}], got {layer}")
    return InternalsSpec(ids, layer)


def internals_json(model_name: str, tokenizer, spec: InternalsSpec, attention,
                   residual_norms) -> dict:
    """The internals answer. attention (nh, T, T): layer ``spec.layer``'s probabilities,
    row = query position, column = key position (0 above the diagonal); residual_norms
    (L + 1, T): the residual stream's L2 norm per position, row 0 the embeddings, row l + 1
    block l's output. Numbers are the model's values widened to float64, so JSON keeps
    them exactly; a value that is not finite (the model's forward pass overflowed) is a
    500 naming that, not a body JSON cannot hold."""
    if not (np.isfinite(attention).all() and np.isfinite(residual_norms).all()):
        raise APIError(500, "the model's attention or residual stream is not finite (NaN or "
                            "infinity) for this prompt: its forward pass overflows float32, "
                            "though each weight is finite; this checkpoint's weights need fixing",
                       type="server_error", code="non_finite_internals")
    return {"object": "internals", "model": model_name,
            "tokens": [token_str(tokenizer, t) for t in spec.ids], "token_ids": list(spec.ids),
            "n_layer": int(residual_norms.shape[0]) - 1, "n_head": int(attention.shape[0]),
            "layer": spec.layer,
            "attention": attention.astype("float64").tolist(),
            "residual_norms": residual_norms.astype("float64").tolist()}
