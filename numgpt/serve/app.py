"""``numgpt serve``: an OpenAI-compatible text-completion API over HTTP (Starlette + uvicorn).

Routes::

    POST /v1/completions   OpenAI's legacy completions schema, plain or streamed (SSE)
    GET  /v1/models        the one model served
    GET  /health           200 once the model is loaded, 503 before (or if loading failed)
    GET  /metrics          Prometheus text format

The event loop only parses, validates and formats: all model code runs on the engine's
worker thread (``numgpt.serve.engine``), which decodes every active sequence in one batched step
and hands tokens back through ``loop.call_soon_threadsafe``. The model is loaded on a
background thread at startup, so ``/health`` answers 503 meanwhile.

Every error is OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``;
a request can never take the server down and no traceback reaches a client (unexpected
exceptions are logged here and answered with a generic 500).

Extensions beyond OpenAI's fields: ``top_k`` (int, 0 or -1 for no limit), ``truncate``
(bool: keep the end of a prompt that is too long for the context), ``ascii_only`` (bool).
Unknown fields are ignored, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import secrets
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import (MAX_LOGPROBS, Engine, EngineMetrics, FinishEvent, PromptEvent, QueueFull,
                     Request, TokenEvent)
from ..errors import InputError, NumGPTError
from .metrics import CONTENT_TYPE, Counter, Registry
from ..infer.sample import SamplingParams

__all__ = ["ServerConfig", "APIError", "CompletionSpec", "parse_completion", "create_app",
           "serve", "MAX_STOP"]

log = logging.getLogger("numgpt.serve.app")

MAX_STOP = 4  # OpenAI allows up to 4 stop sequences


@dataclass
class ServerConfig:
    """Everything ``numgpt serve`` is told.

    model_name: the id clients send as ``model`` (default: the model path's last part).
    max_tokens_limit: largest ``max_tokens`` accepted (default: the model's block_size).
    max_n: largest ``n`` accepted.
    """

    model_path: str | None = None
    model_name: str | None = None
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    max_tokens_limit: int | None = None
    max_n: int = 16
    max_body_bytes: int = 1 << 20
    retry_after_s: int = 1


class APIError(Exception):
    """An error answered to the client in OpenAI's shape, with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def response(self) -> JSONResponse:
        return _error_response(self.status, self.message, self.type, self.param, self.code,
                               self.headers)


def _error_body(message: str, type: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error_response(status: int, message: str, type: str = "invalid_request_error",
                    param: str | None = None, code: str | None = None,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(_error_body(message, type, param, code), status_code=status, headers=headers)


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


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


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


def _parse_prompt(raw: Any, tokenizer, vocab_size: int) -> tuple[list[list[int]], list[str]]:
    """A string, a list of strings, a list of token ids, or a list of such lists ->
    (ids per prompt, text per prompt)."""
    shape = ("'prompt' must be a non-empty string, a list of non-empty strings, a list of "
             "token ids, or a list of lists of token ids")
    if raw is None:
        raise APIError(400, "'prompt' is required: " + shape, param="prompt", code="missing_prompt")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and all(_is_int(t) for t in raw)):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise APIError(400, shape, param="prompt", code="invalid_prompt")
    ids, texts = [], []
    for i, p in enumerate(raw):
        if isinstance(p, str):
            if not p:
                raise APIError(400, f"prompt {i} is empty; give at least one character",
                               param="prompt", code="empty_prompt")
            ids.append(tokenizer.encode(p, allow_special=True))  # as `numgpt generate` does
            texts.append(p)
        elif isinstance(p, list) and p and all(_is_int(t) for t in p):
            bad = [t for t in p if not 0 <= t < vocab_size]
            if bad:
                raise APIError(400, f"prompt {i} holds token id {bad[0]}, outside the model's "
                                    f"vocabulary [0, {vocab_size})", param="prompt",
                               code="invalid_token_id")
            ids.append(list(p))
            texts.append(tokenizer.decode([t for t in p if t < tokenizer.vocab_size]))
        else:
            raise APIError(400, f"prompt {i}: {shape}", param="prompt", code="invalid_prompt")
    return ids, texts


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
    """The prompt if it leaves room to generate, its last tokens with ``truncate``, else 400."""
    if truncate and len(ids) + max_tokens > context:
        return ids[-max(1, context - max_tokens):]
    if len(ids) >= context:
        raise APIError(400, f"the prompt has {len(ids)} tokens but the model's context is "
                            f"{context} tokens, leaving no room to generate; shorten the prompt "
                            f"or send \"truncate\": true to keep its last tokens",
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
    top_k = _typed(body, "top_k", _is_int, "an integer", 0)
    if top_k < -1:
        raise _bad("top_k", f"'top_k' must be >= 1, or 0 / -1 for no limit, got {top_k}")
    seed = _typed(body, "seed", _is_int, "an integer", None)
    if seed is not None and not 0 <= seed < 2 ** 64:
        raise _bad("seed", f"'seed' must lie in [0, 2**64), got {seed}")
    ascii_only = _typed(body, "ascii_only", lambda v: isinstance(v, bool), "true or false", False)
    return SamplingParams(temperature=float(temperature), top_k=top_k if top_k > 0 else None,
                          top_p=float(top_p) if top_p < 1 else None, ascii_only=ascii_only,
                          seed=seed)


def parse_completion(body: Any, *, model_name: str, tokenizer, vocab_size: int, context: int,
                     max_tokens_limit: int, max_n: int, max_sequences: int) -> CompletionSpec:
    """Validate an OpenAI completion request body; APIError names the first bad field."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}",
                       code="invalid_body")
    model = _typed(body, "model", lambda v: isinstance(v, str), "a string", model_name)
    if model != model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves "
                            f"{model_name!r}", param="model", code="model_not_found")
    if body.get("suffix") is not None:
        raise _bad("suffix", "'suffix' (insertion) is not supported by this server")
    ids, texts = _parse_prompt(body.get("prompt"), tokenizer, vocab_size)
    max_tokens = _typed(body, "max_tokens", _is_int, "an integer", 16)
    if not 1 <= max_tokens <= max_tokens_limit:
        raise _bad("max_tokens", f"'max_tokens' must lie in [1, {max_tokens_limit}], got {max_tokens}")
    n = _typed(body, "n", _is_int, "an integer", 1)
    if not 1 <= n <= max_n:
        raise _bad("n", f"'n' must lie in [1, {max_n}], got {n}")
    if n * len(ids) > max_sequences:
        raise _bad("n", f"{len(ids)} prompts x n={n} asks for {n * len(ids)} sequences; this "
                        f"server queues at most {max_sequences}")
    logprobs = _typed(body, "logprobs", _is_int, "an integer", None)
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise _bad("logprobs", f"'logprobs' must lie in [0, {MAX_LOGPROBS}], got {logprobs}")
    flags = {k: _typed(body, k, lambda v: isinstance(v, bool), "true or false", False)
             for k in ("stream", "echo", "truncate")}
    options = _typed(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    fitted = [_fit_context(p, max_tokens, context, flags["truncate"]) for p in ids]
    texts = [t if len(f) == len(p) else tokenizer.decode(f)  # echo what the model saw
             for t, f, p in zip(texts, fitted, ids)]
    ids = fitted
    return CompletionSpec(ids, texts, max_tokens, _parse_sampling(body), n, _parse_stop(body),
                          flags["stream"], flags["echo"], logprobs,
                          bool(options.get("include_usage", False)))


# ----------------------------------------------------------------------- body reading


async def _read_json(request: HTTPRequest, limit: int) -> Any:
    """The request's JSON body: 415 for another content type, 413 past ``limit`` bytes
    (by Content-Length and while reading), 400 for bad UTF-8 or malformed JSON."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}",
                       code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise APIError(413, f"the request body ({declared} bytes) exceeds the limit of {limit} bytes",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body exceeds the limit of {limit} bytes",
                           code="request_too_large")
        chunks.append(chunk)
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {e.start})",
                       code="invalid_encoding") from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {str(e)[:200]}",
                       code="invalid_json") from None


# ------------------------------------------------------------------------- responses


def _token_str(tokenizer, token_id: int) -> str:
    """A token as OpenAI shows it: its text, or ``bytes:\\xNN`` when not whole UTF-8."""
    if not 0 <= token_id < tokenizer.vocab_size:  # a model vocabulary padded past the tokenizer's
        return f"<|token {token_id}|>"
    raw = tokenizer.token_bytes(token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


@dataclass
class _Logprobs:
    """OpenAI's legacy logprobs object, built a token at a time."""

    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, tokenizer, token_id: int, logprob: float | None, top, offset: int) -> None:
        self.tokens.append(_token_str(tokenizer, token_id))
        self.token_logprobs.append(logprob)
        if top is None:
            self.top_logprobs.append(None)
        else:  # OpenAI always includes the sampled token among the alternatives
            alts = {_token_str(tokenizer, t): lp for t, lp in top}
            alts.setdefault(self.tokens[-1], logprob)
            self.top_logprobs.append(alts)
        self.text_offset.append(offset)

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}


