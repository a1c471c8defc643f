"""Continuous batching: one model, one KV cache with ``max_batch`` slots, one worker thread.

The HTTP server (``numgpt.serve.server``) turns each completion request into one ``Request`` per
sequence (``n`` choices x prompts) and submits them here; this module knows nothing about
HTTP and is tested without it.

One scheduler iteration (``Engine.step``)::

    drop cancelled sequences (free their slots)
    admit queued sequences into free slots: prefill the prompts into their slots (prompts
        of equal length in one forward call; an identical prompt is computed once and its
        cache rows copied) and choose each first token from its prompt's last logits
    one batched decode step: feed every active slot's newest token at its own position,
        logits (A, V) -> each row's next token with its own params and generator

so a request that arrives while others decode joins the running batch at the next step,
and a finished one leaves it (its slot is free for the next admission). Each sequence is
one ``numgpt.infer.decoder.SequenceDecoder`` (token choice with generator
``sample_rng(seed, index)``, end-of-text, stop strings, max tokens, released text), the
decoder offline ``sample.generate`` drives, so a greedy or seeded request gets the tokens
offline generation gives. The engine's decoders use ``slide=None``: where offline
generation slides its context window past ``block_size``, the server ends the sequence
with finish reason ``"length"``.

Each ``Request`` reports through its ``emit`` callback, called on the worker thread:
``PromptEvent`` (prompt logprobs, only when asked), ``TokenEvent`` per released token, and
exactly one ``FinishEvent`` (reason ``stop``, ``length``, ``cancelled`` or ``error``).

The model's logits are checked for each sequence before its decoder sees them: a checkpoint
can hold finite weights whose forward pass overflows float32 (a LayerNorm scale of 3e38),
and NaN logits would otherwise be sampled as token 0 and sent as ``NaN`` log-probabilities,
which is not JSON. Such a sequence ends with reason ``error`` and ``code``
``NON_FINITE_LOGITS``, a one-line message meant for the client; the others go on.

Shapes: ``A`` active slots, ``V`` vocabulary size, ``T`` prompt length.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import InputError, NumGPTError
from ..infer.decoder import ReleasedToken, SequenceDecoder
from ..infer.sample import SamplingParams, allowed_tokens, token_logprobs
from .metrics import Counter, Gauge, Histogram, Registry

__all__ = ["Engine", "EngineMetrics", "Request", "TokenEvent", "PromptEvent", "FinishEvent",
           "QueueFull", "NonFiniteLogits", "MAX_LOGPROBS", "NON_FINITE_LOGITS"]

log = logging.getLogger("numgpt.serve.engine")

MAX_LOGPROBS = 5  # OpenAI's limit on top alternatives per token


class QueueFull(NumGPTError):
    """The engine's waiting queue has no room; the caller should retry later (HTTP 503)."""


NON_FINITE_LOGITS = "non_finite_logits"  # FinishEvent.code of a sequence whose logits overflowed


class NonFiniteLogits(NumGPTError):
    """The model's logits for a sequence hold NaN or infinity (its weights overflow)."""


def check_finite_logits(logits: np.ndarray, where: str) -> None:
    """NonFiniteLogits naming ``where`` unless every logit (V,) or (T, V) is finite."""
    if not np.isfinite(logits).all():
        bad = int(np.count_nonzero(~np.isfinite(logits)))
        raise NonFiniteLogits(
            f"the model's logits {where} are not finite ({bad} of {logits.size} are NaN or "
            f"infinite): its forward pass overflows float32, though each weight is finite "
            f"(for example a LayerNorm scale near 3e38); this checkpoint's weights need fixing")


# ---------------------------------------------------------------------------- events


# One generated token released to the client (token_id, text, text_offset, logprob, top):
# the decoder's released token, sent as it is.
TokenEvent = ReleasedToken


@dataclass(frozen=True)
class PromptEvent:
    """Log-probabilities of the prompt tokens (``echo`` with ``logprobs``): entry 0 is None
    (nothing precedes the first token), entry t scores prompt token t given tokens < t."""

    logprobs: list[float | None]
    top: list[tuple[tuple[int, float], ...] | None]


@dataclass(frozen=True)
class FinishEvent:
    """The sequence ended. text: any text still held (a partial character at the end).
    completion_tokens: tokens the model generated for it (including an end-of-text token
    or the tokens of a stop string, which are not shown)."""

    reason: str  # "stop" | "length" | "cancelled" | "error"
    text: str
    completion_tokens: int
    message: str = ""
    code: str = ""  # set (e.g. NON_FINITE_LOGITS) when ``message`` is meant for the client


Event = TokenEvent | PromptEvent | FinishEvent


# --------------------------------------------------------------------------- request


