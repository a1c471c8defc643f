"""The continuous-batching engine without HTTP.

The reference is offline generation (``numgpt.infer.sample.generate``), which runs each prompt
alone through its own loop and its own single-slot cache: a sequence decoded inside a
batch, joining late, reusing a slot or sharing a prefill must give the very same tokens.
Models are float64 so batched and single-row arithmetic cannot flip an argmax.
"""

import threading
import time

import numpy as np
import pytest

from numgpt.serve.engine import (Engine, FinishEvent, PromptEvent, QueueFull, Request, TokenEvent)
from numgpt.errors import InputError
from numgpt.core.model import GPT, GPTConfig
from numgpt.infer.sample import SamplingParams, generate, sample_rng
from numgpt.io.tokenizer import ByteTokenizer

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def model():
    m = GPT(GPTConfig(vocab_size=256, block_size=48, n_layer=2, n_head=2, n_embd=32,
                      dtype="float64"), seed=3)
    m.tokenizer = ByteTokenizer()
    return m


class Recorder:
    """Collects a request's events (the engine calls it on whatever thread runs steps)."""

    def __init__(self):
        self.events = []
        self.done = threading.Event()

    def __call__(self, ev):
        self.events.append(ev)
        if isinstance(ev, FinishEvent):
            self.done.set()

    @property
    def tokens(self):
        return [e.token_id for e in self.events if isinstance(e, TokenEvent)]

    @property
    def text(self):
        return "".join(e.text for e in self.events if isinstance(e, (TokenEvent, FinishEvent)))

    @property
    def finish(self):
        ends = [e for e in self.events if isinstance(e, FinishEvent)]
        assert len(ends) <= 1, "a sequence must finish exactly once"
        return ends[0] if ends else None


def make(text, max_new=12, params=GREEDY, **kw):
    rec = Recorder()
    return Request(list(text.encode()), max_new, params, rec, **kw), rec


def run_until_idle(engine, limit=500):
    """Step a thread-less engine until nothing is queued or active (bounded)."""
    batches = []
    for _ in range(limit):
        if engine.idle():
            return batches
        batches.append(engine.step())
    raise AssertionError(f"engine still busy after {limit} steps")


class RowsSpy:
    """Wraps a model and records each forward call the engine makes (one per step, packed):
    [(slot, new tokens), ...] per call."""

    def __init__(self, model):
        self.model, self.calls = model, []
        self.config, self.tokenizer = model.config, model.tokenizer

    def new_cache(self, *a, **kw):
        return self.model.new_cache(*a, **kw)

    def forward_packed(self, segments, cache, **kw):
        self.calls.append([(int(s), len(t)) for s, t in segments])
        return self.model.forward_packed(segments, cache, **kw)


# --------------------------------------------------------------------- equals offline


def test_batched_sequences_equal_offline_generate(model):
    specs = [("Hello", GREEDY, 0), ("The cat", SamplingParams(1.0, seed=7), 0),
             ("abc", SamplingParams(0.9, top_k=20, seed=11), 2),
             ("x", SamplingParams(1.2, top_p=0.8, seed=5), 1), ("Hello", GREEDY, 0),
             ("Longer prompt here", SamplingParams(0.7, seed=1), 3)]
    engine = Engine(model, max_batch=4, max_queue=16)
    made = [make(t, 14, p, index=i) for t, p, i in specs]
    engine.submit([r for r, _ in made])
    batches = run_until_idle(engine)
    assert max(batches) == 4, "the engine must decode several sequences in one step"
    for (text, params, index), (req, rec) in zip(specs, made):
        ref = generate(model, list(text.encode()), 14, params, rng=sample_rng(params.seed, index))
        assert rec.tokens == ref, (text, params)
        assert rec.finish.reason == "length" and rec.finish.completion_tokens == 14
        assert rec.text == bytes(ref).decode("utf-8", "replace")


def test_offline_comparison_detects_a_wrong_generator(model):
    """Negative control: the same request with another sample index draws other tokens,
    so the equality above is not vacuous."""
    params = SamplingParams(1.0, seed=7)
    engine = Engine(model, max_batch=2)
    req, rec = make("The cat", 14, params, index=1)
    engine.submit([req])
    run_until_idle(engine)
    assert rec.tokens != generate(model, list(b"The cat"), 14, params, rng=sample_rng(7, 0))
    assert rec.tokens == generate(model, list(b"The cat"), 14, params, rng=sample_rng(7, 1))


# ------------------------------------------------------------------ join, reuse, cancel