def _prompt_logprobs(tokenizer, ids: list[int], ev: PromptEvent | None) -> _Logprobs:
    """Logprobs entries for the echoed prompt (offsets count characters from 0)."""
    out, offset = _Logprobs(), 0
    for t, token in enumerate(ids):
        lp, top = (ev.logprobs[t], ev.top[t]) if ev is not None else (None, None)
        out.add(tokenizer, token, lp, top, offset)
        offset += len(tokenizer.decode([token])) if token < tokenizer.vocab_size else 0
    return out


@dataclass
class _Choice:
    """What has arrived for one choice (one engine sequence)."""

    index: int
    prompt: int
    text: list[str] = field(default_factory=list)
    logprobs: _Logprobs | None = None
    finish: FinishEvent | None = None


class _Completion:
    """One HTTP completion request: its engine sequences and the events coming back."""

    def __init__(self, spec: CompletionSpec, model_name: str, tokenizer):
        self.spec, self.model_name, self.tokenizer = spec, model_name, tokenizer
        self.id = "cmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        self.events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.choices: list[_Choice] = []
        self.requests: list[Request] = []
        self.prompt_events: dict[int, PromptEvent] = {}
        for p, ids in enumerate(spec.prompts):
            for j in range(spec.n):
                index = len(self.choices)
                self.choices.append(_Choice(index, p))
                emit = (lambda ev, i=index: loop.call_soon_threadsafe(self.events.put_nowait, (i, ev)))
                self.requests.append(Request(
                    ids, spec.max_tokens, spec.params, emit, spec.stop, spec.logprobs,
                    prompt_logprobs=spec.echo and spec.logprobs is not None and j == 0, index=j))

    def echo_text(self, choice: _Choice) -> str:
        """The prompt text ``echo`` puts before the completion ('' without echo)."""
        return self.spec.prompt_texts[choice.prompt] if self.spec.echo else ""

    def echo_logprobs(self, choice: _Choice) -> _Logprobs | None:
        """A choice's logprobs object, holding the prompt's entries when echoed (None when
        logprobs were not asked for). Call once the prompt's PromptEvent has arrived."""
        if self.spec.logprobs is None:
            return None
        if not self.spec.echo:
            return _Logprobs()
        ev = self.prompt_events.get(choice.prompt)
        return _prompt_logprobs(self.tokenizer, self.spec.prompts[choice.prompt], ev)

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.spec.prompts)
        done = sum(c.finish.completion_tokens for c in self.choices if c.finish is not None)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

    def offset_base(self, choice: _Choice) -> int:
        return len(self.spec.prompt_texts[choice.prompt]) if self.spec.echo else 0

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model_name, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def failed(self) -> FinishEvent | None:
        return next((c.finish for c in self.choices
                     if c.finish is not None and c.finish.reason in ("error", "cancelled")), None)