@dataclass(eq=False)
class Request:
    """One sequence to generate. ``index`` is the sample index within its request: the
    generator is ``sample_rng(params.seed, index)``, as for sample ``index`` offline."""

    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams
    emit: Callable[[Event], None]
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: no logprobs; k: chosen token + top k alternatives
    prompt_logprobs: bool = False
    index: int = 0
    # engine-owned state
    cancelled: bool = field(default=False, init=False)
    done: bool = field(default=False, init=False)  # its FinishEvent was sent
    slot: int | None = field(default=None, init=False)
    decoder: SequenceDecoder | None = field(default=None, init=False)  # made at admission

    @property
    def generated(self) -> int:
        """Tokens generated so far (an end-of-text token included)."""
        return self.decoder.generated if self.decoder is not None else 0


# --------------------------------------------------------------------------- metrics


class EngineMetrics:
    """What the engine measures; the server renders ``registry`` at ``/metrics``."""

    def __init__(self, registry: Registry | None = None):
        r = self.registry = registry if registry is not None else Registry()
        self.tokens = r.add(Counter("numgpt_tokens_generated_total", "Tokens generated."))
        self.prompt_tokens = r.add(Counter("numgpt_prompt_tokens_total", "Prompt tokens prefilled."))
        self.finished = r.add(Counter("numgpt_sequences_finished_total",
                                      "Sequences finished, by reason.", ["reason"]))
        self.queue_depth = r.add(Gauge("numgpt_queue_depth", "Sequences waiting for a slot."))
        self.active = r.add(Gauge("numgpt_active_slots", "Sequences holding a KV-cache slot."))
        self.steps = r.add(Counter("numgpt_decode_steps_total", "Batched decode steps run."))
        self.batch = r.add(Histogram("numgpt_decode_batch_size", "Sequences per decode step.",
                                     [1, 2, 4, 8, 16, 32, 64, 128]))
        self.batch_max = r.add(Gauge("numgpt_decode_batch_size_max",
                                     "Largest decode batch seen since start."))
        self.token_time = r.add(Histogram(
            "numgpt_time_per_token_seconds",
            "Time between a sequence's tokens: the decode step that produced each token.",
            [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]))
        self.prefill_time = r.add(Histogram(
            "numgpt_prefill_seconds",
            "Time of one prefill call (the prompts of one length admitted together).",
            [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30]))


# ---------------------------------------------------------------------------- engine


