"""``POST /v1/chat/completions`` end to end: a real ``numgpt serve`` subprocess driven by the
official ``openai`` client (plain and streamed) and raw HTTP, against the ``numgpt generate``
command on the rendered prompt; and the chat shapes as pure functions (protocol.ChatFold).

The model is a tiny random-weight byte-level GPT in float64 (batched and single-row
arithmetic cannot flip an argmax), so its chat template's separator is the byte \\x04."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import numpy as np
import openai
import pytest

import numgpt
from numgpt.errors import NumGPTError
from numgpt.core.model import GPT, GPTConfig
from numgpt.infer.sample import SamplingParams
from numgpt.io import chat
from numgpt.io.checkpoint import save
from numgpt.io.tokenizer import ByteTokenizer
from numgpt.serve.engine import FinishEvent, TokenEvent
from numgpt.serve.protocol import (SSE_DONE, APIError, ChatFold, parse_chat_completion)
from servers import REPO, serve_subprocess

KEY = "chat-key-0123"
NAME = "tiny-chat"
MESSAGES = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is 2 + 3?"}]


def _tiny_model() -> GPT:
    m = GPT(GPTConfig(vocab_size=256, block_size=128, n_layer=2, n_head=2, n_embd=32,
                      dtype="float64"), seed=7)
    m.tokenizer = ByteTokenizer()
    return m


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat_serve")
    prefix = save(_tiny_model(), folder / "tiny")
    with serve_subprocess(prefix, folder / "server.log", "--model-name", NAME,
                          "--log-level", "warning", api_key=KEY) as (url, proc):
        yield url, prefix


def _client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _http(url) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {KEY}"})


def _generate_command(prefix, prompt: str, *flags: str) -> list[dict]:
    """``numgpt generate --json`` on ``prompt``, stopping at the byte model's separator."""
    cmd = [sys.executable, "-m", "numgpt", "generate", "--model", str(prefix), "--prompt", prompt,
           "--stop", chat.BYTE_SEPARATOR, "--json", *flags]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return [json.loads(line) for line in run.stdout.splitlines() if line.strip()]


def _ids(entries) -> list[int]:
    return [b for e in entries for b in e.bytes]


def test_greedy_chat_equals_numgpt_generate_on_the_rendered_prompt(served):
    url, prefix = served
    rendered = chat.render(None, MESSAGES, ByteTokenizer(), add_generation_prompt=True)
    assert rendered == "system: Answer briefly.\x04user: What is 2 + 3?\x04assistant: "
    (want,) = _generate_command(prefix, rendered, "-n", "24", "--temperature", "0")
    out = _client(url).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=24,
                                                temperature=0, logprobs=True, top_logprobs=2)
    assert out.object == "chat.completion" and out.model == NAME and out.id.startswith("chatcmpl-")
    (choice,) = out.choices
    assert choice.message.role == "assistant" and choice.message.content == want["text"]
    assert _ids(choice.logprobs.content) == want["generated_ids"]
    assert want["prompt_ids"] == list(rendered.encode())
    assert out.usage.prompt_tokens == len(rendered.encode())
    assert out.usage.completion_tokens == len(want["generated_ids"])
    for entry in choice.logprobs.content:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 2 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-12)
        assert entry.top_logprobs[1].logprob <= entry.logprob