def test_request_joins_the_running_batch_at_the_next_step(model):
    spy = RowsSpy(model)
    engine = Engine(spy, max_batch=4)
    a, rec_a = make("first", 10)
    engine.submit([a])
    engine.step()
    engine.step()
    assert spy.calls == [[(0, 5)], [(0, 1)]]  # the prompt, then its decode alone
    b, rec_b = make("second!", 10, SamplingParams(1.0, seed=4))
    engine.submit([b])
    spy.calls.clear()
    engine.step()
    # b's prompt goes into the free slot 1 in the same forward call as a's decode row
    assert spy.calls == [[(0, 1), (1, 7)]]
    engine.step()
    assert spy.calls[-1] == [(0, 1), (1, 1)]  # then both decode together
    run_until_idle(engine)
    assert rec_a.tokens == generate(model, list(b"first"), 10, GREEDY)
    assert rec_b.tokens == generate(model, list(b"second!"), 10, SamplingParams(1.0, seed=4))


def test_a_finished_slot_is_reused_by_a_waiting_request(model):
    spy = RowsSpy(model)
    engine = Engine(spy, max_batch=2)
    short, rec_s = make("aa", 2)
    long_, rec_l = make("bb", 8)
    waiting, rec_w = make("cc", 5)
    engine.submit([short, long_, waiting])
    engine.step()  # both prompts in one call: each gets its first token
    engine.step()  # a decode step gives short its second token: it finishes
    assert (short.slot, long_.slot) == (0, 1) and engine.queue_depth == 1
    assert rec_s.finish is not None and engine.active == 1
    engine.step()  # the waiting request takes the freed slot 0
    assert waiting.slot == 0 and engine.queue_depth == 0
    assert spy.calls[0] == [(0, 2), (1, 2)] and spy.calls[-1] == [(1, 1), (0, 2)]
    run_until_idle(engine)
    for text, n, rec in (("aa", 2, rec_s), ("bb", 8, rec_l), ("cc", 5, rec_w)):
        assert rec.tokens == generate(model, list(text.encode()), n, GREEDY)


def test_cancel_frees_the_slot_and_the_others_continue(model):
    engine = Engine(model, max_batch=2)
    gone, rec_gone = make("leave", 30)
    stay, rec_stay = make("stay", 12)
    queued, rec_q = make("never", 5)
    engine.submit([gone, stay, queued])
    for _ in range(3):
        engine.step()
    engine.cancel(gone)
    engine.step()
    assert rec_gone.finish.reason == "cancelled"
    assert queued.slot == gone.slot, "the freed slot goes to the waiting request"
    engine.cancel(queued)
    engine.step()
    assert rec_q.finish.reason == "cancelled" and engine.active == 1
    run_until_idle(engine)
    assert rec_stay.tokens == generate(model, list(b"stay"), 12, GREEDY)
    assert engine.active == 0 and engine.metrics.active.value() == 0
    assert engine.metrics.finished.value(reason="cancelled") == 2
    assert len(rec_gone.tokens) == 3  # one per step before the cancel (the first step's from its prompt)


def test_cancel_of_a_waiting_request_never_runs_it(model):
    spy = RowsSpy(model)
    engine = Engine(spy, max_batch=1)
    first, _ = make("one", 3)
    second, rec = make("two", 3)
    engine.submit([first, second])
    engine.cancel(second)
    run_until_idle(engine)
    assert rec.finish.reason == "cancelled" and rec.tokens == []
    assert [[s for s, _ in call] for call in spy.calls] == [[0]] * 3  # first's prompt, 2 decodes


# ---------------------------------------------------------------- limits and endings


def test_queue_full_is_all_or_nothing(model):
    engine = Engine(model, max_batch=1, max_queue=3)
    engine.submit([make("a")[0], make("b")[0]])
    with pytest.raises(QueueFull, match="queue holds 3"):
        engine.submit([make("c")[0], make("d")[0]])
    assert engine.queue_depth == 2
    engine.submit([make("c")[0]])
    assert engine.queue_depth == 3


def test_prompts_that_leave_no_room_are_refused(model):
    engine = Engine(model, max_batch=1)
    with pytest.raises(InputError, match="48 tokens but the context holds 48"):
        engine.submit([make("x" * 48)[0]])
    with pytest.raises(InputError, match="empty"):
        engine.submit([make("")[0]])
    assert engine.queue_depth == 0


def test_generation_that_fills_the_context_ends_with_length(model):
    engine = Engine(model, max_batch=2)
    prompt = "y" * 45  # block_size 48: room for 3 new tokens
    req, rec = make(prompt, 20)
    engine.submit([req])
    run_until_idle(engine)
    assert rec.finish.reason == "length" and len(rec.tokens) == 3
    assert rec.tokens == generate(model, list(prompt.encode()), 3, GREEDY)