async def _collect(comp: _Completion) -> dict:
    """Wait for every sequence to finish; the whole OpenAI response body."""
    for c in comp.choices:
        c.text.append(comp.echo_text(c))
    remaining = len(comp.choices)
    while remaining:
        i, ev = await comp.events.get()
        c = comp.choices[i]
        if isinstance(ev, PromptEvent):
            comp.prompt_events[c.prompt] = ev
        elif isinstance(ev, TokenEvent):
            if c.logprobs is None:  # the prompt's entries come first
                c.logprobs = comp.echo_logprobs(c)
            c.text.append(ev.text)
            if c.logprobs is not None:
                c.logprobs.add(comp.tokenizer, ev.token_id, ev.logprob, ev.top,
                               comp.offset_base(c) + ev.text_offset)
        else:
            c.finish, remaining = ev, remaining - 1
            c.text.append(ev.text)
    if comp.failed() is not None:
        raise APIError(500, "generation failed; see the server log", type="server_error",
                       code="generation_failed")
    choices = []
    for c in comp.choices:
        lp = c.logprobs if c.logprobs is not None else comp.echo_logprobs(c)
        choices.append(_choice_json("".join(c.text), c.index, lp, c.finish.reason))
    return {"id": comp.id, "object": "text_completion", "created": comp.created,
            "model": comp.model_name, "choices": choices, "usage": comp.usage()}


