"""The OpenAI completions protocol without a socket: request parsing and validation
(``parse_completion``, ``parse_json_body``) and the answer folded from scripted engine events
(``CompletionFold``: the plain body and the stream's server-sent events). Byte-level tokenizer,
so every expected text and offset below is written out by hand."""

from __future__ import annotations

import json

import pytest

from numgpt.errors import NumGPTError
from numgpt.infer.sample import SamplingParams
from numgpt.io.tokenizer import ByteTokenizer
from numgpt.serve import protocol
from numgpt.serve.engine import FinishEvent, PromptEvent, TokenEvent
from numgpt.serve.protocol import (MAX_STOP, SSE_DONE, APIError, CompletionFold, CompletionSpec,
                                   parse_completion, parse_json_body, token_str)

TOK = ByteTokenizer()
NAME = "tiny"
LIMITS = dict(tokenizer=TOK, vocab_size=256, context=16, max_tokens_limit=20,
              max_n=4, max_sequences=8)


def parse(**body):
    return parse_completion(body, **LIMITS)


# ------------------------------------------------------------------------ parsing


def test_a_string_prompt_gets_the_defaults():
    spec = parse(prompt="Hi")
    assert spec.prompts == [[72, 105]] and spec.prompt_texts == ["Hi"]
    assert spec.max_tokens == 16 and spec.n == 1 and spec.stop == () and not spec.stream and not spec.echo
    assert spec.logprobs is None and not spec.include_usage
    assert spec.params == SamplingParams(temperature=1.0, top_k=None, top_p=None,
                                         ascii_only=False, seed=None)


def test_every_prompt_form_and_every_field_parse():
    spec = parse(prompt=[[1, 2], [65, 66, 67]], max_tokens=3, n=2, stop="\n", stream=True,
                 echo=True, logprobs=5, temperature=0, top_p=0.5, top_k=-1, seed=2 ** 64 - 1,
                 ascii_only=True, stream_options={"include_usage": True}, model=NAME,
                 user="ignored", frequency_penalty=0)
    assert spec.prompts == [[1, 2], [65, 66, 67]] and spec.prompt_texts == ["\x01\x02", "ABC"]
    assert (spec.max_tokens, spec.n, spec.stop, spec.stream, spec.echo, spec.logprobs,
            spec.include_usage) == (3, 2, ("\n",), True, True, 5, True)
    assert spec.params == SamplingParams(temperature=0.0, top_k=None, top_p=0.5,
                                         ascii_only=True, seed=2 ** 64 - 1)
    assert parse(prompt=[7, 8]).prompts == [[7, 8]]  # one prompt of ids
    assert parse(prompt=["a", "bc"]).prompts == [[97], [98, 99]]
    assert parse(prompt="x", top_k=3).params.top_k == 3
    assert parse(prompt="x", stop=["a", "b", "c", "d"]).stop == ("a", "b", "c", "d")
    assert parse(prompt="x", max_tokens=None).max_tokens == 16  # null means the default


def test_truncate_keeps_the_prompts_end_and_echoes_what_the_model_saw():
    long = "abcdefghijklmnopqrst"  # 20 tokens, context 16
    spec = parse(prompt=long, max_tokens=6, truncate=True)
    assert spec.prompts == [list(b"klmnopqrst")] and spec.prompt_texts == ["klmnopqrst"]
    assert parse(prompt="abc", max_tokens=6, truncate=True).prompt_texts == ["abc"]
    with pytest.raises(APIError) as e:
        parse(prompt=long, max_tokens=6)
    assert e.value.code == "context_length_exceeded" and '"truncate": true' in e.value.message