def test_stop_string_ends_like_offline_generate(model):
    free = generate(model, list(b"Hello"), 20, GREEDY)
    text = bytes(free).decode("latin-1")
    stop = text[4:6]  # a string the greedy continuation contains
    engine = Engine(model, max_batch=2)
    req, rec = make("Hello", 20, stop=(stop, "\x00never"))
    engine.submit([req])
    run_until_idle(engine)
    ref = generate(model, list(b"Hello"), 20, GREEDY, stop=[stop, "\x00never"])
    assert rec.finish.reason == "stop"
    assert rec.tokens == ref and stop not in rec.text and len(ref) < len(free)


class EotBytes(ByteTokenizer):
    """A byte tokenizer whose byte ``eot`` plays end-of-text."""

    def __init__(self, eot):
        self.eot_id = eot


def test_end_of_text_finishes_with_stop_and_is_not_shown():
    m = GPT(GPTConfig(vocab_size=256, block_size=48, n_layer=2, n_head=2, n_embd=32,
                      dtype="float64"), seed=3)
    m.tokenizer = ByteTokenizer()
    free = generate(m, list(b"Hello"), 12, GREEDY)
    m.tokenizer = EotBytes(free[5])
    engine = Engine(m, max_batch=1)
    req, rec = make("Hello", 12)
    engine.submit([req])
    run_until_idle(engine)
    cut = free.index(free[5])
    assert rec.finish.reason == "stop" and rec.tokens == free[:cut]
    assert rec.finish.completion_tokens == cut + 1  # the end-of-text token was generated
    assert rec.tokens == generate(m, list(b"Hello"), 12, GREEDY)


def test_identical_prompts_share_one_prefill(model):
    spy = RowsSpy(model)
    engine = Engine(spy, max_batch=4)
    params = SamplingParams(1.0, seed=9)
    made = [make("shared prompt", 6, params, index=j) for j in range(3)]
    engine.submit([r for r, _ in made])
    engine.step()
    engine.step()
    assert spy.calls[0] == [(0, 13)], "one prefill for three sequences"
    assert spy.calls[1] == [(0, 1), (1, 1), (2, 1)], "the others copied its keys and values"
    assert engine.metrics.prefix_hits.value(source="identical") == 2
    run_until_idle(engine)
    for j, (_, rec) in enumerate(made):
        assert rec.tokens == generate(model, list(b"shared prompt"), 6, params,
                                      rng=sample_rng(9, j))
    assert made[0][1].tokens != made[1][1].tokens


def test_prompts_of_any_lengths_are_prefilled_in_one_call(model):
    spy = RowsSpy(model)
    engine = Engine(spy, max_batch=4)
    texts = ["abcd", "wxyz", "a longer one", "1234"]
    made = [make(t, 5) for t in texts]
    engine.submit([r for r, _ in made])
    engine.step()
    assert spy.calls == [[(0, 4), (1, 4), (2, 12), (3, 4)]]
    run_until_idle(engine)
    for text, (_, rec) in zip(texts, made):
        assert rec.tokens == generate(model, list(text.encode()), 5, GREEDY)


# ------------------------------------------------------------------------- logprobs


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_logprobs_equal_a_full_forward(model):
    """Token and prompt logprobs against log-softmax of the uncached reference forward."""
    engine = Engine(model, max_batch=2)
    req, rec = make("Hi there", 6, logprobs=3, prompt_logprobs=True)
    engine.submit([req])
    run_until_idle(engine)
    ids = list(b"Hi there") + rec.tokens
    logits, _ = model(np.asarray([ids]))
    ref = _log_softmax(logits.data[0])  # (T, V): row t predicts token t + 1
    prompt = next(e for e in rec.events if isinstance(e, PromptEvent))
    assert prompt.logprobs[0] is None and prompt.top[0] is None
    np.testing.assert_allclose(prompt.logprobs[1:], [ref[t, ids[t + 1]] for t in range(7)],
                               atol=1e-10)
    tokens = [e for e in rec.events if isinstance(e, TokenEvent)]
    for i, ev in enumerate(tokens):
        row = ref[7 + i]
        assert abs(ev.logprob - row[ev.token_id]) < 1e-10
        assert [t for t, _ in ev.top] == list(np.argsort(-row, kind="stable")[:3])
        assert ev.text_offset == i  # one character per byte token here
    with pytest.raises(AssertionError):  # negative control: off by one position
        np.testing.assert_allclose(tokens[1].logprob, ref[7][tokens[1].token_id], atol=1e-10)


# ------------------------------------------------------------------ the worker thread


