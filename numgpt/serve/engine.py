"""Continuous batching: one model, one KV cache with ``max_batch`` slots, one worker thread.

The HTTP server (``numgpt.serve.app``) turns each completion request into one ``Request`` per
sequence (``n`` choices x prompts) and submits them here; this module knows nothing about
HTTP and is tested without it.

One scheduler iteration (``Engine.step``) is one forward call (``GPT.forward_packed``)::

    drop cancelled sequences (free their slots)
    admit queued sequences into free slots, reusing cached prompt prefixes (below)
    pack: every running slot's newest token (one row each), then prompt chunks of the
        admitted sequences, oldest first, up to ``prefill_chunk`` prompt tokens in all
        (``idle_chunk`` when no sequence is decoding: then no stream waits on the step)
    one packed forward: each weight matrix is read once for the decode rows and the
        chunks together; logits only for the decode rows and for prompts whose last
        chunk this was (every prompt position when prompt logprobs are asked)
    each decode row's next token; a prompt that is now complete gets its first token

so a request that arrives while others decode joins the running batch at the next step,
a finished one leaves it (its slot is free for the next admission), and a long prompt is
read ``prefill_chunk`` tokens per step while the running streams keep getting one token
per step, instead of freezing them for its whole prefill (llama-server and vLLM schedule
the same way). Chunking changes no output: the keys and values a chunk writes are the
ones the whole prompt would write, to the rounding of the packed row count (exact in
float64 to 1e-12; tests/test_engine.py runs chunk sizes 1 to the prompt length).

Prompt-prefix reuse (llama-server's ``cache_prompt``, vLLM's prefix caching): a free slot
keeps the tokens whose keys and values it holds, and a new sequence takes the free slot
whose tokens share the longest prefix with its prompt, then prefills only the rest. A
slot's tokens about to be overwritten go to a pool of recent prefixes (copies of their
keys and values, least recently used dropped first, at most ``prefix_cache_mb``; 0 turns
the pool off), which a later prompt can copy from. At least the last prompt token is
always computed (its logits choose the first token). A sequence that wants prompt logprobs
(scoring: lm-evaluation-harness sends one context with every answer) needs each position's
log-probabilities too: slots and pool entries keep, beside the keys and values, the scores
(``Scores``: the next token's log-probability and the top alternatives) an earlier
prompt-logprobs pass computed, and such a sequence reuses only positions whose scores are
kept. Prompts admitted while another one is being computed wait for what they share with
it (at least ``MIN_SHARED_PREFIX`` tokens) and copy it; an equal prompt (``n`` > 1 choices)
copies the whole prompt and its last logits, computing nothing.

Each sequence is one ``numgpt.infer.decoder.SequenceDecoder`` (token choice with generator
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

Shapes: ``A`` active slots, ``V`` vocabulary size, ``T`` prompt length, ``L`` layers,
``nh`` heads, ``hs`` head size.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..core.checks import check_token_ids
from ..errors import InputError, NumGPTError
from ..infer.decoder import ReleasedToken, SequenceDecoder
from ..infer.sample import SamplingParams, allowed_tokens
from .metrics import Counter, Gauge, Histogram, Registry
from .prefix import PrefixPool, Scores, common_prefix

__all__ = ["Engine", "EngineMetrics", "Request", "TokenEvent", "PromptEvent", "FinishEvent",
           "QueueFull", "NonFiniteLogits", "PrefixPool", "Scores", "MAX_LOGPROBS",
           "NON_FINITE_LOGITS", "DEFAULT_PREFILL_CHUNK", "IDLE_PREFILL_CHUNK",
           "DEFAULT_PREFIX_CACHE_MB"]

log = logging.getLogger("numgpt.serve.engine")

MAX_LOGPROBS = 5  # OpenAI's limit on top alternatives per token
# Prompt tokens one step may carry besides its decode rows. The streams' inter-token latency
# is set by the steps that carry a chunk: on a shared 2-core AMD EPYC (load about 3, best of
# 5) a 124M step with 15 decode rows measured 160-240 ms alone, 350 ms with a 32-token chunk,
# 460 ms with 64 and 730 ms with 256. 64 keeps such a step near 2x a decode step while a
# 1000-token prompt still takes only 16 steps (llama-server reads up to -b 2048 at once).
DEFAULT_PREFILL_CHUNK = 64
# With nothing decoding there is no stream to keep flowing: a step then reads up to this many
# prompt tokens (at least prefill_chunk). A lone 960-token 124M prompt measured about 30%
# slower read in chunks of 64 than in one pass, and level with it in chunks of 256 (same
# shared EPYC, best of 2); 512 also leaves a request that arrives meanwhile a short wait.
IDLE_PREFILL_CHUNK = 512
# A prompt admitted while another one sharing at least this many leading tokens is being
# computed waits for those and copies them (below it, computing them costs less than a step).
MIN_SHARED_PREFIX = 16
DEFAULT_PREFIX_CACHE_MB = 256.0  # the pool of recent prompt prefixes (0: slots' own reuse only)


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
    prefilled: int = field(default=0, init=False)  # prompt tokens in its slot's cache
    leader: "Request | None" = field(default=None, init=False)  # a prompt being computed it copies
    share: int = field(default=0, init=False)  # positions it copies from its leader
    submitted: float = field(default=0.0, init=False)  # perf_counter at submit
    last_token_at: float | None = field(default=None, init=False)  # its newest token's time

    @property
    def prompt_done(self) -> bool:
        return self.prefilled == len(self.prompt_ids)

    @property
    def generated(self) -> int:
        """Tokens generated so far (an end-of-text token included)."""
        return self.decoder.generated if self.decoder is not None else 0


# --------------------------------------------------------------------------- metrics

_SECONDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]


class EngineMetrics:
    """What the engine measures; the server renders ``registry`` at ``/metrics``."""

    def __init__(self, registry: Registry | None = None):
        r = self.registry = registry if registry is not None else Registry()
        self.tokens = r.add(Counter("numgpt_tokens_generated_total", "Tokens generated."))
        self.prompt_tokens = r.add(Counter(
            "numgpt_prompt_tokens_total", "Prompt tokens computed (prefilled), reused ones not counted."))
        self.finished = r.add(Counter("numgpt_sequences_finished_total",
                                      "Sequences finished, by reason.", ["reason"]))
        self.queue_depth = r.add(Gauge("numgpt_queue_depth", "Sequences waiting for a slot."))
        self.active = r.add(Gauge("numgpt_active_slots", "Sequences holding a KV-cache slot."))
        self.steps = r.add(Counter("numgpt_decode_steps_total", "Steps that decoded at least one sequence."))
        self.batch = r.add(Histogram("numgpt_decode_batch_size",
                                     "Decode tokens per step (sequences decoded together).",
                                     [1, 2, 4, 8, 16, 32, 64, 128]))
        self.batch_max = r.add(Gauge("numgpt_decode_batch_size_max",
                                     "Largest decode batch seen since start."))
        self.step_prefill = r.add(Histogram(
            "numgpt_step_prefill_tokens", "Prompt tokens computed per step (0: a decode-only step).",
            [0, 1, 16, 64, 128, 256, 512, 1024, 2048]))
        self.token_time = r.add(Histogram(
            "numgpt_time_per_token_seconds",
            "Time of the step that produced each generated token.", _SECONDS))
        self.prefill_time = r.add(Histogram(
            "numgpt_prefill_seconds",
            "Time of one step that carried prompt tokens (its decode rows included).",
            [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30]))
        self.ttft = r.add(Histogram(
            "numgpt_time_to_first_token_seconds",
            "Per sequence: from submission (queueing included) to its first generated token.",
            _SECONDS + [30, 60]))
        self.itl = r.add(Histogram(
            "numgpt_inter_token_latency_seconds",
            "Per sequence: time between two consecutive generated tokens.", _SECONDS))
        self.prefix_hits = r.add(Counter(
            "numgpt_prefix_cache_hits_total",
            "Sequences that reused cached prompt keys/values, by where they came from "
            "(slot: a free slot's own; pool: the prefix pool; identical: an equal prompt "
            "being computed; shared: the start of a prompt being computed).", ["source"]))
        self.prefix_misses = r.add(Counter(
            "numgpt_prefix_cache_misses_total", "Sequences that found no cached prompt prefix."))
        self.reused_tokens = r.add(Counter(
            "numgpt_prompt_tokens_reused_total", "Prompt tokens whose keys/values were reused."))
        self.pool_bytes = r.add(Gauge("numgpt_prefix_cache_bytes",
                                      "Bytes of keys/values held by the prefix pool."))
        self.pool_entries = r.add(Gauge("numgpt_prefix_cache_entries", "Prefixes in the pool."))


def matmul_line(model) -> str:
    """One line for the server's start: what multiplies a step's packed rows by the weights
    (the GEMM library and its kernel per row count; for q8_0 weights, the q8_0 kernel)."""
    from ..core import quant
    try:
        from ..core import gemm
    except ImportError:  # a core without the GEMM-library choice
        gemm = None
    describe = getattr(gemm, "describe", None)
    parts = [f"matmul: {describe()}" if describe else "matmul: NumPy's BLAS (np.matmul)"]
    if quant.is_quantized(model):
        plan = getattr(quant, "kernel_plan", None)  # the q8_0 kernel per row count
        parts.append(plan() if plan else "q8_0 weights: core.quant.linear")
    return "; ".join(parts)


# ---------------------------------------------------------------------------- engine


class Engine:
    """The continuous-batching scheduler around one model (see the module docstring).

    model: a ``GPT`` (with ``model.tokenizer`` for stop strings, end-of-text, ascii-only).
    max_batch: KV-cache slots, i.e. sequences decoded together.
    max_queue: sequences allowed to wait for a slot; ``submit`` raises QueueFull beyond it.
    max_len: positions per slot (default block_size); a sequence that fills its slot ends
        with reason "length".
    prefill_chunk: prompt tokens one step may compute besides its decode rows.
    idle_chunk: prompt tokens a step with no decode rows may compute (at least prefill_chunk).
    prefix_cache_mb: bytes (in MiB) of the pool of recent prompt prefixes; 0 turns it off
        (a free slot's own tokens are still reused).
    """

    def __init__(self, model, max_batch: int = 8, max_queue: int = 64, max_len: int | None = None,
                 metrics: EngineMetrics | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
                 idle_chunk: int = IDLE_PREFILL_CHUNK):
        if max_batch < 1 or max_queue < 1:
            raise InputError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        if prefill_chunk < 1:
            raise InputError(f"prefill_chunk must be >= 1 prompt token per step, got {prefill_chunk}")
        if not prefix_cache_mb >= 0:
            raise InputError(f"prefix_cache_mb must be >= 0 (0 turns the pool off), got {prefix_cache_mb}")
        self.model = model
        self.tokenizer = getattr(model, "tokenizer", None)
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, int(prefill_chunk)
        self.idle_chunk = max(int(prefill_chunk), int(idle_chunk))
        self.cache = model.new_cache(max_batch, max_len)
        self.max_len = self.cache.max_len
        self.metrics = metrics if metrics is not None else EngineMetrics()
        self.pool = PrefixPool(int(prefix_cache_mb * 2**20))
        self._slots: list[Request | None] = [None] * max_batch
        self._held: list[list[int]] = [[] for _ in range(max_batch)]  # tokens each slot's cache holds
        self._scores = [Scores.empty(self.max_len, MAX_LOGPROBS) for _ in range(max_batch)]  # and theirs
        self._prefilling: list[Request] = []  # computing their prompts, oldest first
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
            now = time.perf_counter()
            for r in requests:
                r.submitted = now
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
        """One scheduler iteration: drop cancelled, admit, one packed forward of the decode
        rows and prompt chunks. Returns the number of decode rows (0 when none ran). Call
        it directly only when no worker thread runs (tests)."""
        self._drop_cancelled()
        self._admit()
        decode, chunks = self._plan()
        if decode or chunks:
            self._run(decode, chunks)
        self.metrics.active.set(self.active)
        return len(decode)

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
        # here, not in the packed step, where one bad prompt would fail every sequence with it
        check_token_ids(r.prompt_ids, self.model.config.vocab_size, what="prompt token ids")

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

    # ---------------------------------------------------------------- admission
    def _admit(self) -> None:
        """Move queued sequences into free slots (reusing what the caches hold) and make
        their decoders; their prompts are computed by the following packed steps."""
        free = self._slots.count(None)
        with self._cv:  # only the queue is shared with submit(); slots are this thread's
            taken = [self._queue.popleft() for _ in range(min(free, len(self._queue)))]
            self.metrics.queue_depth.set(len(self._queue))
        for r in taken:  # outside the lock: placing may copy keys and values from the pool
            self._place(r)
        for r in taken:
            try:
                self._start(r)
            except Exception as e:  # a bad sequence fails alone, the batch goes on
                log.error("admission failed: %s: %s", type(e).__name__, e, exc_info=e)
                self._finish(r, "error", f"{type(e).__name__}: {e}")

    def _place(self, r: Request) -> None:
        """Give r a free slot and what the caches can give it: the free slot sharing the
        longest prefix with its prompt (on a tie the one holding least, then the lowest),
        or a longer prefix from the pool, or, longer still, a prompt being computed to wait
        for (``_leader_for``); its cache then holds r.prefilled prompt tokens."""
        free = [s for s, x in enumerate(self._slots) if x is None]
        common = {s: common_prefix(self._held[s], r.prompt_ids) for s in free}
        shared = {s: self._reusable(r, common[s], self._scores[s].n) for s in free}
        # on a tie the slot holding least is overwritten (less goes to the pool), then the lowest
        slot = min(free, key=lambda s: (-shared[s], len(self._held[s]), s))
        n = shared[slot]
        pool_common, key = self.pool.longest(r.prompt_ids) if self.pool.capacity else (0, None)
        from_pool = 0
        if key is not None:
            pooled = self.pool.peek(key)[2]
            from_pool = self._reusable(r, pool_common, pooled.n if pooled is not None else 0)
        leader, share = self._leader_for(r, max(n, from_pool))
        if leader is not None or from_pool > n:
            n = 0
        # taken before the slot's own tokens go to the pool, which may drop this entry
        entry = self.pool.get(key) if leader is None and from_pool > n else None
        self._keep_in_pool(slot, n)
        r.slot, self._slots[slot] = slot, r
        m = self.metrics
        if leader is not None:  # waits, then copies the leader's keys and values
            r.leader, r.share, self._held[slot] = leader, share, []
            self.cache.lengths[slot] = self._scores[slot].n = 0
            m.prefix_hits.inc(source="identical" if share == len(r.prompt_ids) else "shared")
            return
        # score t stays while it scores this prompt's token t + 1: t + 1 < the common prefix
        scores = self._scores[slot]
        if entry is not None:
            k, v, pooled = entry  # (L, nh, n, hs)
            n = from_pool
            self.cache.k[:, slot, :, :n] = k[:, :, :n]
            self.cache.v[:, slot, :, :n] = v[:, :, :n]
            self._held[slot] = list(r.prompt_ids[:n])
            scores.n = 0
            if pooled is not None:
                scores.put(pooled, max(0, min(pooled.n, pool_common - 1)))
            m.prefix_hits.inc(source="pool")
        elif n:
            del self._held[slot][n:]
            scores.n = max(0, min(scores.n, common[slot] - 1))
            m.prefix_hits.inc(source="slot")
        else:
            self._held[slot] = []
            scores.n = 0
            m.prefix_misses.inc()
        m.reused_tokens.inc(n)
        self.cache.lengths[slot] = r.prefilled = n
        self._prefilling.append(r)

    def _leader_for(self, r: Request, reusable: int) -> tuple[Request | None, int]:
        """A prompt being computed that r should wait for and copy: an equal one (share: the
        whole prompt, its logits included), else the one sharing most (at least
        MIN_SHARED_PREFIX positions and more than ``reusable``, what the caches hold now)."""
        if not r.prompt_logprobs:
            for x in self._prefilling:
                if not x.prompt_logprobs and x.prompt_ids == r.prompt_ids:
                    return x, len(r.prompt_ids)
        best, share = None, max(reusable, MIN_SHARED_PREFIX - 1)
        for x in self._prefilling:
            c = common_prefix(x.prompt_ids, r.prompt_ids)
            n = self._reusable(r, c, c - 1 if x.prompt_logprobs else self._scores[x.slot].n)
            if n > share:
                best, share = x, n
        return best, share

    def _hand_over(self, f: Request, n: int) -> None:
        """f stops waiting: it copies its leader's first n positions (and the scores valid
        for its prompt) and computes the rest of its prompt itself."""
        src, slot = f.leader.slot, f.slot
        self.cache.k[:, slot, :, :n] = self.cache.k[:, src, :, :n]  # (L, nh, n, hs)
        self.cache.v[:, slot, :, :n] = self.cache.v[:, src, :, :n]
        self._held[slot] = list(f.prompt_ids[:n])
        c = common_prefix(f.leader.prompt_ids, f.prompt_ids)
        self._scores[slot].put(self._scores[src], max(0, min(self._scores[src].n, c - 1)))
        self.cache.lengths[slot] = f.prefilled = n
        f.leader, f.share = None, 0
        self._prefilling.append(f)
        self.metrics.reused_tokens.inc(n)

    @staticmethod
    def _reusable(r: Request, shared: int, scored: int) -> int:
        """Cached positions r can reuse from a cache sharing ``shared`` prompt tokens whose
        scores are known for its first ``scored`` positions. At least the last prompt token
        is computed (its logits choose the first token); a request for prompt logprobs
        reuses only positions whose scores are known and whose next token is its own."""
        last = len(r.prompt_ids) - 1
        if r.prompt_logprobs:
            return max(0, min(shared - 1, scored, last))
        return min(shared, last)

    def _keep_in_pool(self, slot: int, keep: int) -> None:
        """Before slot's tokens past ``keep`` are overwritten, copy them to the pool."""
        held = self._held[slot]
        if self.pool.capacity and len(held) > keep:
            n, scores = len(held), self._scores[slot]
            self.pool.add(held, self.cache.k[:, slot, :, :n], self.cache.v[:, slot, :, :n],
                          scores.head(scores.n) if scores.n else None)
            self.metrics.pool_bytes.set(self.pool.bytes)
            self.metrics.pool_entries.set(len(self.pool))

    def _start(self, r: Request) -> None:
        """The sequence's decoder: it ends with "length" when its slot is full (slide=None)."""
        r.decoder = SequenceDecoder(r.prompt_ids, r.max_new_tokens, r.params,
                                    context=self.max_len, slide=None, index=r.index, stop=r.stop,
                                    tokenizer=self.tokenizer, allowed=self._allowed_for(r.params),
                                    logprobs=r.logprobs)

    # -------------------------------------------------------------- the packed step
    def _plan(self) -> tuple[list[Request], list[tuple[Request, int]]]:
        """This step's decode rows (every running sequence's newest token) and prompt chunks
        ((request, tokens), oldest prompt first, at most ``prefill_chunk`` tokens in all, or
        ``idle_chunk`` when nothing decodes)."""
        for f in [f for f in self._slots if f is not None and f.leader is not None]:
            if f.share < len(f.prompt_ids) and f.leader.prefilled >= f.share:
                self._hand_over(f, f.share)  # its leader has computed what they share
        decode = [r for r in self._slots if r is not None and r.prompt_done and r.leader is None
                  and r.decoder is not None and r.decoder.feed is not None]
        chunks, budget = [], self.prefill_chunk if decode else self.idle_chunk
        for r in self._prefilling:
            if budget == 0:
                break
            n = min(len(r.prompt_ids) - r.prefilled, budget)
            chunks.append((r, n))
            budget -= n
        return decode, chunks

    def _run(self, decode: list[Request], chunks: list[tuple[Request, int]]) -> None:
        """One forward call over the decode rows and prompt chunks; hand out the logits."""
        segments, want = [], []
        for r in decode:
            feed = r.decoder.feed  # with slide=None a running decoder's feed is its newest token
            assert not feed.prefill and len(feed.tokens) == 1
            segments.append((r.slot, feed.tokens))
            want.append("last")
        for r, n in chunks:
            segments.append((r.slot, r.prompt_ids[r.prefilled:r.prefilled + n]))
            done = r.prefilled + n == len(r.prompt_ids)
            want.append("all" if r.prompt_logprobs else "last" if done else None)
        t0 = time.perf_counter()
        try:
            out = self.model.forward_packed(segments, self.cache, logits=want)
        except Exception as e:  # every sequence of this step fails; no slot keeps its new rows
            log.error("step failed: %s: %s", type(e).__name__, e, exc_info=e)
            for r in [*decode, *(r for r, _ in chunks)]:
                self._finish(r, "error", f"{type(e).__name__}: {e}")
            return
        now = time.perf_counter()
        for slot, tokens in segments:
            self._held[slot].extend(int(t) for t in tokens)
        self._observe(len(decode), sum(n for _, n in chunks), now - t0)
        for r, logits in zip(decode, out):
            if r.cancelled:
                self._finish(r, "cancelled")
                continue
            self._guarded(self._advance, r, logits)
        for (r, n), logits in zip(chunks, out[len(decode):]):
            at, r.prefilled = r.prefilled, r.prefilled + n
            if r.prompt_logprobs:  # logits (n, V): score the prompt tokens that follow them
                try:
                    check_finite_logits(logits, "over the prompt")
                except NonFiniteLogits as e:
                    log.error("%s", e)
                    self._finish(r, "error", str(e), code=NON_FINITE_LOGITS)
                    continue
                following = r.prompt_ids[at + 1:at + 1 + n]
                self._scores[r.slot].extend(at, logits[:len(following)], following)
                logits = logits[-1]
            if r.prompt_done:
                self._prefilling.remove(r)
                self._prompt_complete(r, logits)

    def _observe(self, rows: int, prompt: int, seconds: float) -> None:
        m = self.metrics
        m.step_prefill.observe(prompt)
        m.prompt_tokens.inc(prompt)
        if prompt:
            m.prefill_time.observe(seconds)
        if rows:
            m.steps.inc()
            m.batch.observe(rows)
            m.batch_max.set_max(rows)
            m.token_time.observe(seconds, times=rows)

    def _prompt_complete(self, r: Request, logits: np.ndarray) -> None:
        """r's whole prompt is in its cache; logits (V,) after its last token. Sequences
        waiting on the same prompt copy its keys and values first."""
        T = len(r.prompt_ids)
        waiting = [f for f in self._slots if f is not None and f.leader is r]
        for f in waiting:
            if f.share < len(f.prompt_ids):
                self._hand_over(f, f.share)
        followers = [f for f in waiting if f.leader is r]  # equal prompts: keys, values, logits
        for f in followers:
            self.cache.k[:, f.slot, :, :T] = self.cache.k[:, r.slot, :, :T]  # (L, nh, T, hs)
            self.cache.v[:, f.slot, :, :T] = self.cache.v[:, r.slot, :, :T]
            self.cache.lengths[f.slot] = f.prefilled = T
            self._held[f.slot] = list(r.prompt_ids)
            f.leader, f.share = None, 0
            self.metrics.reused_tokens.inc(T)
        if r.prompt_logprobs:
            self._emit_prompt_logprobs(r)
        for x in [r, *followers]:
            if x.cancelled:  # finished by the next step's _drop_cancelled
                continue
            if x.decoder.finished:  # max_new_tokens 0: scored (prompt logprobs) only
                self._finish(x, x.decoder.finish_reason)
            else:
                self._guarded(self._advance, x, logits)

    def _guarded(self, fn, r: Request, logits: np.ndarray) -> None:
        """fn(r, logits); an error ends r alone (non-finite logits: said in one line)."""
        try:
            fn(r, logits)
        except NonFiniteLogits as e:  # the model's fault, this row only: the batch goes on
            log.error("%s", e)
            self._finish(r, "error", str(e), code=NON_FINITE_LOGITS)
        except Exception as e:
            log.error("sequence failed: %s: %s", type(e).__name__, e, exc_info=e)
            self._finish(r, "error", f"{type(e).__name__}: {e}")

    def _emit_prompt_logprobs(self, r: Request) -> None:
        """From its slot's scores: entry t + 1 scores prompt token t + 1 given tokens <= t."""
        T, k, sc = len(r.prompt_ids), r.logprobs or 0, self._scores[r.slot]
        assert sc.n >= T - 1 and sc.token[:T - 1].tolist() == r.prompt_ids[1:]
        lps: list[float | None] = [None, *sc.logprob[:T - 1].tolist()]
        tops: list = [None, *(tuple(zip(t.tolist(), p.tolist()))
                              for t, p in zip(sc.top_ids[:T - 1, :k], sc.top_lps[:T - 1, :k]))]
        self._send(r, PromptEvent(lps, tops))

    def _advance(self, r: Request, logits: np.ndarray) -> None:
        """Hand the sequence its logits (V,): send the tokens its decoder releases, and
        finish it when the decoder has."""
        check_finite_logits(logits, f"for generated token {r.generated + 1}")
        released = r.decoder.step(logits)
        now = time.perf_counter()
        if r.last_token_at is None:
            self.metrics.ttft.observe(now - r.submitted)
        else:
            self.metrics.itl.observe(now - r.last_token_at)
        r.last_token_at = now
        self.metrics.tokens.inc()
        for token in released:
            self._send(r, token)
        if r.decoder.finished:
            self._finish(r, r.decoder.finish_reason)

    def _finish(self, r: Request, reason: str, message: str = "", code: str = "") -> None:
        """End a sequence once: free its slot and send its FinishEvent. Sequences waiting
        on its prompt take what it computed so far (its slot is still intact) and compute
        the rest; of those with an equal prompt, the first leads the others."""
        if r.done:
            return
        r.done = True
        if r in self._prefilling:
            self._prefilling.remove(r)
        waiting = [f for f in self._slots if f is not None and f.leader is r]
        equal = [f for f in waiting if f.share == len(f.prompt_ids)]
        for f in waiting:
            if f not in equal[1:]:
                self._hand_over(f, min(r.prefilled, f.share, len(f.prompt_ids) - 1))
        for f in equal[1:]:
            f.leader = equal[0]
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
