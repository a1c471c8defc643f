"""Chat templates (numgpt.io.chat): rendering equals transformers' apply_chat_template on the
same template and messages; a template one whitespace control away fails that parity; bad
templates and messages are one NumGPTError line; templates travel with checkpoints."""

from __future__ import annotations

import json

import pytest

from numgpt.errors import InputError, NumGPTError
from numgpt.io import chat
from numgpt.io.tokenizer import ByteTokenizer, GPT2Tokenizer

# Templates in the shapes models on the Hub ship (ChatML, Llama 2, Zephyr), plus ones that
# use the environment's extras (tojson, namespace, loop controls, raise_exception).
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}"
          "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
          "{% for message in loop_messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
          "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
          "{% else %}{% set content = message['content'] %}{% endif %}"
          "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
          "{% endif %}{% endfor %}")
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""
EXTRAS = """{%- set ns = namespace(n=0) -%}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}{% continue %}{% endif %}
    {%- set ns.n = ns.n + 1 %}
  {{ ns.n }} {{ message | tojson }} <b>&</b>
{% endfor %}
{%- if add_generation_prompt %}>>> {% endif %}"""
TEMPLATES = {"default": chat.DEFAULT_TEMPLATE, "chatml": CHATML, "llama2": LLAMA2,
             "zephyr": ZEPHYR, "extras": EXTRAS}

SYSTEM_CHAT = [{"role": "system", "content": "You answer in one word."},
               {"role": "user", "content": "What is 2 + 3?"},
               {"role": "assistant", "content": "Five."},
               {"role": "user", "content": "And  \"2 * 3\" — in French?  "}]
PLAIN_CHAT = [{"role": "user", "content": "héllo <tag> & ünïcode\nline two"},
              {"role": "assistant", "content": "  hi there  "}]