def test_worker_thread_serves_concurrent_submitters(model):
    engine = Engine(model, max_batch=4, max_queue=32).start()
    try:
        made = [make(f"prompt {i}", 10, GREEDY if i % 2 else SamplingParams(1.0, seed=i))
                for i in range(10)]
        threads = [threading.Thread(target=engine.submit, args=([r],)) for r, _ in made]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        for _, rec in made:
            assert rec.done.wait(20), "a request never finished"
        for req, rec in made:
            assert rec.tokens == generate(model, req.prompt_ids, 10, req.params)
        deadline = time.monotonic() + 5
        while engine.metrics.active.value() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.metrics.active.value() == 0
        assert engine.metrics.batch_max.value() > 1
    finally:
        engine.stop()
    assert not engine._thread.is_alive()


def test_a_failing_callback_cancels_only_its_sequence(model):
    engine = Engine(model, max_batch=2)

    def broken(ev):
        raise RuntimeError("client went away badly")

    bad = Request(list(b"bad"), 10, GREEDY, broken)
    good, rec = make("good", 6)
    engine.submit([bad, good])
    run_until_idle(engine)
    assert bad.done and rec.tokens == generate(model, list(b"good"), 6, GREEDY)


# ------------------------------------------------------------------ chunked prefill

PROMPT = "A prompt long enough to be read in several chunks."  # 50 byte tokens


@pytest.fixture(scope="module")
def long_model():
    """The module's model shape with room for 128 positions."""
    m = GPT(GPTConfig(vocab_size=256, block_size=128, n_layer=2, n_head=2, n_embd=32,
                      dtype="float64"), seed=3)
    m.tokenizer = ByteTokenizer()
    return m


def _serve_one(model, text, max_new, params, chunk, logprobs=2, prompt_logprobs=True, **kw):
    """tokens, token logprobs and prompt logprobs of one request on a fresh engine."""
    engine = Engine(model, max_batch=2, prefill_chunk=chunk, idle_chunk=chunk, **kw)
    req, rec = make(text, max_new, params, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
    engine.submit([req])
    run_until_idle(engine)
    prompt = [e for e in rec.events if isinstance(e, PromptEvent)]
    lps = [e.logprob for e in rec.events if isinstance(e, TokenEvent)]
    return rec.tokens, np.asarray(lps), (np.asarray(prompt[0].logprobs[1:]) if prompt else None)


@pytest.mark.parametrize("params", [GREEDY, SamplingParams(1.0, seed=5)], ids=["greedy", "seeded"])
def test_chunked_prompt_gives_the_tokens_and_logprobs_of_the_whole_prompt(long_model, params):
    """Chunk sizes 1 to past the prompt: the same tokens (and offline generate's), token and
    prompt logprobs within 1e-12 (float64: only the packed row count's rounding differs)."""
    whole = _serve_one(long_model, PROMPT, 10, params, chunk=256)
    assert whole[0] == generate(long_model, list(PROMPT.encode()), 10, params)
    for chunk in (1, 2, 3, 7, 16, 49, 50):
        tokens, lps, prompt_lps = _serve_one(long_model, PROMPT, 10, params, chunk=chunk)
        assert tokens == whole[0], chunk
        np.testing.assert_allclose(lps, whole[1], rtol=0, atol=1e-12)
        np.testing.assert_allclose(prompt_lps, whole[2], rtol=0, atol=1e-12)


def test_chunked_prompt_float32_tokens_equal_and_logprobs_within_rounding():
    m = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=32), seed=3)
    m.tokenizer = ByteTokenizer()
    whole = _serve_one(m, PROMPT, 10, GREEDY, chunk=256)
    for chunk in (1, 5, 16):
        tokens, lps, prompt_lps = _serve_one(m, PROMPT, 10, GREEDY, chunk=chunk)
        assert tokens == whole[0]
        np.testing.assert_allclose(lps, whole[1], rtol=0, atol=1e-6)  # measured worst 6e-8
        np.testing.assert_allclose(prompt_lps, whole[2], rtol=0, atol=1e-6)


def test_a_long_prompt_is_read_in_chunks_while_the_streams_keep_decoding(model):
    spy = RowsSpy(model)
    engine = Engine(spy, max_batch=3, prefill_chunk=8)
    stream, rec_s = make("stream", 20)
    engine.submit([stream])
    engine.step()
    newcomer, rec_n = make(PROMPT[:30], 5)  # 30 tokens: 4 steps of at most 8
    engine.submit([newcomer])
    spy.calls.clear()
    got_before = len(rec_s.tokens)
    for _ in range(4):
        engine.step()
    assert spy.calls == [[(0, 1), (1, 8)], [(0, 1), (1, 8)], [(0, 1), (1, 8)], [(0, 1), (1, 6)]]
    assert len(rec_s.tokens) == got_before + 4, "the stream got a token at every step"
    assert len(rec_n.tokens) == 1, "the newcomer's first token comes with its last chunk"
    engine.step()
    assert spy.calls[-1] == [(0, 1), (1, 1)]
    run_until_idle(engine)
    assert rec_s.tokens == generate(model, list(b"stream"), 20, GREEDY)
    assert rec_n.tokens == generate(model, list(PROMPT[:30].encode()), 5, GREEDY)


