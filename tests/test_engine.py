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
    """Wraps a model and records (rows, tokens per row) of each forward_cached call."""

    def __init__(self, model):
        self.model, self.calls = model, []
        self.config, self.tokenizer = model.config, model.tokenizer

    def new_cache(self, *a, **kw):
        return self.model.new_cache(*a, **kw)

    def forward_cached(self, idx, cache, rows=None, **kw):
        self.calls.append((list(np.asarray(rows).tolist()), np.asarray(idx).shape[1]))
        return self.model.forward_cached(idx, cache, rows=rows, **kw)


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
    assert spy.calls == [([0], 5), ([0], 1), ([0], 1)]  # prefill, then decode alone
    b, rec_b = make("second!", 10, SamplingParams(1.0, seed=4))
    engine.submit([b])
    spy.calls.clear()
    engine.step()
    # b is prefilled into the free slot 1 and decoded in the same step as a
    assert spy.calls == [([1], 7), ([0, 1], 1)]
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
    engine.step()  # prefill gives short's first token, the decode its second: it finishes
    assert (short.slot, long_.slot) == (0, 1) and engine.queue_depth == 1
    assert rec_s.finish is not None and engine.active == 1
    engine.step()  # the waiting request takes the freed slot 0
    assert waiting.slot == 0 and engine.queue_depth == 0
    assert ([0], 2) in spy.calls and spy.calls[-1] == ([0, 1], 1)
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
    assert len(rec_gone.tokens) == 4  # one token from the prefill, one per step before the cancel


def test_cancel_of_a_waiting_request_never_runs_it(model):
    spy = RowsSpy(model)
    engine = Engine(spy, max_batch=1)
    first, _ = make("one", 3)
    second, rec = make("two", 3)
    engine.submit([first, second])
    engine.cancel(second)
    run_until_idle(engine)
    assert rec.finish.reason == "cancelled" and rec.tokens == []
    assert all(rows == [0] for rows, _ in spy.calls) and len(spy.calls) == 3


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
    assert [c for c in spy.calls if c[1] > 1] == [([0], 13)], "one prefill for three sequences"
    run_until_idle(engine)
    for j, (_, rec) in enumerate(made):
        assert rec.tokens == generate(model, list(b"shared prompt"), 6, params,
                                      rng=sample_rng(9, j))
    assert made[0][1].tokens != made[1][1].tokens


def test_prompts_of_one_length_are_prefilled_in_one_call(model):
    spy = RowsSpy(model)
    engine = Engine(spy, max_batch=4)
    texts = ["abcd", "wxyz", "a longer one", "1234"]
    made = [make(t, 5) for t in texts]
    engine.submit([r for r, _ in made])
    engine.step()
    prefills = sorted(c for c in spy.calls if c[1] > 1)
    assert prefills == [([0, 1, 3], 4), ([2], 12)]
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