@pytest.fixture(scope="module")
def hf_tokenizer(gpt2_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2TokenizerFast(vocab_file=str(gpt2_tokenizer_dir / "vocab.json"),
                                          merges_file=str(gpt2_tokenizer_dir / "merges.txt"))


@pytest.fixture(scope="module")
def gpt2_tokenizer(gpt2_tokenizer_dir):
    return GPT2Tokenizer.from_folder(gpt2_tokenizer_dir)


def _hf_render(hf_tokenizer, template, messages, add_generation_prompt):
    return hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                            add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("messages", [SYSTEM_CHAT, PLAIN_CHAT], ids=["system", "plain"])
@pytest.mark.parametrize("add_generation_prompt", [False, True], ids=["", "gen"])
def test_rendering_equals_transformers_apply_chat_template(hf_tokenizer, gpt2_tokenizer, name,
                                                           messages, add_generation_prompt):
    template = TEMPLATES[name]
    if name == "llama2" and messages is SYSTEM_CHAT:
        messages = SYSTEM_CHAT[:3]  # Llama 2's roles must alternate: tested below as an error
    ours = chat.render(template, messages, gpt2_tokenizer,
                       add_generation_prompt=add_generation_prompt)
    theirs = _hf_render(hf_tokenizer, template, messages, add_generation_prompt)
    assert ours == theirs
    assert len(ours) > 20  # the templates really rendered the messages


def test_default_template_renders_role_markers_and_end_of_text(gpt2_tokenizer):
    text = chat.render(None, [{"role": "user", "content": "2+3?"},
                              {"role": "assistant", "content": "5"}], gpt2_tokenizer,
                       add_generation_prompt=False)
    assert text == "user: 2+3?<|endoftext|>assistant: 5<|endoftext|>"
    prompt = chat.render(None, [{"role": "user", "content": "2+3?"}], gpt2_tokenizer,
                         add_generation_prompt=True)
    assert prompt == "user: 2+3?<|endoftext|>assistant: "
    assert gpt2_tokenizer.encode(prompt)[6] == gpt2_tokenizer.eot_id  # one special token


def test_byte_model_default_separator_is_the_eot_control_byte():
    tok = ByteTokenizer()
    text = chat.render(None, [{"role": "user", "content": "hi"}], tok, add_generation_prompt=True)
    assert text == "user: hi\x04assistant: "
    assert tok.encode("\x04") == [4] and chat.stop_text(tok) == "\x04"


@pytest.mark.parametrize("change", [
    ("{% elif message['role'] == 'system'", "{%- elif message['role'] == 'system'"),
    ("eos_token }}\n{% elif message['role'] == 'system'",
     "eos_token -}}\n{% elif message['role'] == 'system'"),
])
def test_parity_negative_control_one_whitespace_control_differs(hf_tokenizer, gpt2_tokenizer,
                                                                change):
    """Parity is sharp enough to see whitespace: rendering with a template changed by one
    whitespace control differs from transformers' rendering of the original."""
    old, new = change
    original = ZEPHYR
    changed = original.replace(old, new, 1)
    assert changed != original
    theirs = _hf_render(hf_tokenizer, original, SYSTEM_CHAT, True)
    assert chat.render(original, SYSTEM_CHAT, gpt2_tokenizer, add_generation_prompt=True) == theirs
    assert chat.render(changed, SYSTEM_CHAT, gpt2_tokenizer, add_generation_prompt=True) != theirs


def test_llama2_raise_exception_is_one_input_error(gpt2_tokenizer, hf_tokenizer):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="alternate"):  # transformers refuses it too
        _hf_render(hf_tokenizer, LLAMA2, bad, False)
    with pytest.raises(InputError, match="alternate") as e:
        chat.render(LLAMA2, bad, gpt2_tokenizer)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("template, match", [
    ("{% for m in messages %}", "not valid Jinja2.*line 1"),
    ("", "non-empty string"),
    ("{{ messages.__class__.__mro__ }}", "refused|failed"),  # the sandbox
    ("{{ undefined_function() }}", "refused|failed"),
])
def test_bad_templates_are_one_line_errors(gpt2_tokenizer, template, match):
    with pytest.raises(NumGPTError, match=match) as e:
        chat.render(template, PLAIN_CHAT, gpt2_tokenizer)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ("hi", "non-empty list"),
    ([["user", "hi"]], r"messages\[0\] must be an object"),
    ([{"role": "robot", "content": "hi"}], r"messages\[0\]\.role must be one of"),
    ([{"role": "user"}], r"messages\[0\]\.content must be a string"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": 3}],
     r"messages\[1\]\.content must be a string, got int"),
])
def test_bad_messages_are_one_line_errors_naming_the_field(gpt2_tokenizer, messages, match):
    with pytest.raises(InputError, match=match) as e:
        chat.render(None, messages, gpt2_tokenizer)
    assert "\n" not in str(e.value)


def test_template_files_jinja_and_tokenizer_config(tmp_path):
    (tmp_path / "t.jinja").write_text(CHATML, encoding="utf-8")
    assert chat.read_template_file(tmp_path / "t.jinja") == CHATML
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": ZEPHYR}))
    assert chat.read_template_file(tmp_path / "tokenizer_config.json") == ZEPHYR
    assert chat.hf_template(tmp_path) == ZEPHYR
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "x"},
                           {"name": "default", "template": CHATML}]}))
    assert chat.hf_template(tmp_path) == CHATML
    with pytest.raises(InputError, match="does not exist"):
        chat.read_template_file(tmp_path / "missing.jinja")
    (tmp_path / "bad.jinja").write_text("{% if %}")
    with pytest.raises(InputError, match="bad.jinja.*not valid Jinja2"):
        chat.read_template_file(tmp_path / "bad.jinja")
    assert chat.hf_template(tmp_path / "nothing") is None