def test_with_nothing_decoding_a_step_reads_up_to_the_idle_budget(model):
    """No stream waits on a step without decode rows: the prompt is read in larger pieces
    (fewer passes over the weights), still chunked past the idle budget."""
    spy = RowsSpy(model)
    engine = Engine(spy, max_batch=2, prefill_chunk=4, idle_chunk=16)
    req, rec = make(PROMPT[:40], 3)
    engine.submit([req])
    run_until_idle(engine)
    assert [c[0][1] for c in spy.calls] == [16, 16, 8, 1, 1]
    assert rec.tokens == generate(model, list(PROMPT[:40].encode()), 3, GREEDY)
    assert Engine(model, prefill_chunk=600, idle_chunk=10).idle_chunk == 600  # never below


def test_the_chunk_budget_is_shared_oldest_prompt_first(model):
    spy = RowsSpy(model)
    engine = Engine(spy, max_batch=3, prefill_chunk=10, idle_chunk=10)
    made = [make(t, 3) for t in ("first prompt", "second", "third one")]  # 12, 6, 9 tokens
    engine.submit([r for r, _ in made])
    engine.step()
    engine.step()
    assert spy.calls == [[(0, 10)], [(0, 2), (1, 6), (2, 2)]]
    run_until_idle(engine)
    for (req, rec), text in zip(made, ("first prompt", "second", "third one")):
        assert rec.tokens == generate(model, list(text.encode()), 3, GREEDY)


def test_cancelling_the_prompt_others_wait_on_hands_it_to_them(model):
    """n > 1 equal prompts: the first computes it; cancelled midway, the next one takes over
    from where it stopped (the 4 positions computed are copied, not computed again)."""
    spy = RowsSpy(model)
    engine = Engine(spy, max_batch=3, prefill_chunk=4, idle_chunk=4)
    params = SamplingParams(1.0, seed=2)
    made = [make(PROMPT[:12], 4, params, index=j) for j in range(3)]
    engine.submit([r for r, _ in made])
    engine.step()
    assert spy.calls == [[(0, 4)]]
    engine.cancel(made[0][0])
    for _ in range(3):
        engine.step()
    assert spy.calls[1:] == [[(1, 4)], [(1, 4)], [(1, 1), (2, 1)]]
    run_until_idle(engine)
    assert made[0][1].finish.reason == "cancelled"
    for j in (1, 2):
        assert made[j][1].tokens == generate(model, list(PROMPT[:12].encode()), 4, params,
                                             rng=sample_rng(2, j))


def test_a_failing_step_fails_its_sequences_and_the_engine_goes_on(model):
    class Broken(RowsSpy):
        fail = True

        def forward_packed(self, segments, cache, **kw):
            if self.fail:
                self.fail = False
                raise RuntimeError("kernel exploded")
            return super().forward_packed(segments, cache, **kw)

    engine = Engine(Broken(model), max_batch=2)
    bad, rec_bad = make("bad", 4)
    engine.submit([bad])
    engine.step()
    assert rec_bad.finish.reason == "error" and "kernel exploded" in rec_bad.finish.message
    good, rec = make("bad", 4)  # the same prompt: the failed step left nothing to reuse
    engine.submit([good])
    run_until_idle(engine)
    assert rec.tokens == generate(model, list(b"bad"), 4, GREEDY)
    assert engine.metrics.prefix_misses.value() == 2


# -------------------------------------------------------------------- prefix reuse

SHARED = "The same long context every answer choice is sent with: "  # 56 byte tokens


def test_a_free_slots_prefix_is_reused_and_changes_nothing(long_model):
    """The second prompt shares 56 tokens with the first one's slot: only its rest is
    computed, and its tokens and logprobs equal a fresh engine's within 1e-12 (float64)."""
    spy = RowsSpy(long_model)
    engine = Engine(spy, max_batch=2, max_len=None)
    first, _ = make(SHARED + "A", 3, logprobs=2)
    engine.submit([first])
    run_until_idle(engine)
    second, rec = make(SHARED + "Bc", 3, logprobs=2)
    spy.calls.clear()
    engine.submit([second])
    run_until_idle(engine)
    assert spy.calls[0] == [(0, 2)], "only the 2 new prompt tokens are computed"
    assert engine.metrics.prefix_hits.value(source="slot") == 1
    assert engine.metrics.reused_tokens.value() == len(SHARED)
    fresh = _serve_one(long_model, SHARED + "Bc", 3, GREEDY, chunk=256, prompt_logprobs=False)
    assert rec.tokens == fresh[0] == generate(long_model, list((SHARED + "Bc").encode()), 3, GREEDY)
    np.testing.assert_allclose([e.logprob for e in rec.events if isinstance(e, TokenEvent)],
                               fresh[1], rtol=0, atol=1e-12)