def test_streamed_chat_sends_role_then_deltas_then_finish_then_usage(served):
    url, _ = served
    plain = _client(url).chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=16,
                                                  temperature=0)
    chunks = list(_client(url).chat.completions.create(
        model=NAME, messages=MESSAGES, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    first, *middle, finish, usage = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert all(c.choices[0].finish_reason is None for c in [first, *middle])
    assert "".join(c.choices[0].delta.content for c in middle) == plain.choices[0].message.content
    assert finish.choices[0].finish_reason == plain.choices[0].finish_reason == "length"
    assert finish.choices[0].delta.content is None
    assert usage.choices == [] and usage.usage.completion_tokens == 16
    assert usage.usage.prompt_tokens == plain.usage.prompt_tokens


def test_raw_stream_ends_with_done_and_every_event_is_json(served):
    url, _ = served
    with _http(url) as h, h.stream("POST", "/v1/chat/completions", json={
            "messages": MESSAGES, "max_completion_tokens": 5, "stream": True,
            "seed": 3}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == SSE_DONE.strip()
    bodies = [json.loads(e[len("data: "):]) for e in events[:-1]]
    deltas = [b["choices"][0]["delta"] for b in bodies]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert all(set(d) == {"content"} for d in deltas[1:-1]) and len(deltas[1:-1]) >= 5
    assert len(deltas) <= 8  # 5 tokens, and the text of a character the 5th left unfinished
    assert bodies[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": "length"}


def test_seeded_n_samples_equal_the_generate_command(served):
    url, prefix = served
    rendered = chat.render(None, MESSAGES, ByteTokenizer(), add_generation_prompt=True)
    want = _generate_command(prefix, rendered, "-n", "12", "--temperature", "0.9", "--top-p",
                             "0.95", "--seed", "31", "--num-samples", "3")
    out = _client(url).chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=12,
                                                temperature=0.9, top_p=0.95, seed=31, n=3)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.message.content for c in out.choices] == [w["text"] for w in want]
    assert len({c.message.content for c in out.choices}) > 1  # really different samples


def test_a_stop_string_ends_the_reply_with_stop(served):
    url, _ = served
    full = _client(url).chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=30,
                                                 temperature=0).choices[0].message.content
    stop = next(ch for ch in full if ch != full[0])  # a text that starts after the reply does
    assert full.index(stop) >= 1
    out = _client(url).chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=30,
                                                temperature=0, stop=[stop])
    assert out.choices[0].message.content == full[:full.index(stop)]
    assert out.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body, param, code", [
    ({}, "messages", "missing_messages"),
    ({"messages": []}, "messages", "invalid_messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages", "invalid_messages"),
    ({"messages": [{"role": ["user"], "content": "x"}]}, "messages", "invalid_messages"),
    ({"messages": "Hi"}, "messages", "invalid_messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages", "invalid_messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages",
     "invalid_messages"),
    ({"messages": MESSAGES, "max_completion_tokens": 0}, "max_completion_tokens", "invalid_value"),
    ({"messages": MESSAGES, "max_tokens": "5"}, "max_tokens", "invalid_type"),
    ({"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs", "invalid_value"),
    ({"messages": MESSAGES, "logprobs": True, "top_logprobs": 99}, "top_logprobs", "invalid_value"),
    ({"messages": MESSAGES, "n": 0}, "n", "invalid_value"),
    ({"messages": MESSAGES, "temperature": -1}, "temperature", "invalid_value"),
    ({"messages": MESSAGES, "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage", "invalid_type"),
    ({"messages": [{"role": "user", "content": "x" * 1000}]}, "messages",
     "context_length_exceeded"),
])
def test_bad_chat_requests_get_openai_errors_naming_the_field(served, body, param, code):
    url, _ = served
    with _http(url) as h:
        r = h.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error")
    assert err["message"] and "\n" not in err["message"]
    with _http(url) as h:  # and the server keeps serving
        assert h.get("/health").status_code == 200


def test_the_openai_client_raises_bad_request_for_a_bad_role(served):
    url, _ = served
    with pytest.raises(openai.BadRequestError, match="role must be one of"):
        _client(url).chat.completions.create(model=NAME, messages=[{"role": "robot",
                                                                     "content": "hi"}])


