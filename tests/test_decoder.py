"""The per-sequence decoder that offline generation and the server's engine both drive.

Two kinds of check:
* driven by hand with the *uncached* full forward over the tokens the decoder asks the
  model to see (its ``feed``), a decoder gives exactly the tokens of offline ``generate``
  (which drives it through the KV cache), for both context policies;
* driven with hand-made logits, each ending rule and the released text are checked
  token by token (end-of-text, stop strings, max tokens, UTF-8 split over tokens, logprobs).
Each has a negative control or a refused input.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from numgpt.core.checks import log_softmax64
from numgpt.core.model import GPT, GPTConfig
from numgpt.errors import InputError
from numgpt.infer.decoder import Feed, SequenceDecoder
from numgpt.infer.sample import ContextSlideWarning, SamplingParams, generate
from numgpt.io.tokenizer import ByteTokenizer

GREEDY = SamplingParams(temperature=0.0)
V = 256


@pytest.fixture(scope="module")
def model() -> GPT:
    m = GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=32,
                      dtype="float64"), seed=0)
    for name, p in m.parameters().items():  # scale GPT-2 init up so the outputs vary
        if name.endswith("weight") and ".ln_" not in name and not name.startswith("ln_f"):
            p.data *= 4.0
    return m


def drive(model: GPT, decoder: SequenceDecoder) -> tuple[list[int], list[Feed]]:
    """Step a decoder to its end with the uncached forward over exactly the tokens its
    feeds put in its slot. Returns the released token ids and every feed it asked for."""
    visible: list[int] = []
    released, feeds = [], []
    while not decoder.finished:
        feed = decoder.feed
        feeds.append(feed)
        visible = list(feed.tokens) if feed.prefill else visible + list(feed.tokens)
        assert len(visible) <= decoder.context, "the model was asked to see past the context"
        logits, _ = model.forward(np.asarray([visible]))
        released += [t.token_id for t in decoder.step(logits.data[0, -1])]
    return released, feeds


def onehot(token: int) -> np.ndarray:
    """Logits (V,) whose argmax is ``token``: a greedy decoder chooses it."""
    z = np.zeros(V)
    z[token] = 10.0
    return z


class EotBytes(ByteTokenizer):
    def __init__(self, eot_id: int):
        self.eot_id = eot_id


# ----------------------------------------------------------------- equals generate


def test_a_decoder_stepped_by_hand_equals_generate(model):
    tok = ByteTokenizer()
    prompt = [3, 1, 4, 1, 5]
    params = SamplingParams(temperature=1.0, top_k=40, seed=5)
    for stop in (None, ["q", "!"]):
        ref = generate(model, prompt, 9, params, stop=stop, tokenizer=tok)
        d = SequenceDecoder(prompt, 9, params, context=16, slide=8, stop=stop, tokenizer=tok)
        got, feeds = drive(model, d)
        assert got == ref
        assert feeds[0] == Feed(prompt, True) and all(not f.prefill for f in feeds[1:])
    # negative control: sample index 1 draws from another generator, other tokens
    other, _ = drive(model, SequenceDecoder(prompt, 9, params, context=16, slide=8, index=1,
                                            tokenizer=tok))
    assert other != generate(model, prompt, 9, params, tokenizer=tok)


def test_slide_policy_slides_and_length_policy_ends(model):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]  # 10 tokens, context 16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ContextSlideWarning)
        ref = generate(model, prompt, 30, GREEDY, window=8)
    slide = SequenceDecoder(prompt, 30, GREEDY, context=16, slide=8)
    got, feeds = drive(model, slide)
    assert got == ref and slide.finish_reason == "length" and slide.generated == 30
    refills = [f for f in feeds[1:] if f.prefill]
    assert slide.slides == len(refills) > 1 and all(len(f.tokens) == 8 for f in refills)
    # the first slide comes when the slot holds all 16 positions and a token must be fed
    first = feeds.index(refills[0])
    assert len(prompt) + first - 1 == 16

    ended = SequenceDecoder(prompt, 30, GREEDY, context=16, slide=None)
    short, feeds = drive(model, ended)
    # prompt + completion never outgrow the context: 6 new tokens, finish "length"
    assert ended.finish_reason == "length" and short == ref[:6] and len(short) == 6
    assert not any(f.prefill for f in feeds[1:]) and ended.feed is None
    assert short != got  # control: the two policies are told apart


# ------------------------------------------------------------- rules, by hand


def test_end_of_text_is_counted_not_released_and_stops():
    d = SequenceDecoder([65], 10, GREEDY, context=16, tokenizer=EotBytes(0))
    assert [t.token_id for t in d.step(onehot(66))] == [66]
    assert d.step(onehot(0)) == [] and d.finish_reason == "stop" and d.generated == 2
    # control: with stop_at_eot off the same token is an ordinary token
    d = SequenceDecoder([65], 10, GREEDY, context=16, tokenizer=EotBytes(0), stop_at_eot=False)
    assert [t.token_id for t in d.step(onehot(0))] == [0] and not d.finished


def test_stop_string_holds_tokens_back_and_drops_it():
    d = SequenceDecoder([65], 10, GREEDY, context=16, stop="cd", tokenizer=ByteTokenizer())
    out = [[t.token_id for t in d.step(onehot(ord(c)))] for c in "abc"]
    assert out == [[ord("a")], [ord("b")], []]  # "c" may start "cd": held
    assert d.step(onehot(ord("d"))) == [] and d.finish_reason == "stop"
    # control: a held token is released when the stop string does not follow
    d = SequenceDecoder([65], 10, GREEDY, context=16, stop="cd", tokenizer=ByteTokenizer())
    d.step(onehot(ord("c")))
    assert [t.token_id for t in d.step(onehot(ord("x")))] == [ord("c"), ord("x")]


def test_max_tokens_flushes_held_tokens_and_ends_with_length():
    d = SequenceDecoder([65], 2, GREEDY, context=16, stop="cd", tokenizer=ByteTokenizer())
    assert d.step(onehot(ord("a")))[0].token_id == ord("a")
    assert [t.token_id for t in d.step(onehot(ord("c")))] == [ord("c")]
    assert d.finish_reason == "length" and d.feed is None
    with pytest.raises(InputError, match="already finished"):
        d.step(onehot(1))
    zero = SequenceDecoder([65], 0, GREEDY, context=16)
    assert zero.finished and zero.finish_reason == "length" and zero.feed is None


def test_released_text_keeps_a_split_character_whole_and_counts_offsets():
    d = SequenceDecoder([65], 10, GREEDY, context=16, tokenizer=ByteTokenizer())
    texts = [(t.text, t.text_offset) for c in "aé!".encode() for t in d.step(onehot(c))]
    assert texts == [("a", 0), ("", 1), ("é", 1), ("!", 2)]
    d.step(onehot(0xC3))  # half a character, then the sequence is cancelled
    assert d.close("cancelled") == "\ufffd" and d.finish_reason == "cancelled"


def test_logprobs_are_the_models_log_softmax_of_each_released_token():
    rng = np.random.default_rng(0)
    d = SequenceDecoder([65], 10, GREEDY, context=16, stop="zz", tokenizer=ByteTokenizer(),
                        logprobs=3)
    rows = [rng.normal(size=V) for _ in range(3)]
    rows[1][ord("z")] = 50.0  # held back by the stop matcher, released with the next token
    released = [t for z in rows for t in d.step(z)]
    assert [t.token_id for t in released] == [int(np.argmax(z)) for z in rows]
    for t, z in zip(released, rows):
        ref = log_softmax64(z)
        assert t.logprob == pytest.approx(ref[t.token_id], abs=1e-12)
        assert [i for i, _ in t.top] == list(np.argsort(-ref, kind="stable")[:3])


@pytest.mark.parametrize("kwargs, words", [
    (dict(slide=0), "window must lie in \\[1, 16\\]"), (dict(slide=17), "window"),
    (dict(prompt_ids=list(range(17))), "17 tokens"), (dict(prompt_ids=[]), "0 tokens"),
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(stop=["x"]), "need a tokenizer"),
    (dict(params=SamplingParams(temperature=0, ascii_only=True)), "allowed mask")])
def test_bad_decoder_arguments_raise_input_error(kwargs, words):
    args = dict(prompt_ids=[1, 2], max_new_tokens=3, params=GREEDY, context=16)
    args.update(kwargs)
    with pytest.raises(InputError, match=words):
        SequenceDecoder(args.pop("prompt_ids"), args.pop("max_new_tokens"), args.pop("params"),
                        **args)
