"""``numgpt serve``: an OpenAI-compatible text-completion API over HTTP (Starlette + uvicorn).

Routes::

    POST /v1/completions   OpenAI's legacy completions schema, plain or streamed (SSE)
    GET  /v1/models        the one model served, with its context length (max_model_len)
    GET  /tokenizer_info   the remote tokenizer (vLLM's shape): eos/bos/pad tokens, context
    POST /tokenize         {"prompt" (or llama.cpp's "content"), "add_special_tokens"} -> {"tokens"}
    POST /detokenize       {"tokens"} -> {"prompt", "content"}
    GET  /health           200 once the model is loaded, 503 before (or if loading failed)
    GET  /metrics          Prometheus text format
    POST /v1/internals     one short prompt's attention probabilities and residual norms
    POST /v1/inspect       the logit lens or activation patching of a short prompt
    POST /v1/chat/completions  OpenAI's chat schema, plain or streamed, over the same engine
    GET  /                 the playground page (static files under /static/)

The API key guards every route except the page (it holds nothing secret, and every call
it makes carries the key the user types) and the probes ``/health`` and ``/metrics``, which
load balancers and Prometheus call without credentials (as llama-server and vLLM leave them).
Before the key, the Host header is checked against ``allowed_hosts`` (DNS rebinding: a web
page whose name an attacker points at 127.0.0.1 must not reach a keyless local server).
A request may name any ``model``: this server has one and answers with it.

This module is the HTTP side: routes, the API key, body limits, streaming, startup. What a
request may say and what an answer looks like is ``numgpt.serve.protocol`` (pure Python).
The event loop only parses, validates and formats: all model code runs on the engine's
worker thread (``numgpt.serve.engine``), which decodes every active sequence in one batched step
and hands tokens back through ``loop.call_soon_threadsafe``. The model is loaded on a
background thread at startup, so ``/health`` answers 503 meanwhile.

A request can never take the server down and no traceback reaches a client (unexpected
exceptions are logged here and answered with a generic 500). Bounded against slow or hostile
clients: request headers must arrive within ``header_timeout_s`` and a body within
``body_timeout_s`` (408), at most ``max_connections`` are served at once (503 past it), and
prompts are capped in characters and tokens. JSON decoding and tokenizing run on a worker
thread, never on the event loop. SIGTERM and SIGINT stop accepting, let in-flight requests
finish for ``grace_period_s``, then cancel them (a request not yet answered gets a JSON 503,
a stream an error event and its end) and exit 0.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import secrets
import signal
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request as HTTPRequest
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import ConfigError, InputError, NumGPTError
from . import internals, lookinside
from .engine import (DEFAULT_PREFILL_CHUNK, DEFAULT_PREFIX_CACHE_MB, Engine, EngineMetrics,
                     QueueFull, Request, matmul_line)
from .metrics import CONTENT_TYPE, Counter, Registry
from .protocol import (PROMPT_CHARS_PER_CONTEXT, PROMPT_TOKENS_PER_CONTEXT, APIError,
                       ChatFold, CompletionFold, CompletionSpec, detokenize_json, error_body,
                       internals_json, parse_chat_completion, parse_completion,
                       parse_detokenize, parse_internals, parse_json_body, parse_tokenize, sse,
                       tokenize_json, tokenizer_info)

__all__ = ["ServerConfig", "create_app", "serve", "default_model_name", "LOOPBACK_HOSTS"]

log = logging.getLogger("numgpt.serve.app")

STATIC = Path(__file__).resolve().parent / "static"  # the playground page, shipped as package data
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # Host names always answered

# a checkpoint file's or prefix's last part that says nothing about the model: the folder does
_GENERIC_NAMES = ("best", "latest", "ckpt", "model", "pytorch_model", "config")
_FILE_SUFFIXES = (".json", ".safetensors", ".gguf", ".pt", ".bin")


def default_model_name(path: str | os.PathLike) -> str:
    """The name a server gives the model at ``path`` when ``--model-name`` is not set: its
    last part without a file suffix, or the folder's name when that part is generic, so a
    run's ``runs/mine/best`` (or ``latest``) is ``mine``, ``out/ckpt.pt`` is ``out``, a
    Hugging Face folder ``gpt2`` (or its ``model.safetensors``) is ``gpt2``, and
    ``tiny.gguf`` is ``tiny``."""
    p = Path(os.path.abspath(path))
    name = p.stem if p.suffix in _FILE_SUFFIXES else p.name
    if name in _GENERIC_NAMES and p.parent.name:
        name = p.parent.name
    return name or "numgpt"


@dataclass
class ServerConfig:
    """Everything ``numgpt serve`` is told.

    model_name: the model's name in answers and /v1/models (default:
        ``default_model_name(model_path)``). Requests may send any ``model``.
    api_key: required as ``Authorization: Bearer KEY`` when set (compared as UTF-8 bytes);
        an empty key is refused, it would silently turn authentication off.
    max_tokens_limit: largest ``max_tokens`` accepted (default: the model's block_size).
    max_n: largest ``n`` accepted.
    max_prompt_chars / max_prompt_tokens: per-prompt caps (default: 32 / 8 x the context).
    header_timeout_s / body_timeout_s: a request's headers, then its body, must arrive
        within these (a slow client is closed, or answered 408).
    max_connections: connections served at once; past it a request is answered 503.
    grace_period_s: on SIGTERM/SIGINT, how long in-flight requests may run before they
        are cancelled.
    allowed_hosts: Host header names answered besides ``LOOPBACK_HOSTS`` and IP addresses
        (which DNS rebinding cannot use: it needs a name); ``("*",)`` answers any.
        ``serve`` adds the name it binds to.
    chat_template: the Jinja2 text ``/v1/chat/completions`` renders messages with (default:
        the model's own, else ``numgpt.io.chat.DEFAULT_TEMPLATE``).
    prefill_chunk: prompt tokens one engine step computes besides its decode rows.
    prefix_cache_mb: MiB of the engine's pool of recent prompt prefixes (0: off).
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
    max_prompt_chars: int | None = None
    max_prompt_tokens: int | None = None
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 128
    grace_period_s: float = 10.0
    allowed_hosts: tuple[str, ...] = ()
    chat_template: str | None = None
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB

    def __post_init__(self) -> None:
        if not self.prefill_chunk >= 1:
            raise ConfigError(f"--prefill-chunk must be >= 1 prompt token per step, got "
                              f"{self.prefill_chunk}")
        if not self.prefix_cache_mb >= 0:
            raise ConfigError(f"--prefix-cache-mb must be >= 0 (0 turns the pool off), got "
                              f"{self.prefix_cache_mb}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty, which would turn authentication off; "
                              "pass a non-empty --api-key (or NUMGPT_API_KEY), or leave both "
                              "unset to serve without a key")
        if self.api_key is not None and self.api_key != self.api_key.strip():
            raise ConfigError("the API key starts or ends with whitespace, which no client "
                              "can send in a header; remove it")
        for name in ("header_timeout_s", "body_timeout_s", "grace_period_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        for host in self.allowed_hosts:
            if host != "*" and (not host.strip() or "/" in host
                                or _host_name(host) != host.strip().lower().rstrip(".")):
                raise ConfigError(f"--allowed-hosts takes host names such as example.com or "
                                  f"'*', got {host!r}; leave out the scheme, port and path")
        self.allowed_hosts = tuple(h if h == "*" else _host_name(h) for h in self.allowed_hosts)


def _host_name(host: str) -> str:
    """A Host header's name without its port, lower case: ``[::1]:8000`` -> ``[::1]``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1] if "]" in host else host
    name, colon, port = host.rpartition(":")
    return (name if colon and port.isdigit() else host).rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------ errors and bodies


def _error_response(status: int, message: str, type: str = "invalid_request_error",
                    param: str | None = None, code: str | None = None,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status,
                        headers=headers)


async def _read_json(request: HTTPRequest, config: ServerConfig) -> Any:
    """The request's JSON body: 415 for another content type, 413 past ``max_body_bytes``
    (by Content-Length and while reading), 408 if it does not arrive within
    ``body_timeout_s``, 400 for bad UTF-8, malformed JSON or text that is not Unicode.
    Decoded on a worker thread: a megabyte of JSON must not stall the event loop."""
    try:
        raw = await asyncio.wait_for(_read_body(request, config.max_body_bytes),
                                     config.body_timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {config.body_timeout_s:g} s "
                            f"(numgpt serve --body-timeout)", code="request_timeout",
                       headers={"Connection": "close"}) from None
    return await asyncio.to_thread(parse_json_body, raw)


async def _read_body(request: HTTPRequest, limit: int) -> bytes:
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
    return b"".join(chunks)


# ------------------------------------------------------------- engine events -> answers


class _Completion:
    """One HTTP completion request: its engine sequences, the queue their events arrive on
    (from the engine's thread), and the fold that turns them into the answer."""

    def __init__(self, spec: CompletionSpec, model_name: str, tokenizer, fold=CompletionFold,
                 id_prefix: str = "cmpl-"):
        self.fold = fold(spec, model_name, tokenizer, id=id_prefix + secrets.token_hex(12),
                         created=int(time.time()))
        self.events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.requests: list[Request] = []
        for c in self.fold.choices:  # choice c is the c.index-th engine sequence
            emit = (lambda ev, i=c.index: loop.call_soon_threadsafe(self.events.put_nowait, (i, ev)))
            self.requests.append(Request(
                spec.prompts[c.prompt], spec.max_tokens, spec.params, emit, spec.stop,
                spec.logprobs, index=c.sample,
                # the prompt's logprobs are computed once, by its first sample
                prompt_logprobs=spec.echo and spec.logprobs is not None and c.sample == 0))


async def _fold_events(comp: _Completion) -> AsyncIterator[str]:
    """The one loop over a request's engine events: each is folded into ``comp.fold``, and
    the server-sent events it makes (only when streaming) are yielded as they happen.
    A stream sends these; a plain answer drains them and reads the fold's final state."""
    for event in comp.fold.start():
        yield event
    while not comp.fold.done:
        i, ev = await comp.events.get()
        for event in comp.fold.apply(i, ev):
            yield event


async def _collect(comp: _Completion) -> dict:
    """Wait for every sequence to finish; the whole OpenAI response body."""
    async for _ in _fold_events(comp):
        pass
    return comp.fold.response()


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
        self.internals_lock = asyncio.Lock()  # one /v1/internals pass at a time

    @property
    def model_name(self) -> str:
        if self.config.model_name:
            return self.config.model_name
        return default_model_name(self.config.model_path) if self.config.model_path else "numgpt"

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
            from ..core.quant import parameter_count
            from ..io.checkpoint import load

            t0 = time.perf_counter()
            model = load(self.config.model_path)
            self._start_engine(model)
            log.info("loaded %s (%s parameters) in %.1f s; serving it as %r",
                     self.config.model_path, f"{parameter_count(model):,}",
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
                             metrics=self.engine_metrics, prefill_chunk=self.config.prefill_chunk,
                             prefix_cache_mb=self.config.prefix_cache_mb).start()
        log.info("%s", matmul_line(model))

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()

    def limits(self) -> dict:
        c, m = self.config, self.model.config
        return dict(tokenizer=self.model.tokenizer,
                    vocab_size=m.vocab_size, context=self.engine.max_len,
                    max_tokens_limit=c.max_tokens_limit or m.block_size, max_n=c.max_n,
                    max_sequences=c.max_queue, max_prompt_chars=self.max_prompt_chars,
                    max_prompt_tokens=c.max_prompt_tokens or
                    PROMPT_TOKENS_PER_CONTEXT * self.engine.max_len)

    @property
    def chat_template(self) -> str:
        """``--chat-template``'s text, else the model's own, else numgpt's default."""
        from ..io.chat import template_of

        return template_of(self.model, self.config.chat_template)

    @property
    def max_prompt_chars(self) -> int:
        return self.config.max_prompt_chars or PROMPT_CHARS_PER_CONTEXT * self.engine.max_len


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
    """The model card; ``max_model_len`` (vLLM's field) is the context in tokens, once loaded."""
    state = _state(request)
    card = {"id": state.model_name, "object": "model", "created": int(state.started),
            "owned_by": "numgpt", "root": state.model_name}
    if state.ready:
        card["max_model_len"] = state.engine.max_len
    return JSONResponse({"object": "list", "data": [card]})


async def get_tokenizer_info(request: HTTPRequest) -> Response:
    """GET /tokenizer_info: what lm-evaluation-harness's remote tokenizer asks first."""
    state = _state(request)
    _require_ready(state)
    return JSONResponse(tokenizer_info(state.model.tokenizer, state.engine.max_len))


async def tokenize(request: HTTPRequest) -> Response:
    """POST /tokenize: text -> ids, exactly as a completion prompt is encoded."""
    state = _state(request)
    _require_ready(state)
    body = await _read_json(request, state.config)
    text = parse_tokenize(body, max_chars=state.max_prompt_chars)
    ids = await asyncio.to_thread(state.model.tokenizer.encode, text, allow_special=True)
    return JSONResponse(tokenize_json(ids, state.engine.max_len))


async def detokenize(request: HTTPRequest) -> Response:
    """POST /detokenize: ids -> text (ids past the tokenizer's vocabulary, in a padded
    model vocabulary, have no text and are skipped, as in an echoed prompt)."""
    state = _state(request)
    _require_ready(state)
    body = await _read_json(request, state.config)
    tok = state.model.tokenizer
    ids = parse_detokenize(body, vocab_size=state.model.config.vocab_size)
    text = await asyncio.to_thread(tok.decode, [t for t in ids if t < tok.vocab_size])
    return JSONResponse(detokenize_json(text))


async def metrics(request: HTTPRequest) -> Response:
    return Response(_state(request).registry.render(), media_type=CONTENT_TYPE)


async def completions(request: HTTPRequest) -> Response:
    state = _state(request)
    _require_ready(state)
    body = await _read_json(request, state.config)
    # tokenizing a long prompt takes milliseconds to seconds: never on the event loop
    spec = await asyncio.to_thread(parse_completion, body, **state.limits())
    return await _answer(request, state, _Completion(spec, state.model_name, state.model.tokenizer))


async def chat_completions(request: HTTPRequest) -> Response:
    """POST /v1/chat/completions: the messages rendered with the model's chat template
    (``--chat-template``, the one it carries, or numgpt's default) and answered as a
    completion of that text, in OpenAI's chat shapes (``protocol.ChatFold``)."""
    state = _state(request)
    _require_ready(state)
    body = await _read_json(request, state.config)
    spec = await asyncio.to_thread(parse_chat_completion, body, template=state.chat_template,
                                   **state.limits())
    return await _answer(request, state, _Completion(spec, state.model_name,
                                                     state.model.tokenizer, ChatFold,
                                                     "chatcmpl-"))


async def _answer(request: HTTPRequest, state: "_State", comp: _Completion) -> Response:
    """Submit a request's sequences to the engine; stream its events or answer its body."""
    spec = comp.fold.spec
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
        return _EventStream(_fold_events(comp), on_close=cancel)
    try:
        body = await _until_disconnect(request, _collect(comp))
    finally:
        cancel()
    if body is None:  # nobody is listening; 499 is nginx's "client closed request"
        return Response(status_code=499)
    return JSONResponse(body)


async def inspect_internals(request: HTTPRequest) -> Response:
    """POST /v1/internals: one prompt pass of at most ``internals.MAX_TOKENS`` tokens, on a
    worker thread beside the engine (its own one-slot cache), one request at a time."""
    state = _state(request)
    _require_ready(state)
    body = await _read_json(request, state.config)
    m = state.model.config
    spec = await asyncio.to_thread(parse_internals, body, tokenizer=state.model.tokenizer,
                                   vocab_size=m.vocab_size, n_layer=m.n_layer,
                                   max_tokens=min(internals.MAX_TOKENS, m.block_size),
                                   max_chars=state.max_prompt_chars)  # before tokenizing
    async with state.internals_lock:
        seen = await asyncio.to_thread(internals.inspect, state.model, spec.ids, spec.layer)
    return JSONResponse(internals_json(state.model_name, state.model.tokenizer, spec,
                                       seen.attention, seen.residual_norms))


async def inspect_view(request: HTTPRequest) -> Response:
    """POST /v1/inspect: the playground's logit-lens and patching views (``lookinside``),
    bounded prompts, on a worker thread, one at a time with /v1/internals."""
    state = _state(request)
    _require_ready(state)
    body = await _read_json(request, state.config)
    m = state.model.config
    spec = await asyncio.to_thread(lookinside.parse_inspect, body, tokenizer=state.model.tokenizer,
                                   vocab_size=m.vocab_size, block_size=m.block_size,
                                   max_chars=state.max_prompt_chars)
    async with state.internals_lock:
        answer = await asyncio.to_thread(lookinside.run, state.model, spec, state.model_name)
    return JSONResponse(answer)


async def playground(request: HTTPRequest) -> Response:
    """GET /: the page, told whether to ask for an API key (never the key itself)."""
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    if _state(request).config.api_key:
        page = page.replace('data-api-key="none"', 'data-api-key="required"', 1)
    return HTMLResponse(page, headers=_PAGE_HEADERS)


# on the page and each of its files: it loads only its own files and talks only to this
# server (works offline), and no other site may frame it (clickjacking)
_PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
                 "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
                 "Cache-Control": "no-cache"}


class _PageFiles(StaticFiles):
    """The playground's static files, each answered with the page's security headers."""

    async def get_response(self, path: str, scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(_PAGE_HEADERS)
        return response


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
            return None
        return task.result()
    finally:  # also when this request is cancelled (shutdown): no task outlives it
        for t in (task, watcher):
            _discard(t)


def _discard(task: asyncio.Future) -> None:
    """Cancel a task nobody will await, or read its exception if it already ended, so
    asyncio never logs "Task exception was never retrieved" for it."""
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()


# --------------------------------------------------------------------- middleware


class _Guard:
    """Outermost app logic: Host check, API-key check, request counting by status, the
    catch-all that turns any unexpected exception into a generic 500 (traceback only in
    the log), and the answer to a request the shutdown cancels."""

    def __init__(self, app, state: _State):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500, "started": False, "ended": False, "stream": False}

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                status["stream"] = any(k == b"content-type" and v.startswith(b"text/event-stream")
                                       for k, v in message["headers"])
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                status["ended"] = True
            await send(message)

        try:
            host = _refused_host(scope, self.state.config.allowed_hosts)
            if host is not None:
                resp = _error_response(
                    400, f"the Host header names {host!r}, which this server does not answer "
                         f"to (it answers IP addresses, {', '.join(LOOPBACK_HOSTS)} and "
                         f"--allowed-hosts); if the name is yours, start it with "
                         f"--allowed-hosts {host} (or '*' for any name)", code="host_not_allowed")
                return await resp(scope, receive, send_counted)
            key = self.state.config.api_key
            if key and not _public(scope.get("path", "")) and not _authorized(scope, key):
                resp = _error_response(401, "missing or wrong API key: send the header "
                                            "'Authorization: Bearer <key>'",
                                       code="invalid_api_key")
                return await resp(scope, receive, send_counted)
            await self.app(scope, receive, send_counted)
        except ClientDisconnect:  # gone mid-upload: nobody to answer, nothing to debug
            status["code"] = 499
            log.info("client disconnected during the upload of %s %s", scope.get("method"),
                     scope.get("path"))
        except asyncio.CancelledError:  # shutdown's grace period ran out: the task ends here
            log.info("cancelled %s %s: the shutdown grace period ran out", scope.get("method"),
                     scope.get("path"))
            await _answer_cancelled(status, scope, receive, send_counted)
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


async def _answer_cancelled(status: dict, scope, receive, send) -> None:
    """Tell the client of a request cancelled at shutdown, in JSON: a 503 if nothing was
    sent yet, else (a stream) an error event and the end of the body. The client may be
    gone already; then there is nobody to tell."""
    message = (f"the server is shutting down and this request did not finish within its "
               f"grace period (numgpt serve --grace-period); retry on another server")
    try:
        if not status["started"]:
            await _error_response(503, message, type="server_error", code="shutting_down",
                                  headers={"Connection": "close"})(scope, receive, send)
        elif not status["ended"]:
            tail = sse(error_body(message, "server_error", None, "shutting_down")) \
                if status["stream"] else ""
            await send({"type": "http.response.body", "body": tail.encode(),
                        "more_body": False})
    except Exception:  # the connection is closed: nothing left to answer
        pass


def _refused_host(scope, allowed: tuple[str, ...]) -> str | None:
    """The Host header's name if this server must not answer it, else None. Answered:
    IP addresses (rebinding needs a name), the loopback names, ``allowed`` (``*``: any),
    and a request without a Host header (HTTP/1.0; browsers always send one)."""
    if "*" in allowed:
        return None
    raw = dict(scope.get("headers") or []).get(b"host")
    if raw is None:
        return None
    name = _host_name(raw.decode("latin-1"))
    if _is_ip(name) or name in LOOPBACK_HOSTS or name in allowed:
        return None
    return name


def _public(path: str) -> bool:
    """No key for the playground's page and static files, nor the probes that load
    balancers and Prometheus call without credentials; every other route needs it."""
    return path in ("/", "/health", "/metrics") or path.startswith("/static/")


def _authorized(scope, key: str) -> bool:
    """The header's bytes against the key's UTF-8 bytes (HTTP hands header values over as
    bytes; a non-ASCII key typed in a UTF-8 terminal arrives as its UTF-8 bytes)."""
    headers = dict(scope.get("headers") or [])
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key.encode("utf-8"))


async def _api_error(request: HTTPRequest, exc: APIError) -> Response:
    return _error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


async def _http_error(request: HTTPRequest, exc: HTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = (f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405)
               else str(exc.detail))
    return _error_response(exc.status_code, message, code=code, headers=exc.headers)


_PATHS = ("/v1/completions", "/v1/models", "/v1/internals", "/v1/inspect", "/health", "/metrics", "/",
          "/tokenizer_info", "/tokenize", "/detokenize", "/v1/chat/completions")


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
              Route("/tokenizer_info", get_tokenizer_info, methods=["GET"]),
              Route("/tokenize", tokenize, methods=["POST"]),
              Route("/detokenize", detokenize, methods=["POST"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"]),
              Route("/v1/internals", inspect_internals, methods=["POST"]),
              Route("/v1/inspect", inspect_view, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/", playground, methods=["GET"]),
              Mount("/static", _PageFiles(directory=STATIC), name="static")]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={APIError: _api_error, HTTPException: _http_error})
    app.state.numgpt = state
    app.add_middleware(_Guard, state=state)
    return app


def serve(config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> int:
    """Run the server until SIGTERM or SIGINT; returns the exit status (0 after a signal's
    graceful stop, 1 if the model failed to load)."""
    import uvicorn

    app = create_app(_answering(config, host))
    server = _graceful_server_class()(uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=True,
        http=_header_timeout_protocol(config.header_timeout_s),
        limit_concurrency=config.max_connections,
        timeout_graceful_shutdown=max(1, round(config.grace_period_s))))
    failed: list[str] = []

    def stop_on_failure(message: str) -> None:
        failed.append(message)
        server.should_exit = True

    app.state.numgpt.on_load_failed = stop_on_failure
    server.run()
    return 1 if failed else 0


def _answering(config: ServerConfig, host: str) -> ServerConfig:
    """``config`` with the name the server binds to among its allowed Host names (an IP
    address needs no entry: every IP address is answered)."""
    if host and not _is_ip(host) and host.lower() not in config.allowed_hosts:
        return replace(config, allowed_hosts=(*config.allowed_hosts, host))
    return config


def _graceful_server_class():
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, but a stop signal is handled, not re-raised: uvicorn raises the
        signal again after its graceful shutdown, so SIGTERM ended the process with status
        -15 however cleanly it had stopped. Here the first SIGTERM/SIGINT starts the
        graceful stop (listening sockets closed, in-flight requests given the grace period,
        then cancelled, then the engine stopped) and the process exits 0; a second SIGINT
        forces the exit."""

        @contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self._stop) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def _stop(self, sig: int, frame) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            log.info("received %s: stopping (in-flight requests get %s s)",
                     signal.Signals(sig).name, self.config.timeout_graceful_shutdown)

    return GracefulServer


def _header_timeout_protocol(timeout_s: float):
    """uvicorn's h11 protocol with a deadline on request headers: uvicorn times out idle
    keep-alive connections but never a client that connects and sends nothing, or sends
    its headers a byte at a time. The deadline is armed when a connection opens and after
    each response (waiting for the next request), disarmed once h11 has parsed a request's
    headers; when it fires the connection is closed."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_deadline = self.loop.call_later(timeout_s, self._headers_too_slow)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm_header_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._disarm_header_deadline()
                self._header_deadline = self.loop.call_later(timeout_s, self._headers_too_slow)

        def connection_lost(self, exc) -> None:
            self._disarm_header_deadline()
            super().connection_lost(exc)

        def _disarm_header_deadline(self) -> None:
            deadline = getattr(self, "_header_deadline", None)
            if deadline is not None:
                deadline.cancel()
                self._header_deadline = None

        def _headers_too_slow(self) -> None:
            self._header_deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.info("closed a connection whose request headers did not arrive within "
                         "%g s (numgpt serve --header-timeout)", timeout_s)
                self.transport.close()

    return HeaderTimeoutProtocol
