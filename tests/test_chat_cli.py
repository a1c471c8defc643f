"""``numgpt chat``: an interactive chat over stdin, tested by piping lines into the command.
Each reply must equal ``numgpt generate`` on the conversation so far, rendered with the
template; /reset forgets the history; /exit and end of input leave."""

from __future__ import annotations

import subprocess
import sys

import pytest

import numgpt
from numgpt.core.model import GPT, GPTConfig
from numgpt.infer import chat as chat_session
from numgpt.infer.sample import SamplingParams, generate
from numgpt.io import chat
from numgpt.io.checkpoint import save
from numgpt.io.tokenizer import ByteTokenizer
from servers import REPO


@pytest.fixture(scope="module")
def model_prefix(tmp_path_factory):
    m = GPT(GPTConfig(vocab_size=256, block_size=96, n_layer=2, n_head=2, n_embd=32,
                      dtype="float64"), seed=11)
    m.tokenizer = ByteTokenizer()
    return save(m, tmp_path_factory.mktemp("chat_cli") / "tiny")


def _offline_reply(model, messages, n):
    ids = chat_session.chat_prompt(model, messages)
    out = generate(model, ids, min(n, model.config.block_size - len(ids)),
                   SamplingParams(temperature=0), stop="\x04")
    return bytes(out).decode("utf-8", "replace")


def _chat(prefix, stdin: str, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "numgpt", "chat", "--model", str(prefix), "-n", "8", *flags]
    return subprocess.run(cmd, cwd=REPO, input=stdin, capture_output=True, text=True, timeout=120)


def test_piped_chat_keeps_history_resets_and_exits(model_prefix):
    run = _chat(model_prefix, "hi there\nand again\n/reset\nhi there\n/exit\nnever read\n")
    assert run.returncode == 0, run.stderr
    model = numgpt.load(model_prefix)
    first = _offline_reply(model, [{"role": "user", "content": "hi there"}], 8)
    second = _offline_reply(model, [{"role": "user", "content": "hi there"},
                                    {"role": "assistant", "content": first},
                                    {"role": "user", "content": "and again"}], 8)
    assert run.stdout == f"{first}\n{second}\n(conversation cleared)\n{first}\n"
    assert first != second  # the second reply saw the history (negative control for /reset)


def test_end_of_input_leaves_and_a_system_message_leads(model_prefix):
    run = _chat(model_prefix, "hi there", "--system", "Be brief.")
    assert run.returncode == 0, run.stderr
    model = numgpt.load(model_prefix)
    want = _offline_reply(model, [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "hi there"}], 8)
    assert run.stdout == want + "\n"


def test_oldest_turns_are_dropped_when_the_context_is_full(model_prefix):
    model = numgpt.load(model_prefix)
    history = [{"role": "system", "content": "S"}]
    for i in range(6):
        history += [{"role": "user", "content": f"question {i} " * 2},
                    {"role": "assistant", "content": f"answer {i}"}]
    history.append({"role": "user", "content": "last"})
    ids = chat_session.chat_prompt(model, history)
    text = bytes(ids).decode()
    assert len(ids) < 96 and text.startswith("system: S\x04") and text.endswith("user: last\x04assistant: ")
    assert "question 0" not in text
    with pytest.raises(numgpt.errors.InputError, match="write a shorter message"):
        chat_session.chat_prompt(model, [{"role": "user", "content": "x" * 200}])


def test_the_chat_template_flag_is_used(model_prefix, tmp_path):
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
                                      "{% if add_generation_prompt %}> {% endif %}")
    run = _chat(model_prefix, "hi there\n", "--chat-template", str(tmp_path / "t.jinja"))
    assert run.returncode == 0, run.stderr
    model = numgpt.load(model_prefix)
    out = generate(model, list(b"hi there\n> "), 8, SamplingParams(temperature=0), stop="\x04")
    assert run.stdout == bytes(out).decode("utf-8", "replace") + "\n"
    assert chat.DEFAULT_TEMPLATE != (tmp_path / "t.jinja").read_text()