def test_prompts_admitted_together_share_their_common_prefix(long_model):
    """Two prompts sharing 56 tokens arrive together: the second waits while the first
    computes them, copies them, and computes only its own end; both equal offline generate."""
    spy = RowsSpy(long_model)
    engine = Engine(spy, max_batch=2, prefill_chunk=16, idle_chunk=16)
    made = [make(SHARED + tail, 3) for tail in ("Alpha", "Beta")]  # 61 and 60 tokens
    engine.submit([r for r, _ in made])
    for _ in range(5):
        engine.step()
    assert spy.calls == [[(0, 16)], [(0, 16)], [(0, 16)], [(0, 13)], [(0, 1), (1, 4)]], \
        "slot 1 copies the 56 positions slot 0 computed, then computes its own 4"
    assert engine.metrics.prefix_hits.value(source="shared") == 1
    assert engine.metrics.reused_tokens.value() == len(SHARED)
    run_until_idle(engine)
    for (req, rec), tail in zip(made, ("Alpha", "Beta")):
        assert rec.tokens == generate(long_model, list((SHARED + tail).encode()), 3, GREEDY)


def test_a_corrupted_reused_row_fails_the_exactness_gate(long_model):
    """Negative control: the same reuse with one cached key row changed gives other logprobs,
    so the equality above really reads the reused keys."""
    engine = Engine(long_model, max_batch=1)
    first, _ = make(SHARED + "A", 3, logprobs=2)
    engine.submit([first])
    run_until_idle(engine)
    engine.cache.k[0, 0, :, 10] += 1.0  # (L, slots, nh, max_len, hs): layer 0, position 10
    second, rec = make(SHARED + "Bc", 3, logprobs=2)
    engine.submit([second])
    run_until_idle(engine)
    assert engine.metrics.prefix_hits.value(source="slot") == 1
    fresh = _serve_one(long_model, SHARED + "Bc", 3, GREEDY, chunk=256, prompt_logprobs=False)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose([e.logprob for e in rec.events if isinstance(e, TokenEvent)],
                                   fresh[1], rtol=0, atol=1e-12)


def test_the_pool_keeps_an_overwritten_slots_prefix(long_model):
    def run(mb):
        spy = RowsSpy(long_model)
        engine = Engine(spy, max_batch=1, prefix_cache_mb=mb)
        for text in (SHARED + "A", "something else", SHARED + "Bc"):
            req, rec = make(text, 3)
            engine.submit([req])
            run_until_idle(engine)
        return engine, spy, rec
    engine, spy, rec = run(1.0)
    assert spy.calls[-3][0] == (0, 2), "the last prompt copied 56 tokens from the pool"
    assert engine.metrics.prefix_hits.value(source="pool") == 1
    assert rec.tokens == generate(long_model, list((SHARED + "Bc").encode()), 3, GREEDY)
    per_token = 2 * 2 * 32 * 8  # k and v, 2 layers, n_embd 32, float64
    assert engine.metrics.pool_bytes.value() == engine.pool.bytes > 0
    assert engine.pool.bytes == per_token * (len(SHARED) + 1 + 2 + len("something else") + 2)
    off, spy_off, rec_off = run(0)
    assert spy_off.calls[-3][0] == (0, len(SHARED) + 2) and off.pool.bytes == 0
    assert off.metrics.prefix_misses.value() == 3 and rec_off.tokens == rec.tokens


def test_the_prefix_pool_is_bounded_and_least_recently_used_goes_first():
    from numgpt.serve.engine import PrefixPool
    kv = np.zeros((1, 1, 4, 2))  # (L, nh, n, hs): 64 bytes, 128 with v
    pool = PrefixPool(3 * 128)
    for start in (0, 10, 20):
        pool.add(list(range(start, start + 4)), kv, kv)
    assert pool.bytes == 384 and len(pool) == 3
    assert pool.longest([10, 11, 12, 99]) == (3, (10, 11, 12, 13))
    pool.get((0, 1, 2, 3))  # now the most recently used
    pool.add([30, 31, 32, 33], kv, kv)
    assert pool.longest([10, 11])[0] == 0, "the least recently used entry was dropped"
    assert pool.longest([0, 1])[0] == 2 and pool.bytes == 384
    pool.add([0, 1], kv[:, :, :2], kv[:, :, :2])  # covered by (0, 1, 2, 3): not stored twice
    assert len(pool) == 3
    pool.add([30, 31, 32, 33, 34], np.zeros((1, 1, 5, 2)), np.zeros((1, 1, 5, 2)))
    assert (30, 31, 32, 33) not in pool._entries, "an entry the new one extends is dropped"
    assert pool.bytes <= pool.capacity
    PrefixPool(100).add([1, 2, 3, 4], kv, kv)  # larger than the pool: ignored, no error
    few = PrefixPool(10**6, max_entries=2)
    for start in (0, 10, 20):
        few.add(list(range(start, start + 4)), kv, kv)
    assert len(few) == 2 and few.longest([0, 1])[0] == 0, "the oldest of 3 went"


