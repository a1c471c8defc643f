"""The playground's Chat card in Chromium against a real server (the fixtures of
tests/test_playground.py): a greedy reply shows exactly the text /v1/chat/completions gives
for the same messages, each token shaded by the probability the API reports, the second turn
carries the history, and New conversation forgets it."""

from __future__ import annotations

import math

import httpx

from test_playground import KEY, browser, page, server  # noqa: F401  (fixtures)


def _chat_api(server, messages, max_tokens):  # noqa: F811
    return httpx.post(server["url"] + "/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"messages": messages, "max_tokens": max_tokens, "temperature": 0,
                            "logprobs": True, "top_logprobs": 5}).json()["choices"][0]


def _send(page, text):  # noqa: F811
    before = int(page.js("return Number(document.body.dataset.chatted || 0)"))
    page.set("chat-input", text)
    page.el("chat-send").click()
    page.wait(lambda: int(page.js("return Number(document.body.dataset.chatted || 0)")) > before,
              what="the chat reply")


def _replies(page):  # noqa: F811
    return page.js("return [...document.querySelectorAll('#chat-log .msg.assistant .text')]"
                   ".map(t => t.textContent)")


def test_chat_card_shows_the_api_reply_with_probabilities_and_keeps_history(page, server):  # noqa: F811
    page.open()
    page.set("chat-max-tokens", 12)
    _send(page, "Hello there")
    first = _chat_api(server, [{"role": "user", "content": "Hello there"}], 12)
    assert _replies(page) == [first["message"]["content"]] and first["message"]["content"]
    shown = page.js("return [...document.querySelectorAll('#chat-log .tok[data-chat-step]')]"
                    ".map(t => [t.dataset.p, t.getAttribute('aria-label'), t.title])")
    entries = first["logprobs"]["content"]
    assert len(shown) == len(entries) > 0
    for (p, label, title), entry in zip(shown, entries):
        assert math.isclose(float(p), math.exp(entry["logprob"]), rel_tol=1e-12)
        assert label.endswith("%") and len(title.splitlines()) == 1 + len(entry["top_logprobs"])
    # the second turn is answered with the first in the history
    _send(page, "And again")
    second = _chat_api(server, [{"role": "user", "content": "Hello there"},
                                {"role": "assistant", "content": first["message"]["content"]},
                                {"role": "user", "content": "And again"}], 12)
    assert _replies(page) == [first["message"]["content"], second["message"]["content"]]
    assert page.js("return chatState.messages.length") == 4
    # a new conversation forgets it: the same message gets the first reply again
    page.el("chat-reset").click()
    assert page.js("return chatState.messages.length") == 0 and _replies(page) == []
    _send(page, "Hello there")
    assert _replies(page) == [first["message"]["content"]]
    assert page.error() == "" and page.console_errors() == []


def test_chat_card_shows_a_server_refusal_in_words(page, server):  # noqa: F811
    page.open()
    page.set("chat-max-tokens", 0)
    _send(page, "Hello")
    assert "HTTP 400" in page.error() and "max_tokens" in page.error()
    assert page.js("return chatState.messages.length") == 0  # the unanswered turn is left out