class Engine:
    """The continuous-batching scheduler around one model (see the module docstring).

    model: a ``GPT`` (with ``model.tokenizer`` for stop strings, end-of-text, ascii-only).
    max_batch: KV-cache slots, i.e. sequences decoded together.
    max_queue: sequences allowed to wait for a slot; ``submit`` raises QueueFull beyond it.
    max_len: positions per slot (default block_size); a sequence that fills its slot ends
        with reason "length".
    """

    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, max_len: int | None = None,
                 metrics: EngineMetrics | None = None):
        if max_batch < 1 or max_queue < 1:
            raise InputError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.model = model
        self.tokenizer = getattr(model, "tokenizer", None)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.cache = model.new_cache(max_batch, max_len)
        self.max_len = self.cache.max_len
        self.metrics = metrics if metrics is not None else EngineMetrics()
        self._slots: list[Request | None] = [None] * max_batch
        self._queue: deque[Request] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._allowed: dict[bool, np.ndarray | None] = {}

    # ------------------------------------------------------------ public interface
    def submit(self, requests: list[Request]) -> None:
        """Queue sequences, all or none: QueueFull when they do not fit in the queue,
        InputError when one cannot be served (empty prompt, no room in the context)."""
        for r in requests:
            self._check(r)
        with self._cv:
            if len(self._queue) + len(requests) > self.max_queue:
                raise QueueFull(f"{len(self._queue)} sequences are waiting and the queue holds "
                                f"{self.max_queue}; retry shortly")
            self._queue.extend(requests)
            self.metrics.queue_depth.set(len(self._queue))
            self._cv.notify()

    def cancel(self, request: Request) -> None:
        """Stop a sequence (e.g. its client went away); its slot is freed at the next step."""
        if not request.done:
            request.cancelled = True
            with self._cv:
                self._cv.notify()

    def start(self) -> "Engine":
        """Run the scheduler on a daemon worker thread until ``stop``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="numgpt-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the current step, cancel everything left, and join the worker."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        for r in [*self._queue, *(s for s in self._slots if s is not None)]:
            r.cancelled = True
        self._drop_cancelled()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return sum(s is not None for s in self._slots)

    def idle(self) -> bool:
        return not self._queue and self.active == 0

    # ---------------------------------------------------------------- scheduler
    def step(self) -> int:
        """One scheduler iteration: drop cancelled, admit, one batched decode step.
        Returns the decode batch size (0 when nothing was active). Call it directly only
        when no worker thread runs (tests)."""
        self._drop_cancelled()
        self._admit()
        active = [s for s, r in enumerate(self._slots) if r is not None]
        if active:
            self._decode(active)
        self.metrics.active.set(self.active)
        return len(active)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and self.idle():
                    self._cv.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # never let the worker die: fail the sequences involved
                log.exception("engine step failed")
                self._fail_all("internal error while generating")

    def _check(self, r: Request) -> None:
        n = len(r.prompt_ids)
        if n == 0:
            raise InputError("the prompt is empty; give at least one token")
        if r.max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, got {r.max_new_tokens}")
        room = self.max_len if r.max_new_tokens == 0 else self.max_len - 1
        if n > room:  # a score-only sequence (max_new_tokens 0) may fill the whole slot
            raise InputError(f"the prompt has {n} tokens but the context holds {self.max_len}, "
                             f"leaving no room to generate; shorten the prompt")
        if r.logprobs is not None and not 0 <= r.logprobs <= MAX_LOGPROBS:
            raise InputError(f"logprobs must lie in [0, {MAX_LOGPROBS}], got {r.logprobs}")
        if (r.stop or r.params.ascii_only) and self.tokenizer is None:
            raise InputError("stop strings and ascii_only need a tokenizer; this model has none")

    def _allowed_for(self, params: SamplingParams) -> np.ndarray | None:
        """The drawable-token mask offline generation uses (ascii-only, padded vocab)."""
        key = params.ascii_only
        if key not in self._allowed:
            self._allowed[key] = allowed_tokens(self.model, self.tokenizer, params)
        return self._allowed[key]

    def _drop_cancelled(self) -> None:
        with self._cv:
            waiting = [r for r in self._queue if r.cancelled]
            for r in waiting:
                self._queue.remove(r)
            self.metrics.queue_depth.set(len(self._queue))
        for r in waiting:
            self._finish(r, "cancelled")
        for r in self._slots:
            if r is not None and r.cancelled:
                self._finish(r, "cancelled")

    def _admit(self) -> None:
        """Move queued sequences into free slots, prefill them, choose their first tokens."""
        admitted = self._take_free_slots()
        if not admitted:
            return
        logits, failed = self._prefill_all(admitted)
        for r in admitted:
            try:
                if r in failed:
                    raise failed[r]
                self._start(r)
                if r.decoder.finished:  # max_new_tokens 0: scored (prompt logprobs) only
                    self._finish(r, r.decoder.finish_reason)
                else:
                    self._advance(r, logits[r])
            except NonFiniteLogits as e:  # the model's fault, said in one line
                log.error("%s", e)
                self._finish(r, "error", str(e), code=NON_FINITE_LOGITS)
            except Exception as e:  # a bad sequence fails alone, the batch goes on
                log.error("prefill failed: %s: %s", type(e).__name__, e, exc_info=e)
                self._finish(r, "error", f"{type(e).__name__}: {e}")

    def _take_free_slots(self) -> list[Request]:
        """Pop queued sequences into the free slots (lowest slot first)."""
        taken = []
        with self._cv:
            while self._queue and None in self._slots:
                r = self._queue.popleft()
                slot = self._slots.index(None)
                r.slot, self._slots[slot] = slot, r
                taken.append(r)
            self.metrics.queue_depth.set(len(self._queue))
        return taken

    def _prefill_all(self, admitted: list[Request]) -> tuple[dict, dict]:
        """Fill the admitted sequences' slots with their prompts.

        Distinct prompts of equal length go through the model together, one forward call
        per length (each weight matrix is read once for all of them); a prompt equal to
        another one admitted now is not recomputed, its cache rows are copied. A sequence
        that wants prompt logprobs is prefilled alone, with the logits of every position.
        Returns ({request: logits after its prompt (V,)}, {request: exception}).
        """
        logits: dict[Request, np.ndarray] = {}
        failed: dict[Request, Exception] = {}
        first: dict[tuple[int, ...], Request] = {}
        by_length: dict[int, list[Request]] = {}
        for r in admitted:
            if r.prompt_logprobs:
                self._run_prefill([r], logits, failed)
            elif first.setdefault(tuple(r.prompt_ids), r) is r:
                by_length.setdefault(len(r.prompt_ids), []).append(r)
        for group in by_length.values():
            self._run_prefill(group, logits, failed)
        for r in admitted:
            src = first.get(tuple(r.prompt_ids))
            if r in logits or r in failed or src is None:
                continue
            if src in failed:
                failed[r] = failed[src]
                continue
            T = len(r.prompt_ids)  # nothing is decoded during admission: src holds just the prompt
            self.cache.k[:, r.slot, :, :T] = self.cache.k[:, src.slot, :, :T]  # (L, nh, T, hs)
            self.cache.v[:, r.slot, :, :T] = self.cache.v[:, src.slot, :, :T]
            self.cache.lengths[r.slot] = T
            logits[r] = logits[src]
        return logits, failed

    def _run_prefill(self, group: list[Request], logits: dict, failed: dict) -> None:
        """One forward call over prompts of one length, each in its own slot."""
        t0 = time.perf_counter()
        rows = np.asarray([r.slot for r in group], dtype=np.int64)  # (G,)
        every = group[0].prompt_logprobs  # only ever a group of one
        try:
            self.cache.reset(rows)
            ids = np.asarray([r.prompt_ids for r in group], dtype=np.int64)  # (G, T)
            out = self.model.forward_cached(ids, self.cache, rows=rows, all_logits=every)
        except Exception as e:
            for r in group:
                failed[r] = e
            return
        if every:
            try:
                check_finite_logits(out[0], "over the prompt")  # (T, V)
            except NonFiniteLogits as e:
                failed[group[0]] = e
                return
            self._emit_prompt_logprobs(group[0], out[0])  # (T, V)
            out = out[:, -1]  # (G, V)
        for r, row in zip(group, out):
            logits[r] = row
        self.metrics.prompt_tokens.inc(ids.size)
        self.metrics.prefill_time.observe(time.perf_counter() - t0)

    def _emit_prompt_logprobs(self, r: Request, logits: np.ndarray) -> None:
        """logits (T, V): row t predicts prompt token t + 1."""
        ids = r.prompt_ids
        lps: list[float | None] = [None]
        tops: list = [None]
        if len(ids) > 1:
            res = token_logprobs(logits[:-1], np.asarray(ids[1:]), r.logprobs or 0)
            lps += [float(x) for x in res.logprob]
            tops += [tuple(zip(t.tolist(), p.tolist())) for t, p in zip(res.top_ids, res.top_logprobs)]
        self._send(r, PromptEvent(lps, tops))

    def _start(self, r: Request) -> None:
        """The sequence's decoder: it ends with "length" when its slot is full (slide=None)."""
        r.decoder = SequenceDecoder(r.prompt_ids, r.max_new_tokens, r.params,
                                    context=self.max_len, slide=None, index=r.index, stop=r.stop,
                                    tokenizer=self.tokenizer, allowed=self._allowed_for(r.params),
                                    logprobs=r.logprobs)

    def _decode(self, active: list[int]) -> None:
        """Feed each active slot's newest token; choose every row's next token."""
        t0 = time.perf_counter()
        rows = np.asarray(active, dtype=np.int64)  # (A,)
        # with slide=None a running decoder's feed is always its one newest token
        feeds = [self._slots[s].decoder.feed.tokens for s in active]
        tokens = np.asarray(feeds, dtype=np.int64)  # (A, 1)
        logits = self.model.forward_cached(tokens, self.cache, rows=rows)  # (A, V)
        dt = time.perf_counter() - t0
        m = self.metrics
        m.steps.inc()
        m.batch.observe(len(active))
        m.batch_max.set_max(len(active))
        m.token_time.observe(dt, times=len(active))
        for i, s in enumerate(active):
            r = self._slots[s]
            if r.cancelled:
                self._finish(r, "cancelled")
                continue
            try:
                self._advance(r, logits[i])
            except NonFiniteLogits as e:  # this row only: the batch goes on
                log.error("%s", e)
                self._finish(r, "error", str(e), code=NON_FINITE_LOGITS)

    def _advance(self, r: Request, logits: np.ndarray) -> None:
        """Hand the sequence its logits (V,): send the tokens its decoder releases, and
        finish it when the decoder has."""
        check_finite_logits(logits, f"for generated token {r.generated + 1}")
        released = r.decoder.step(logits)
        self.metrics.tokens.inc()
        for token in released:
            self._send(r, token)
        if r.decoder.finished:
            self._finish(r, r.decoder.finish_reason)

    def _finish(self, r: Request, reason: str, message: str = "", code: str = "") -> None:
        """End a sequence once: free its slot and send its FinishEvent."""
        if r.done:
            return
        r.done = True
        if r.slot is not None and self._slots[r.slot] is r:
            self._slots[r.slot] = None
            self.cache.lengths[r.slot] = 0
        tail = r.decoder.close(reason) if r.decoder is not None else ""
        self.metrics.finished.inc(reason=reason)
        self.metrics.active.set(self.active)
        self._send(r, FinishEvent(reason, tail, r.generated, message, code))

    def _fail_all(self, message: str) -> None:
        for r in [s for s in self._slots if s is not None]:
            self._finish(r, "error", message)

    def _send(self, r: Request, event: Event) -> None:
        """Hand an event to the request's callback; a failing callback cancels it."""
        try:
            r.emit(event)
        except Exception:
            log.exception("event callback failed; cancelling the sequence")
            r.cancelled = True