# ------------------------------------------------------------------------- metrics


def test_time_to_first_token_and_inter_token_latency_are_per_sequence(model):
    engine = Engine(model, max_batch=4, prefill_chunk=7)
    made = [make(t, 6) for t in ("one", "two two", "three three three")]
    engine.submit([r for r, _ in made])
    run_until_idle(engine)
    m = engine.metrics
    assert m.ttft.count() == 3 and m.itl.count() == 3 * 5
    prompt = sum(len(r.prompt_ids) for r, _ in made)
    assert m.prompt_tokens.value() == prompt
    text = m.registry.render()
    assert "numgpt_time_to_first_token_seconds_count 3" in text
    assert "numgpt_inter_token_latency_seconds_count 15" in text
    assert f"numgpt_step_prefill_tokens_sum {prompt}" in text
    assert "numgpt_prefix_cache_misses_total 3" in text


# ------------------------------------------------- prefix reuse with prompt logprobs


def _scored(engine, text, max_new=0):
    """Submit a prompt-logprobs request (top 2) and run it: (PromptEvent, recorder)."""
    req, rec = make(text, max_new, logprobs=2, prompt_logprobs=True)
    engine.submit([req])
    run_until_idle(engine)
    assert rec.finish.reason == "length", rec.finish
    return next(e for e in rec.events if isinstance(e, PromptEvent)), rec


def _assert_same_prompt_event(got, want, atol=1e-12):
    assert got.logprobs[0] is None and len(got.logprobs) == len(want.logprobs)
    np.testing.assert_allclose(got.logprobs[1:], want.logprobs[1:], rtol=0, atol=atol)
    for g, w in zip(got.top[1:], want.top[1:]):
        assert [t for t, _ in g] == [t for t, _ in w]
        np.testing.assert_allclose([p for _, p in g], [p for _, p in w], rtol=0, atol=atol)


def test_scoring_requests_reuse_the_shared_context_and_its_scores(long_model):
    """lm-evaluation-harness sends one context with each answer (echo + logprobs, max_tokens
    0): the second answer computes only its own tokens, and its prompt logprobs equal a
    fresh engine's within 1e-12 (float64), tops included."""
    spy = RowsSpy(long_model)
    engine = Engine(spy, max_batch=2)
    _scored(engine, SHARED + " Paris")
    spy.calls.clear()
    got, _ = _scored(engine, SHARED + " Rome")
    # SHARED and the space are shared; the space is computed again (its logits score 'R')
    assert spy.calls == [[(0, 5)]], "only ' Rome' is computed"
    assert engine.metrics.reused_tokens.value() == len(SHARED)
    fresh, _ = _scored(Engine(long_model, max_batch=1), SHARED + " Rome")
    _assert_same_prompt_event(got, fresh)
    got_gen, rec = _scored(engine, SHARED + " Oslo", max_new=4)  # and generating after it
    assert rec.tokens == generate(long_model, list((SHARED + " Oslo").encode()), 4, GREEDY)
    _assert_same_prompt_event(got_gen, _scored(Engine(long_model), SHARED + " Oslo", 4)[0])


def test_a_corrupted_reused_score_fails_the_gate(long_model):
    """Negative control: the reused scores are what the answer sends."""
    engine = Engine(long_model, max_batch=1)
    _scored(engine, SHARED + " Paris")
    engine._scores[0].logprob[7] += 0.5
    got, _ = _scored(engine, SHARED + " Rome")
    fresh, _ = _scored(Engine(long_model, max_batch=1), SHARED + " Rome")
    with pytest.raises(AssertionError):
        _assert_same_prompt_event(got, fresh)