def test_assistant_spans_cover_each_reply_and_its_separator(gpt2_tokenizer):
    text, spans = chat.conversation_spans(None, SYSTEM_CHAT[:3], gpt2_tokenizer)
    assert [text[a:b] for a, b in spans] == ["Five.<|endoftext|>"]
    ids, mask = chat.encode_conversation(None, SYSTEM_CHAT[:3], gpt2_tokenizer)
    assert gpt2_tokenizer.decode([t for t, m in zip(ids, mask) if m]) == "Five.<|endoftext|>"
    assert gpt2_tokenizer.decode(ids) == text
    with pytest.raises(InputError, match="no assistant message"):
        chat.conversation_spans(None, SYSTEM_CHAT[:2], gpt2_tokenizer)
    reorders = "{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(InputError, match=r"messages\[2\].*growing text"):
        chat.conversation_spans(reorders, SYSTEM_CHAT[:3], gpt2_tokenizer)


# ------------------------------------------------------------ templates with checkpoints


def _tiny_gpt2_bpe_model(gpt2_tokenizer_dir, n_embd=16):
    from numgpt.core.model import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=n_embd),
                seed=0)
    model.tokenizer = GPT2Tokenizer.from_folder(gpt2_tokenizer_dir)
    return model


def test_template_travels_with_numgpt_checkpoints_hf_and_gguf_exports(tmp_path,
                                                                      gpt2_tokenizer_dir,
                                                                      hf_tokenizer):
    import numgpt
    from numgpt.io import checkpoint
    model = _tiny_gpt2_bpe_model(gpt2_tokenizer_dir)
    model.chat_template = CHATML
    checkpoint.save(model, tmp_path / "ck")
    assert json.loads((tmp_path / "ck.json").read_text())["chat_template"] == CHATML
    assert numgpt.load(tmp_path / "ck").chat_template == CHATML
    checkpoint.export_hf(model, tmp_path / "hf")
    assert numgpt.load(tmp_path / "hf").chat_template == CHATML
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.apply_chat_template(SYSTEM_CHAT, tokenize=False, add_generation_prompt=True) \
        == chat.render(CHATML, SYSTEM_CHAT, model.tokenizer, add_generation_prompt=True)


def test_gguf_export_carries_the_template_and_the_default(tmp_path, gpt2_tokenizer_dir):
    import numgpt
    from numgpt.io.gguf import write_gguf

    model = _tiny_gpt2_bpe_model(gpt2_tokenizer_dir)
    write_gguf(model, tmp_path / "plain.gguf")
    assert numgpt.load(tmp_path / "plain.gguf").chat_template == chat.DEFAULT_TEMPLATE
    model.chat_template = CHATML
    write_gguf(model, tmp_path / "m.gguf")
    assert numgpt.load(tmp_path / "m.gguf").chat_template == CHATML