async def _stream(comp: _Completion) -> AsyncIterator[str]:
    """Server-sent events: echo chunks, one chunk per token, a finish chunk per choice,
    optional usage, then ``data: [DONE]``. With echo and logprobs, a choice's echo chunk
    waits for its prompt's logprobs (which the engine sends before any of its tokens)."""
    echoed: set[int] = set()

    def echo(c: _Choice) -> list[str]:
        if not comp.spec.echo or c.index in echoed:
            return []
        echoed.add(c.index)
        lp = comp.echo_logprobs(c)
        return [comp.chunk([_choice_json(comp.echo_text(c), c.index, lp, None)])]

    if comp.spec.logprobs is None:
        for c in comp.choices:
            for s in echo(c):
                yield s
    remaining = len(comp.choices)
    while remaining:
        i, ev = await comp.events.get()
        c = comp.choices[i]
        if isinstance(ev, PromptEvent):
            comp.prompt_events[c.prompt] = ev
            for d in comp.choices:
                if d.prompt == c.prompt:
                    for s in echo(d):
                        yield s
            continue
        for s in echo(c):
            yield s
        if isinstance(ev, TokenEvent):
            yield comp.chunk([_choice_json(ev.text, i, _token_logprobs(comp, c, ev), None)])
            continue
        c.finish, remaining = ev, remaining - 1
        if ev.reason in ("error", "cancelled"):
            err = _error_body("generation failed; see the server log", "server_error", None,
                              "generation_failed")
            yield f"data: {json.dumps(err)}\n\n"
            return
        yield comp.chunk([_choice_json(ev.text, i, None, ev.reason)])
    if comp.spec.include_usage:
        yield comp.chunk([], usage=comp.usage())
    yield "data: [DONE]\n\n"


def _choice_json(text: str, index: int, logprobs: "_Logprobs | dict | None",
                 finish_reason: str | None) -> dict:
    """One entry of a response's (or a stream chunk's) ``choices``."""
    if isinstance(logprobs, _Logprobs):
        logprobs = logprobs.to_json()
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


def _token_logprobs(comp: _Completion, c: _Choice, ev: TokenEvent) -> dict | None:
    """The logprobs object of one streamed token (None when not asked for)."""
    if comp.spec.logprobs is None:
        return None
    lp = _Logprobs()
    lp.add(comp.tokenizer, ev.token_id, ev.logprob, ev.top, comp.offset_base(c) + ev.text_offset)
    return lp.to_json()


class _EventStream(StreamingResponse):
    """A streaming response that runs ``on_close`` however it ends (finished, client gone,
    cancelled), so the engine frees the slots of a client that disconnected."""

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


# --------------------------------------------------------------------------- the app