def test_chat_needs_the_api_key(served):
    url, _ = served
    r = httpx.post(url + "/v1/chat/completions", json={"messages": MESSAGES}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


# ---------------------------------------------------------- pure functions (no server)

LIMITS = dict(vocab_size=256, context=64, max_tokens_limit=64, max_n=4, max_sequences=8)


def test_parse_defaults_fill_the_context_and_add_the_byte_separator_as_a_stop():
    tok = ByteTokenizer()
    spec = parse_chat_completion({"messages": MESSAGES[1:]}, tokenizer=tok, template=None,
                                 **LIMITS)
    prompt = "user: What is 2 + 3?\x04assistant: "
    assert spec.prompts == [list(prompt.encode())] and spec.prompt_texts == [prompt]
    assert spec.max_tokens == 64 - len(prompt) and spec.stop == ("\x04",)
    assert spec.logprobs is None and not spec.stream and not spec.echo and spec.n == 1
    spec = parse_chat_completion({"messages": [{"role": "developer", "content": [
        {"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]}, MESSAGES[1]],
        "stop": "\n", "logprobs": True, "max_tokens": 3}, tokenizer=tok, template=None, **LIMITS)
    assert spec.prompt_texts[0].startswith("system: be brief\x04")
    assert spec.stop == ("\n", "\x04") and spec.logprobs == 0 and spec.max_tokens == 3


def test_parse_uses_the_given_template_and_reports_its_refusal():
    tok = ByteTokenizer()
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}" \
               "{% if add_generation_prompt %}<assistant>{% endif %}"
    spec = parse_chat_completion({"messages": MESSAGES[1:]}, tokenizer=tok, template=template,
                                 **LIMITS)
    assert spec.prompt_texts == ["<user>What is 2 + 3?<assistant>"]
    strict = "{{ raise_exception('only one message, please') if messages|length > 1 }}"
    with pytest.raises(APIError, match="only one message") as e:
        parse_chat_completion({"messages": MESSAGES}, tokenizer=tok, template=strict, **LIMITS)
    assert (e.value.status, e.value.param) == (400, "messages")


def _fold(stream: bool, logprobs: int | None = None, include_usage: bool = False) -> ChatFold:
    spec = parse_chat_completion({"messages": MESSAGES[1:], "stream": stream, "n": 1,
                                  **({"logprobs": True, "top_logprobs": logprobs}
                                     if logprobs is not None else {})},
                                 tokenizer=ByteTokenizer(), template=None, **LIMITS)
    spec.include_usage = include_usage
    return ChatFold(spec, NAME, ByteTokenizer(), id="chatcmpl-x", created=1)


def _events(fold: ChatFold, tokens: list[tuple[int, str]], finish: FinishEvent) -> list[str]:
    out = fold.start()
    for i, (t, text) in enumerate(tokens):
        out += fold.apply(0, TokenEvent(t, text, i, -0.5 * (i + 1),
                                        ((t, -0.5 * (i + 1)), (t + 1, -3.0))))
    return out + fold.apply(0, finish)


def test_fold_plain_answer_has_message_logprobs_content_and_usage():
    fold = _fold(stream=False, logprobs=1)
    assert _events(fold, [(104, "h"), (0xC3, ""), (0xA9, "é")], FinishEvent("stop", "", 4)) == []
    body = fold.response()
    assert body["object"] == "chat.completion" and body["id"] == "chatcmpl-x"
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "hé"}
    assert choice["finish_reason"] == "stop"
    content = choice["logprobs"]["content"]
    assert [e["bytes"] for e in content] == [[104], [0xC3], [0xA9]]
    assert [e["token"] for e in content] == ["h", "bytes:\\xc3", "bytes:\\xa9"]
    assert [e["logprob"] for e in content] == [-0.5, -1.0, -1.5]
    assert content[0]["top_logprobs"] == [{"token": "h", "logprob": -0.5, "bytes": [104]},
                                          {"token": "i", "logprob": -3.0, "bytes": [105]}]
    assert body["usage"] == {"prompt_tokens": len(fold.spec.prompts[0]), "completion_tokens": 4,
                             "total_tokens": len(fold.spec.prompts[0]) + 4}


def test_fold_stream_shapes_and_a_failure_is_an_error_event():
    fold = _fold(stream=True, include_usage=True)
    events = _events(fold, [(104, "h"), (105, "i")], FinishEvent("length", "!", 3))
    assert events[-1] == SSE_DONE
    bodies = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert [b["choices"][0]["delta"] if b["choices"] else None for b in bodies] == [
        {"role": "assistant", "content": ""}, {"content": "h"}, {"content": "i"},
        {"content": "!"}, {}, None]
    assert bodies[-2]["choices"][0]["finish_reason"] == "length"
    assert bodies[-1]["usage"]["completion_tokens"] == 3
    failing = _fold(stream=True)
    out = _events(failing, [(104, "h")], FinishEvent("error", "", 1, "boom", "non_finite_logits"))
    assert json.loads(out[-1][len("data: "):])["error"]["code"] == "non_finite_logits"
    assert SSE_DONE not in out
    with pytest.raises(APIError, match="boom"):
        failing.response()


def test_the_servers_chat_template_flag_chooses_the_rendering(tmp_path):
    """``numgpt serve --chat-template FILE`` (ServerConfig.chat_template): the reply is the
    completion of the messages rendered with that file's template, not the default."""
    from starlette.testclient import TestClient

    from numgpt.cli import build_parser
    from numgpt.serve.app import ServerConfig, create_app

    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}[assistant] {% endif %}", encoding="utf-8")
    args = build_parser().parse_args(["serve", "--model", "x", "--chat-template", str(path)])
    from numgpt.cli import _chat_template
    template = _chat_template(args)
    body = {"messages": MESSAGES[1:], "max_tokens": 6, "temperature": 0, "logprobs": True}
    with TestClient(create_app(ServerConfig(chat_template=template), model=_tiny_model()),
                    base_url="http://localhost") as client:
        out = client.post("/v1/chat/completions", json=body).json()
        want, default = (client.post("/v1/completions", json={
            "prompt": prompt, "max_tokens": 6, "temperature": 0, "stop": "\x04",
            "logprobs": 0}).json()["choices"][0]
            for prompt in ("[user] What is 2 + 3?\n[assistant] ",
                           "user: What is 2 + 3?\x04assistant: "))
    choice = out["choices"][0]
    assert choice["message"]["content"] == want["text"]
    logprobs = [e["logprob"] for e in choice["logprobs"]["content"]]
    # the completion reuses the keys and values the chat request left in its slot (prefix
    # reuse), computing only its last prompt token anew: equal to float64 rounding, not bitwise
    np.testing.assert_allclose(logprobs, want["logprobs"]["token_logprobs"], rtol=0, atol=1e-12)
    assert logprobs != default["logprobs"]["token_logprobs"]  # the template matters
    (tmp_path / "bad.jinja").write_text("{% if %}", encoding="utf-8")
    with pytest.raises(NumGPTError, match="bad.jinja.*not valid Jinja2"):
        _chat_template(build_parser().parse_args(["serve", "--model", "x", "--chat-template",
                                                  str(tmp_path / "bad.jinja")]))