BAD = [  # body, status, param, code
    ({}, 400, "prompt", "missing_prompt"),
    ({"prompt": ""}, 400, "prompt", "empty_prompt"),
    ({"prompt": []}, 400, "prompt", "invalid_prompt"),
    ({"prompt": ["ok", ""]}, 400, "prompt", "empty_prompt"),
    ({"prompt": 5}, 400, "prompt", "invalid_prompt"),
    ({"prompt": [1, "a"]}, 400, "prompt", "invalid_prompt"),
    ({"prompt": [True, 1]}, 400, "prompt", "invalid_prompt"),  # a bool is not a token id
    ({"prompt": [[1, 2], [999]]}, 400, "prompt", "invalid_token_id"),
    ({"prompt": [3, -1]}, 400, "prompt", "invalid_token_id"),
    ({"prompt": [2 ** 70]}, 400, "prompt", "invalid_token_id"),  # past int64
    ({"prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "invalid_type"),
    ({"prompt": "x", "max_tokens": True}, 400, "max_tokens", "invalid_type"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"prompt": "x", "max_tokens": 21}, 400, "max_tokens", "invalid_value"),
    ({"prompt": "x", "temperature": -0.1}, 400, "temperature", "invalid_value"),
    ({"prompt": "x", "temperature": float("nan")}, 400, "temperature", "invalid_type"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p", "invalid_value"),
    ({"prompt": "x", "top_p": 1.5}, 400, "top_p", "invalid_value"),
    ({"prompt": "x", "top_k": -5}, 400, "top_k", "invalid_value"),
    ({"prompt": "x", "n": 0}, 400, "n", "invalid_value"),
    ({"prompt": "x", "n": 5}, 400, "n", "invalid_value"),
    ({"prompt": ["a", "b", "c"], "n": 3}, 400, "n", "invalid_value"),  # 9 > 8 sequences
    ({"prompt": "x", "stop": 3}, 400, "stop", "invalid_type"),
    ({"prompt": "x", "stop": ["a"] * (MAX_STOP + 1)}, 400, "stop", "invalid_value"),
    ({"prompt": "x", "stop": [""]}, 400, "stop", "invalid_value"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream", "invalid_type"),
    ({"prompt": "x", "stream_options": []}, 400, "stream_options", "invalid_type"),
    ({"prompt": "x", "stream_options": {"include_usage": 1}}, 400,
     "stream_options.include_usage", "invalid_type"),
    ({"prompt": "a" * (32 * 16 + 1)}, 400, "prompt", "prompt_too_long"),  # 32 x context chars
    ({"prompt": [1] * (8 * 16 + 1), "truncate": True}, 400, "prompt", "prompt_too_long"),
    ({"prompt": "x", "logprobs": 6}, 400, "logprobs", "invalid_value"),
    ({"prompt": "x", "seed": -1}, 400, "seed", "invalid_value"),
    ({"prompt": "x", "seed": 2 ** 64}, 400, "seed", "invalid_value"),
    ({"prompt": "x", "suffix": "y"}, 400, "suffix", "invalid_value"),
    ({"prompt": "x", "model": 7}, 400, "model", "invalid_type"),
]


@pytest.mark.parametrize("body,status,param,code", BAD, ids=[str(b)[:60] for b, *_ in BAD])
def test_bad_fields_name_the_field_status_and_code(body, status, param, code):
    with pytest.raises(APIError) as e:
        parse_completion(body, **LIMITS)
    assert (e.value.status, e.value.param, e.value.code) == (status, param, code)
    assert e.value.message and "\n" not in e.value.message


def test_any_model_name_is_accepted_and_the_answer_names_the_served_model():
    """A server of one model answers whatever ``model`` a request names (the README's
    snippets send "gpt2" to a server of runs/mine/best), or none; the answer names the
    model it served. Only a ``model`` that is not a string is refused."""
    for model in ("gpt2", "gpt-4", "", NAME, None):
        body = {"prompt": "Hi"} if model is None else {"prompt": "Hi", "model": model}
        assert parse_completion(body, **LIMITS).prompts == [[72, 105]]
        assert protocol.parse_tokenize(body, max_chars=10) == "Hi"
        assert protocol.parse_internals(body, tokenizer=TOK, vocab_size=256, n_layer=2,
                                        max_tokens=8).ids == [72, 105]
    f = fold(spec())
    events(f, [(0, FinishEvent("stop", "", 1))])
    assert f.response()["model"] == NAME
    with pytest.raises(APIError) as e:  # control: the type is still checked
        parse(prompt="x", model=["gpt2"])
    assert (e.value.status, e.value.param) == (400, "model")


def test_internals_checks_the_character_cap_before_tokenizing():
    class Counting(ByteTokenizer):
        calls = 0

        def encode(self, text, allow_special=False):
            Counting.calls += 1
            return super().encode(text, allow_special=allow_special)

    tok = Counting()
    kw = dict(tokenizer=tok, vocab_size=256, n_layer=2, max_tokens=8, max_chars=100)
    with pytest.raises(APIError) as e:
        protocol.parse_internals({"prompt": "y" * 101}, **kw)
    assert (e.value.status, e.value.code) == (400, "prompt_too_long")
    assert "101 characters" in e.value.message and "--max-prompt-chars" in e.value.message
    assert Counting.calls == 0, "tokenized a prompt already known to be too long"
    with pytest.raises(APIError) as e:  # under the character cap: tokenized, then counted
        protocol.parse_internals({"prompt": "y" * 100}, **kw)
    assert e.value.code == "prompt_too_long" and "100 tokens" in e.value.message
    assert Counting.calls == 1


def test_score_only_max_tokens_0_needs_echo_and_may_fill_the_context():
    spec = parse(prompt=[5] * 16, max_tokens=0, echo=True, logprobs=1)
    assert spec.max_tokens == 0 and spec.prompts == [[5] * 16]
    with pytest.raises(APIError) as e:  # one token more than the context
        parse(prompt=[5] * 17, max_tokens=0, echo=True)
    assert e.value.code == "context_length_exceeded" and "max_length=16" in e.value.message
    with pytest.raises(APIError) as e:  # generating needs one free position
        parse(prompt=[5] * 16, max_tokens=1)
    assert e.value.code == "context_length_exceeded"
    assert parse(prompt=[5] * 40, max_tokens=0, echo=True, truncate=True).prompts == [[5] * 16]
    with pytest.raises(APIError) as e:
        parse(prompt="x", max_tokens=0)
    assert e.value.param == "max_tokens" and "echo" in e.value.message


def test_lone_surrogates_anywhere_in_a_body_name_their_field():
    cases = [(b'{"stop": ["ok", "\\ud800"]}', "stop", "'stop[1]'"),
             (b'{"a": {"b": ["\\udfff"]}}', "a", "'a.b[0]'"),
             (b'{"\\ud800x": 1}', "\\ud800x", "(a key)"),
             (b'"\\ud800"', None, "the body")]
    for raw, param, where in cases:
        with pytest.raises(APIError) as e:
            parse_json_body(raw)
        assert (e.value.status, e.value.param, e.value.code) == (400, param, "invalid_encoding")
        assert where in e.value.message and "surrogate" in e.value.message
        json.dumps(e.value.body()).encode("utf-8")  # the answer itself is encodable
    assert parse_json_body(b'{"prompt": "\\ud83d\\ude00"}') == {"prompt": "\U0001F600"}  # a pair


def test_error_messages_name_the_value_and_the_limit():
    with pytest.raises(APIError) as e:
        parse(prompt=[[1, 2], [5, 999, 300]])
    assert e.value.message == "prompt 1 holds token id 999, outside the model's vocabulary [0, 256)"
    with pytest.raises(APIError) as e:
        parse(prompt="x", max_tokens=21)
    assert e.value.message == "'max_tokens' must lie in [1, 20], got 21"
    with pytest.raises(APIError) as e:
        parse(prompt="x", n="2")
    assert e.value.message == "'n' must be an integer, got \"2\" (str)"


def test_a_body_that_is_not_an_object_is_rejected():
    for body in ([1, 2], "x", None, 3):
        with pytest.raises(APIError) as e:
            parse_completion(body, **LIMITS)
        assert e.value.status == 400 and e.value.code == "invalid_body"


def test_parse_json_body_decodes_and_rejects_bad_bytes():
    assert parse_json_body(b'{"prompt": "\xc3\xa9"}') == {"prompt": "\u00e9"}
    cases = [(b'{"prompt": "\xff\xfe"}', "invalid_encoding"), (b'{"prompt": "x"', "invalid_json"),
             (b"[" * 5000 + b"]" * 5000, "invalid_json")]  # too deep for the JSON parser
    for raw, code in cases:
        with pytest.raises(APIError) as e:
            parse_json_body(raw)
        assert e.value.status == 400 and e.value.code == code


def test_api_errors_are_numgpt_errors_with_openais_body():
    e = APIError(503, "busy", type="server_error", code="overloaded", headers={"Retry-After": "1"})
    assert isinstance(e, NumGPTError)
    assert e.body() == {"error": {"message": "busy", "type": "server_error", "param": None,
                                  "code": "overloaded"}}
    assert protocol.error_body("m") == {"error": {"message": "m", "type": "invalid_request_error",
                                                  "param": None, "code": None}}


def test_token_str_spells_tokens_as_openai_does():
    assert token_str(TOK, 104) == "h"
    assert token_str(TOK, 0xC3) == "bytes:\\xc3"  # half of a UTF-8 character
    assert token_str(TOK, 300) == "<|token 300|>"  # a vocabulary padded past the tokenizer's


# ----------------------------------------------------------------- the answer fold


def spec(**kw) -> CompletionSpec:
    base = dict(prompts=[[72, 105]], prompt_texts=["Hi"], max_tokens=4,
                params=SamplingParams(temperature=0.0))
    return CompletionSpec(**{**base, **kw})


def fold(s: CompletionSpec) -> CompletionFold:
    return CompletionFold(s, NAME, TOK, id="cmpl-1", created=7)


def events(f: CompletionFold, script) -> list[str]:
    out = f.start()
    for i, ev in script:
        assert not f.done
        out += f.apply(i, ev)
    return out


def data(sse: list[str]) -> list[dict]:
    assert all(s.startswith("data: ") and s.endswith("\n\n") for s in sse)
    return [json.loads(s[len("data: "):]) for s in sse if s != SSE_DONE]


# two choices (n=2) of the prompt "Hi": choice 0 says "yo" then stops, choice 1 says "!" and
# runs out of tokens. Choice 0 (sample 0) carries the prompt's logprobs.
PROMPT = PromptEvent([None, -1.5], [None, ((105, -1.5), (104, -2.0))])
SCRIPT = [(0, PROMPT),
          (0, TokenEvent(121, "y", 0, -0.25, ((121, -0.25),))),
          (1, TokenEvent(33, "!", 0, -0.5, ((65, -0.1),))),
          (0, TokenEvent(111, "o", 1, -0.75, ((111, -0.75),))),
          (1, FinishEvent("length", "", 4)),
          (0, FinishEvent("stop", "", 3))]


def test_plain_answer_is_the_folds_final_state():
    f = fold(spec(n=2, echo=True, logprobs=1))
    assert events(f, SCRIPT) == []  # nothing to send until the end
    assert f.done
    body = f.response()
    assert {k: body[k] for k in ("id", "object", "created", "model")} == \
        {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": NAME}
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 7, "total_tokens": 9}
    c0, c1 = body["choices"]
    assert (c0["index"], c0["text"], c0["finish_reason"]) == (0, "Hiyo", "stop")
    assert (c1["index"], c1["text"], c1["finish_reason"]) == (1, "Hi!", "length")
    assert c0["logprobs"] == {"tokens": ["H", "i", "y", "o"],
                              "token_logprobs": [None, -1.5, -0.25, -0.75],
                              "top_logprobs": [None, {"i": -1.5, "h": -2.0}, {"y": -0.25},
                                               {"o": -0.75}],
                              "text_offset": [0, 1, 2, 3]}
    # the sampled token joins its alternatives, as OpenAI shows it
    assert c1["logprobs"]["top_logprobs"][2] == {"A": -0.1, "!": -0.5}
    assert c1["logprobs"]["text_offset"] == [0, 1, 2]


def test_stream_sends_echo_tokens_finishes_usage_then_done():
    f = fold(spec(n=2, echo=True, logprobs=1, stream=True, include_usage=True))
    sent = events(f, SCRIPT)
    assert sent[-1] == SSE_DONE and sent.count(SSE_DONE) == 1
    chunks = data(sent)
    assert all(c["id"] == "cmpl-1" and c["object"] == "text_completion" for c in chunks)
    entries = [(c["choices"][0]["index"], c["choices"][0]["text"], c["choices"][0]["finish_reason"])
               for c in chunks[:-1]]
    assert entries == [(0, "Hi", None), (1, "Hi", None),  # both echoes, once the prompt scored
                       (0, "y", None), (1, "!", None), (0, "o", None),
                       (1, "", "length"), (0, "", "stop")]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 7
    assert all("usage" not in c for c in chunks[:-1])
    token_lp = chunks[4]["choices"][0]["logprobs"]  # choice 0's "o": offsets count the echo
    assert token_lp == {"tokens": ["o"], "token_logprobs": [-0.75],
                        "top_logprobs": [{"o": -0.75}], "text_offset": [3]}
    # the stream and the plain answer are one fold: joined stream text equals the body's
    plain = fold(spec(n=2, echo=True, logprobs=1))
    events(plain, SCRIPT)
    for c in plain.response()["choices"]:
        assert "".join(x["choices"][0]["text"] for x in chunks[:-1]
                       if x["choices"][0]["index"] == c["index"]) == c["text"]


def test_stream_without_logprobs_echoes_at_once_and_omits_usage():
    f = fold(spec(echo=True, stream=True))
    first = data(f.start())
    assert [c["choices"] for c in first] == \
        [[{"text": "Hi", "index": 0, "logprobs": None, "finish_reason": None}]]
    sent = f.apply(0, TokenEvent(33, "!", 0)) + f.apply(0, FinishEvent("stop", "", 1))
    assert sent[-1] == SSE_DONE and all("usage" not in c for c in data(sent))
    assert f.done and f.response()["choices"][0]["text"] == "Hi!"


def test_a_failed_sequence_ends_the_answer_with_an_error():
    f = fold(spec(n=2, stream=True))
    sent = events(f, [(1, TokenEvent(33, "!", 0)), (0, FinishEvent("error", "", 0, "boom"))])
    assert f.done  # the other choice is not waited for
    assert SSE_DONE not in sent
    assert data(sent)[-1] == {"error": {"message": "generation failed; see the server log",
                                        "type": "server_error", "param": None,
                                        "code": "generation_failed"}}
    plain = fold(spec(n=2))
    events(plain, [(0, FinishEvent("cancelled", "", 0))])
    with pytest.raises(APIError) as e:
        plain.response()
    assert (e.value.status, e.value.code) == (500, "generation_failed")


def test_a_failure_the_engine_explains_is_told_to_the_client():
    """A sequence whose logits were not finite ends with the engine's one-line message and
    code (it is about the model, not the server's internals); other failures stay generic."""
    why = "the model's logits for generated token 1 are not finite (3 of 256 are NaN or infinite)"
    bad = FinishEvent("error", "", 0, why, "non_finite_logits")
    f = fold(spec(n=2, stream=True))
    sent = events(f, [(1, TokenEvent(33, "!", 0)), (0, bad)])
    assert data(sent)[-1] == {"error": {"message": why, "type": "server_error", "param": None,
                                        "code": "non_finite_logits"}}
    plain = fold(spec(n=2))
    events(plain, [(1, bad)])
    with pytest.raises(APIError) as e:
        plain.response()
    assert (e.value.status, e.value.code, e.value.message) == (500, "non_finite_logits", why)


def test_logprobs_are_floored_at_minus_9999_and_every_event_is_strict_json():
    """-inf (a probability that underflowed to 0) and anything below -9999 are sent as
    -9999.0, vLLM's clamp; a NaN that reached the event writer would raise, not be sent."""
    assert protocol.LOGPROB_FLOOR == -9999.0
    inf = float("-inf")
    f = fold(spec(echo=True, logprobs=1, stream=True))
    sent = events(f, [(0, PromptEvent([None, inf], [None, ((105, inf), (104, -1e30))])),
                      (0, TokenEvent(33, "!", 0, -12000.0, ((33, -12000.0), (65, -0.5)))),
                      (0, FinishEvent("stop", "", 1))])
    chunks = [json.loads(s[len("data: "):], parse_constant=pytest.fail) for s in sent
              if s != SSE_DONE]
    echo, token = chunks[0]["choices"][0]["logprobs"], chunks[1]["choices"][0]["logprobs"]
    assert echo["token_logprobs"] == [None, -9999.0]
    assert echo["top_logprobs"][1] == {"i": -9999.0, "h": -9999.0}
    assert token["token_logprobs"] == [-9999.0] and token["top_logprobs"] == [{"!": -9999.0, "A": -0.5}]
    with pytest.raises(ValueError):  # the writer itself refuses what JSON cannot hold
        protocol.sse({"x": float("nan")})
    assert protocol.sse({"x": -9999.0}) == 'data: {"x": -9999.0}\n\n'


def test_non_finite_internals_are_a_500_not_a_body():
    import numpy as np

    s = protocol.InternalsSpec([72, 105], 0)
    ok = protocol.internals_json(NAME, TOK, s, np.full((1, 2, 2), 0.5), np.ones((3, 2)))
    assert ok["attention"] == [[[0.5, 0.5], [0.5, 0.5]]]  # control
    for att, norms in ((np.full((1, 2, 2), np.nan), np.ones((3, 2))),
                       (np.full((1, 2, 2), 0.5), np.full((3, 2), np.inf))):
        with pytest.raises(APIError) as e:
            protocol.internals_json(NAME, TOK, s, att, norms)
        assert (e.value.status, e.value.code) == (500, "non_finite_internals")


def test_a_successful_answer_is_not_mistaken_for_a_failure():
    """Negative control for the failure test above: the same shape with reason "stop"."""
    f = fold(spec(n=2, stream=True))
    sent = events(f, [(1, FinishEvent("stop", "", 0)), (0, FinishEvent("length", "", 4))])
    assert sent[-1] == SSE_DONE and "error" not in data(sent)[-1]
    assert not f.failed