def test_a_model_without_template_exports_numgpts_default(tmp_path, gpt2_tokenizer_dir):
    import numgpt
    from numgpt.io import checkpoint

    model = _tiny_gpt2_bpe_model(gpt2_tokenizer_dir)
    checkpoint.save(model, tmp_path / "ck")
    assert "chat_template" not in json.loads((tmp_path / "ck.json").read_text())
    assert numgpt.load(tmp_path / "ck").chat_template is None
    checkpoint.export_hf(model, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == chat.DEFAULT_TEMPLATE
    assert config["eos_token"] == "<|endoftext|>"


def test_a_checkpoint_with_a_broken_template_is_one_error(tmp_path, gpt2_tokenizer_dir):
    import numgpt
    from numgpt.io import checkpoint

    model = _tiny_gpt2_bpe_model(gpt2_tokenizer_dir)
    model.chat_template = "{% if %}"
    checkpoint.save(model, tmp_path / "ck")
    with pytest.raises(NumGPTError, match=r"ck\.json: 'chat_template' is not valid Jinja2") as e:
        numgpt.load(tmp_path / "ck")
    assert "\n" not in str(e.value)


def test_a_template_nested_too_deeply_is_one_error_not_a_recursion_error(gpt2_tokenizer):
    import results_table

    deep = "{{ " + "(" * 2000 + "1" + ")" * 2000 + " }}"
    try:
        chat.render(deep, PLAIN_CHAT, gpt2_tokenizer)
        happened, ok = "rendered", False
    except NumGPTError as e:
        happened, ok = f"{type(e).__name__}: {e}", "nests too deeply" in str(e) and "\n" not in str(e)
    except RecursionError as e:
        happened, ok = f"RecursionError (a traceback): {e}", False
    results_table.record("faults.md", "23 chat template nested 2000 deep", happened,
                         "one NumGPTError line", "PASS" if ok else "FAIL")
    assert ok, happened
    loops = "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"  # recursion while rendering
    with pytest.raises(InputError, match="RecursionError"):
        chat.render(loops, PLAIN_CHAT, gpt2_tokenizer)


def test_a_quantized_models_template_survives_save_and_hf_export(tmp_path, gpt2_tokenizer_dir):
    import numgpt
    from numgpt.core import quant
    from numgpt.io import checkpoint

    model = _tiny_gpt2_bpe_model(gpt2_tokenizer_dir, n_embd=32)  # q8_0 blocks of 32
    model.chat_template = CHATML
    quant.quantize_model(model)
    checkpoint.save(model, tmp_path / "q")
    assert numgpt.load(tmp_path / "q").chat_template == CHATML
    checkpoint.export_hf(model, tmp_path / "hf")  # through a dequantized copy
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"] \
        == CHATML


# ------------------------------------------------- benchmarks/bench_llamacpp.py's chat check


def _bench_llamacpp():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_llamacpp.py"
    spec = importlib.util.spec_from_file_location("bench_llamacpp", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_llamacpp_chat_check_numgpt_side_equals_numgpt_generate(tmp_path, gpt2_tokenizer_dir,
                                                                 capsys):
    """The issue 23 check in benchmarks/bench_llamacpp.py (llama.cpp is not built here): the
    body it POSTs to llama-server's /v1/chat/completions is an OpenAI chat request, greedy;
    its numgpt side, on the GGUF export, replies what `numgpt generate --temperature 0` gives
    for the messages rendered with the GGUF's template; other messages get another prompt."""
    import numpy as np

    import numgpt
    from numgpt.cli import main
    from numgpt.io.gguf import write_gguf

    bench = _bench_llamacpp()
    body = bench.chat_request(SYSTEM_CHAT, 6)
    assert json.loads(json.dumps(body)) == body  # JSON as sent
    assert body["messages"] == SYSTEM_CHAT and body["max_tokens"] == 6
    assert body["temperature"] == 0 and body["top_k"] == 1 and body["stream"] is False
    assert all(set(m) == {"role", "content"} for m in body["messages"])

    from numgpt.core.model import GPT, GPTConfig

    model = GPT(GPTConfig(vocab_size=50257, block_size=64, n_layer=1, n_head=2, n_embd=16), seed=0)
    model.tokenizer = GPT2Tokenizer.from_folder(gpt2_tokenizer_dir)
    model.wte.weight.data *= np.float32(5.0)  # as the bench's build: clear greedy margins
    gguf = tmp_path / "chat.gguf"
    write_gguf(model, gguf)
    loaded = numgpt.load(gguf)
    ours = bench.numgpt_chat(loaded, body)
    rendered = chat.render(None, SYSTEM_CHAT, loaded.tokenizer, add_generation_prompt=True)
    assert ours["prompt_text"] == rendered and rendered.endswith("<|endoftext|>assistant: ")
    assert main(["generate", "--model", str(gguf), "--prompt", rendered, "-n", "6",
                 "--temperature", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt_ids"] == ours["prompt_ids"]
    assert 1 <= len(ours["ids"]) <= 6 and out["generated_ids"] == ours["ids"]
    assert out["text"] == ours["text"]
    # negative: the check sees the messages (one turn fewer is another prompt and reply)
    other = bench.numgpt_chat(loaded, bench.chat_request(SYSTEM_CHAT[:2], 6))
    assert other["prompt_ids"] != ours["prompt_ids"] and other["ids"] != ours["ids"]
    line = bench.chat_line({"same": False, "same_prompt": True, "same_prompt_tokens": None})
    assert "same reply text as numgpt's: NO" in line and "(/apply-template): yes" in line
    assert "not served" in line
