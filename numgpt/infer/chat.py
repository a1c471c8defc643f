"""A conversation with a model: each reply is the continuation of the history rendered with
the chat template (``numgpt.io.chat``) and its generation prompt, through the one decoder
(``numgpt.infer.sample.stream``), so a reply is what ``numgpt generate`` gives for the
rendered text. ``numgpt chat`` is ``run_chat`` over stdin and stdout.

A reply ends at end-of-text, at the template's separator for a tokenizer without one
(``chat.stop_text``), at ``max_new_tokens``, or where the context is full. When the history
no longer fits the context, its oldest turns are dropped (a system message is kept).
"""
from __future__ import annotations

import codecs
from typing import Callable, Iterable, Iterator

from ..errors import InputError
from ..io import chat
from . import sample

__all__ = ["chat_prompt", "reply_tokens", "run_chat", "COMMANDS"]

COMMANDS = {"/reset": "forget the conversation so far", "/exit": "leave (so does end of input)"}


def chat_prompt(model, messages: list[dict], template: str | None = None) -> list[int]:
    """The token ids of ``messages`` rendered with the generation prompt, dropping the oldest
    turns after a leading system message until at least one token of reply fits."""
    tok = model.tokenizer
    if tok is None:
        raise InputError("the model has no tokenizer, so it cannot chat; load it with one "
                         "(--tokenizer)")
    source = chat.template_of(model, template)
    keep = 1 if messages and messages[0].get("role") == "system" else 0
    history = list(messages)
    while True:
        text = chat.render(source, history, tok, add_generation_prompt=True)
        ids = tok.encode(text, allow_special=True)
        if len(ids) < model.config.block_size:
            return ids
        if len(history) - keep <= 1:
            raise InputError(f"the message renders to {len(ids)} tokens but the model's context "
                             f"is {model.config.block_size}; write a shorter message")
        history = history[:keep] + history[keep + 1:]


def reply_tokens(model, messages: list[dict], max_new_tokens: int,
                 params: sample.SamplingParams, *, template: str | None = None,
                 rng=None) -> Iterator[int]:
    """The reply's token ids as they are generated (the stop text never included)."""
    ids = chat_prompt(model, messages, template)
    room = min(max_new_tokens, model.config.block_size - len(ids))
    return sample.stream(model, ids, room, params, stop=chat.stop_text(model.tokenizer),
                         tokenizer=model.tokenizer, rng=rng)


def run_chat(model, lines: Iterable[str], write: Callable[[str], None], *,
             max_new_tokens: int = 256, params: sample.SamplingParams = sample.SamplingParams(),
             template: str | None = None, system: str | None = None,
             prompt: str = "") -> int:
    """Chat over ``lines`` (each a user message; ``/reset`` forgets the history, ``/exit`` or
    the end of ``lines`` leaves), writing each reply as it streams and a newline after it.
    ``prompt`` is written before each message is read (a terminal's "> "). One generator
    for the whole session (``params.seed``), so a seeded session repeats. Returns 0."""
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    rng = sample.sample_rng(params.seed, 0)
    tok = model.tokenizer
    write(prompt)
    for line in lines:
        text = line.rstrip("\r\n")
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            history = list(start)
            write("(conversation cleared)\n" + prompt)
            continue
        if not text.strip():
            write(prompt)
            continue
        history.append({"role": "user", "content": text})
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span tokens
        reply = []
        for token in reply_tokens(model, history, max_new_tokens, params, template=template,
                                  rng=rng):
            piece = decoder.decode(tok.token_bytes(token))
            reply.append(piece)
            write(piece)
        reply.append(decoder.decode(b"", final=True))
        write(reply[-1] + "\n" + prompt)
        history.append({"role": "assistant", "content": "".join(reply)})
    return 0