class _State:
    """The served model, its engine, and the server's own metrics."""

    def __init__(self, config: ServerConfig, model=None):
        self.config = config
        self.model = model
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.registry = Registry()
        self.requests = self.registry.add(Counter("numgpt_http_requests_total",
                                                  "HTTP requests answered, by route and status.",
                                                  ["path", "status"]))
        self.engine_metrics = EngineMetrics(self.registry)
        self.on_load_failed: Callable[[str], None] | None = None
        self.started = time.time()
        self._loader: threading.Thread | None = None

    @property
    def model_name(self) -> str:
        if self.config.model_name:
            return self.config.model_name
        return Path(self.config.model_path).name if self.config.model_path else "numgpt"

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def start(self) -> None:
        """Load the model on a background thread (or use the one given) and start the engine."""
        if self.model is not None:
            self._start_engine(self.model)
            return
        self._loader = threading.Thread(target=self._load, name="numgpt-load", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            from ..io.checkpoint import load

            t0 = time.perf_counter()
            model = load(self.config.model_path)
            self._start_engine(model)
            log.info("loaded %s (%s parameters) in %.1f s; serving it as %r",
                     self.config.model_path, f"{model.num_parameters():,}",
                     time.perf_counter() - t0, self.model_name)
        except Exception as e:  # reported by /health and the log; the CLI exits
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("could not load the model: %s", self.load_error,
                      exc_info=not isinstance(e, NumGPTError))
            if self.on_load_failed is not None:
                self.on_load_failed(self.load_error)

    def _start_engine(self, model) -> None:
        if model.tokenizer is None:
            raise InputError("the model has no tokenizer attached, so text cannot be served; "
                             "save it with its tokenizer (model.tokenizer) and load it again")
        self.model = model
        self.engine = Engine(model, self.config.max_batch, self.config.max_queue,
                             metrics=self.engine_metrics).start()

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    def limits(self) -> dict:
        c, m = self.config, self.model.config
        return dict(model_name=self.model_name, tokenizer=self.model.tokenizer,
                    vocab_size=m.vocab_size, context=self.engine.max_len,
                    max_tokens_limit=c.max_tokens_limit or m.block_size, max_n=c.max_n,
                    max_sequences=c.max_queue)


def _state(request: HTTPRequest) -> _State:
    return request.app.state.numgpt


def _require_ready(state: _State) -> None:
    if not state.ready:
        msg = (f"the model failed to load: {state.load_error}" if state.load_error
               else "the model is still loading; retry shortly")
        raise APIError(503, msg, type="server_error", code="model_not_ready",
                       headers={"Retry-After": str(state.config.retry_after_s)})


async def health(request: HTTPRequest) -> Response:
    state = _state(request)
    _require_ready(state)
    return JSONResponse({"status": "ok", "model": state.model_name,
                         "active": state.engine.active, "queued": state.engine.queue_depth})


async def models(request: HTTPRequest) -> Response:
    state = _state(request)
    card = {"id": state.model_name, "object": "model", "created": int(state.started),
            "owned_by": "numgpt"}
    return JSONResponse({"object": "list", "data": [card]})


async def metrics(request: HTTPRequest) -> Response:
    return Response(_state(request).registry.render(), media_type=CONTENT_TYPE)


async def completions(request: HTTPRequest) -> Response:
    state = _state(request)
    _require_ready(state)
    body = await _read_json(request, state.config.max_body_bytes)
    spec = parse_completion(body, **state.limits())
    comp = _Completion(spec, state.model_name, state.model.tokenizer)
    try:
        state.engine.submit(comp.requests)
    except QueueFull as e:
        raise APIError(503, f"the server is busy: {e}", type="server_error", code="overloaded",
                       headers={"Retry-After": str(state.config.retry_after_s)}) from None
    except InputError as e:
        raise APIError(400, str(e), param="prompt") from None

    def cancel() -> None:
        for r in comp.requests:
            state.engine.cancel(r)

    if spec.stream:
        return _EventStream(_stream(comp), on_close=cancel)
    try:
        body = await _until_disconnect(request, _collect(comp))
    finally:
        cancel()
    if body is None:  # nobody is listening; 499 is nginx's "client closed request"
        return Response(status_code=499)
    return JSONResponse(body)


async def _until_disconnect(request: HTTPRequest, work) -> Any:
    """Await ``work``; None (and ``work`` cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            return None
        return task.result()
    finally:
        watcher.cancel()


# --------------------------------------------------------------------- middleware


class _Guard:
    """Outermost app logic: API-key check, request counting by status, and the catch-all
    that turns any unexpected exception into a generic 500 (traceback only in the log)."""

    def __init__(self, app, state: _State):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500, "started": False}

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        try:
            key = self.state.config.api_key
            if key and not _authorized(scope, key):
                resp = _error_response(401, "missing or wrong API key: send the header "
                                            "'Authorization: Bearer <key>'",
                                       code="invalid_api_key")
                return await resp(scope, receive, send_counted)
            await self.app(scope, receive, send_counted)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not status["started"]:
                resp = _error_response(500, "internal server error; see the server log",
                                       type="server_error", code="internal_error")
                await resp(scope, receive, send_counted)
        finally:
            path = scope.get("path", "")
            known = path if path in _PATHS else "other"
            self.state.requests.inc(path=known, status=str(status["code"]))


def _authorized(scope, key: str) -> bool:
    headers = dict(scope.get("headers") or [])
    got = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = got.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


async def _api_error(request: HTTPRequest, exc: APIError) -> Response:
    return exc.response()


async def _http_error(request: HTTPRequest, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = (f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405)
               else str(exc.detail))
    return _error_response(exc.status_code, message, code=code, headers=exc.headers)


_PATHS = ("/v1/completions", "/v1/models", "/health", "/metrics")


def create_app(config: ServerConfig, model=None) -> Starlette:
    """The ASGI app. With ``model`` given it is served at once (tests, embedding); otherwise
    ``config.model_path`` is loaded on a background thread at startup."""
    state = _State(config, model)

    @asynccontextmanager
    async def lifespan(app):
        state.start()
        try:
            yield
        finally:
            state.stop()

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={APIError: _api_error, HTTPException: _http_error})
    app.state.numgpt = state
    app.add_middleware(_Guard, state=state)
    return app


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> int:
    """Run the server until interrupted; returns the exit status (1 if the model failed to load)."""
    import uvicorn

    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=3, access_log=True))
    failed: list[str] = []

    def stop_on_failure(message: str) -> None:
        failed.append(message)
        server.should_exit = True

    app.state.numgpt.on_load_failed = stop_on_failure
    server.run()
    return 1 if failed else 0