def test_scores_are_dropped_past_where_a_later_prompt_differs(long_model):
    """A plain request that shares 20 tokens with the slot keeps only scores 0..18; the next
    scoring request (sharing all of SHARED with the first) may reuse only those, and its
    logprobs still equal a fresh engine's."""
    spy = RowsSpy(long_model)
    engine = Engine(spy, max_batch=1, prefix_cache_mb=0)
    _scored(engine, SHARED + " Paris")
    req, _ = make(SHARED[:20] + "something else", 3)
    engine.submit([req])
    run_until_idle(engine)
    assert engine._scores[0].n == 19
    spy.calls.clear()
    got, _ = _scored(engine, SHARED + " Rome")
    assert spy.calls[0] == [(0, len(SHARED) + 5 - 19)]
    _assert_same_prompt_event(got, _scored(Engine(long_model, max_batch=1), SHARED + " Rome")[0])


def test_the_pool_keeps_scores_with_the_keys_and_values(long_model):
    spy = RowsSpy(long_model)
    engine = Engine(spy, max_batch=1, prefix_cache_mb=1)
    _scored(engine, SHARED + " Paris")
    req, _ = make("unrelated", 2)
    engine.submit([req])
    run_until_idle(engine)
    spy.calls.clear()
    got, _ = _scored(engine, SHARED + " Rome")
    assert spy.calls[0] == [(0, 5)] and engine.metrics.prefix_hits.value(source="pool") == 1
    _assert_same_prompt_event(got, _scored(Engine(long_model, max_batch=1), SHARED + " Rome")[0])


# ------------------------------------------------------------- a random workload


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 6, 21])  # 6, 21: a pool entry dropped mid-admission
def test_a_random_workload_equals_offline_generation(long_model, seed):
    """Prompts sharing prefixes in different ways, n > 1 equal prompts, prompt logprobs,
    cancellations, arrivals at random steps, random chunk budgets and pool sizes: every
    sequence's tokens equal offline generate's (a cancelled one's are a prefix of them), and
    its token and prompt logprobs equal log-softmax of the uncached reference forward within
    1e-10 (float64). Exercises slot reuse, the pool, scores and leaders together."""
    rng = np.random.default_rng(seed)
    engine = Engine(long_model, max_batch=3, max_queue=64,
                    prefill_chunk=int(rng.integers(1, 9)), idle_chunk=int(rng.integers(1, 24)),
                    prefix_cache_mb=float(rng.choice([0.0, 0.02, 1.0])))
    bases = ["The quick brown fox ", "The quick red ", "Lorem ipsum dolor sit "]
    made, cancelled = [], set()
    for _ in range(80):
        if rng.random() < 0.35 and len(made) < 24:
            text = bases[rng.integers(3)] + "".join(rng.choice(list("ab "), rng.integers(0, 5)))
            scored = bool(rng.random() < 0.35)
            params = GREEDY if rng.random() < 0.5 else SamplingParams(1.0, seed=int(rng.integers(99)))
            max_new = int(rng.integers(0 if scored else 1, 6))
            group = [make(text, max_new, params, index=j, logprobs=2, prompt_logprobs=scored)
                     for j in range(int(rng.integers(1, 3)))]
            engine.submit([r for r, _ in group])
            made += group
        if made and rng.random() < 0.06:
            victim = made[int(rng.integers(len(made)))][0]
            engine.cancel(victim)
            cancelled.add(id(victim))
        engine.step()
    run_until_idle(engine)
    assert len(made) > 8
    for req, rec in made:
        text = bytes(req.prompt_ids).decode()
        want = generate(long_model, req.prompt_ids, req.max_new_tokens, req.params,
                        rng=sample_rng(req.params.seed, req.index))
        if rec.finish.reason == "cancelled":
            assert id(req) in cancelled and rec.tokens == want[:len(rec.tokens)], text
            continue
        assert rec.finish.reason == "length" and rec.tokens == want, (text, rec.finish)
        ids = req.prompt_ids + rec.tokens
        ref = _log_softmax(long_model(np.asarray([ids]))[0].data[0])  # (T, V): row t -> t + 1
        T = len(req.prompt_ids)
        lps = [e.logprob for e in rec.events if isinstance(e, TokenEvent)]
        np.testing.assert_allclose(lps, [ref[T - 1 + i, t] for i, t in enumerate(rec.tokens)],
                                   rtol=0, atol=1e-10)
        prompt = [e for e in rec.events if isinstance(e, PromptEvent)]
        assert len(prompt) == req.prompt_logprobs
        if prompt:
            np.testing.assert_allclose(prompt[0].logprobs[1:],
                                       [ref[t, ids[t + 1]] for t in range(T - 1)], rtol=0, atol=1e-10)
            for t, top in enumerate(prompt[0].top[1:]):
                assert [i for i, _ in top] == list(np.argsort(-ref[t], kind="stable")[:2])
    m = engine.metrics
    assert m.prefix_hits.value(source="slot") + m.prefix_hits.value(source="pool") > 0
