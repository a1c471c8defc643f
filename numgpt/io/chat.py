"""Chat templates: a conversation as the text a model reads, in Hugging Face's format.

A chat template is a Jinja2 template over ``messages`` (a list of ``{"role", "content"}``
dicts), the format Hugging Face stores as ``chat_template`` in ``tokenizer_config.json`` and
GGUF as ``tokenizer.chat_template``. It is rendered exactly as ``transformers``'
``apply_chat_template`` renders it (``transformers.utils.chat_template_utils``): a sandboxed
``ImmutableSandboxedEnvironment`` with ``trim_blocks`` and ``lstrip_blocks``, the
``loopcontrols`` extension, the globals ``raise_exception``, ``strftime_now``, ``dict`` and
``namespace``, a ``tojson`` filter that does not escape HTML, and the variables
``messages``, ``add_generation_prompt`` and the tokenizer's special tokens (``bos_token``,
``eos_token``, ``unk_token``). A test renders several templates with both and compares.

``DEFAULT_TEMPLATE`` is numgpt's template for a model that has none: each message is its role,
a colon and a space, its content, then the end-of-text separator (``eos_token``); the
generation prompt is ``assistant: ``. So ``[user "2+3?", assistant "5"]`` reads
``user: 2+3?<|endoftext|>assistant: 5<|endoftext|>`` for GPT-2's tokenizer, and the model's
reply ends where it emits its end-of-text token. A byte-level model has no end-of-text token,
so its separator is the one byte ``\\x04`` (ASCII "end of transmission"): it is valid UTF-8,
is one token, and never occurs in ordinary text; generation stops on it as on a stop string.

Where a model's template comes from: ``--chat-template FILE``, else the one its checkpoint
carries (``model.chat_template``, read from a numgpt checkpoint's ``.json``, a Hugging Face
folder's ``tokenizer_config.json`` or a GGUF's ``tokenizer.chat_template``), else the default.

For training (``conversation_spans``) each assistant message's share of the rendered text is
found by rendering the conversation up to it with the generation prompt and up to its end:
the difference is what the model must learn to write (its content and the separator after it).
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..core.checks import is_int
from ..errors import InputError

__all__ = ["DEFAULT_TEMPLATE", "BYTE_SEPARATOR", "ROLES", "special_tokens", "stop_text",
           "check_messages", "render", "read_template_file", "check_template", "template_of",
           "hf_template", "conversation_spans", "encode_conversation", "count_conversations",
           "read_conversations", "QA_TEMPLATE", "arithmetic_set", "write_arithmetic_set"]

DEFAULT_TEMPLATE = ("{% for message in messages %}"
                    "{{ message['role'] + ': ' + message['content'] + eos_token }}"
                    "{% endfor %}"
                    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
BYTE_SEPARATOR = "\x04"  # a byte-level model's end-of-message: ASCII end of transmission
ROLES = ("system", "user", "assistant")
MAX_TEMPLATE_CHARS = 1 << 20  # a template is code; a megabyte is far past any real one


def special_tokens(tokenizer) -> dict[str, str]:
    """The template's special-token variables, as ``transformers`` passes a tokenizer's
    ``special_tokens_map``: GPT-2's one special token ``<|endoftext|>`` is its bos, eos and
    unk token; a tokenizer without one (bytes) uses ``BYTE_SEPARATOR`` for all three."""
    eot = getattr(tokenizer, "eot_id", None)
    text = tokenizer.decode([eot]) if eot is not None else BYTE_SEPARATOR
    return {"bos_token": text, "eos_token": text, "unk_token": text}


def stop_text(tokenizer) -> str | None:
    """The stop string a chat reply needs besides end-of-text: the byte separator when the
    tokenizer has no end-of-text token (generation stops on that token otherwise)."""
    return None if getattr(tokenizer, "eot_id", None) is not None else BYTE_SEPARATOR


@lru_cache(maxsize=16)
def _compiled(source: str):
    """``source`` compiled as ``transformers._cached_compile_jinja_template`` does (minus
    its ``{% generation %}`` tracker, which numgpt's masks do not need)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:  # dict() without attribute access to the dict type
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):  # no dunder attributes on a namespace
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a "
                    f"namespace, got {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now,
                       dict=TemplateDict(), namespace=TemplateNamespace)
    return env.from_string(source)


def check_template(source: Any, where: str = "the chat template") -> str:
    """``source`` if it is a Jinja2 template that compiles; InputError naming the line else."""
    import jinja2

    if not isinstance(source, str) or not source.strip():
        raise InputError(f"{where} must be a non-empty string of Jinja2 text, got "
                         f"{type(source).__name__}; give a template such as numgpt's default")
    if len(source) > MAX_TEMPLATE_CHARS:
        raise InputError(f"{where} has {len(source)} characters, more than the limit of "
                         f"{MAX_TEMPLATE_CHARS}; a chat template is a few hundred")
    try:
        _compiled(source)
    except jinja2.TemplateSyntaxError as e:
        raise InputError(f"{where} is not valid Jinja2: {e.message} (line {e.lineno}); fix "
                         f"the template") from None
    except (RecursionError, MemoryError):  # Jinja2 and Python's compiler recurse per nesting level
        raise InputError(f"{where} nests too deeply to compile; a chat template needs a few "
                         f"levels, so simplify it") from None
    return source


def check_messages(messages: Any, where: str = "messages") -> list[dict]:
    """Plain copies of ``messages`` after checking the shape every template assumes: a
    non-empty list of objects, each with ``role`` (system, user or assistant) and string
    ``content``. Other keys are kept (templates may read them)."""
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where} must be a non-empty list of {{\"role\", \"content\"}} "
                         f"objects, got {json.dumps(messages)[:80] if _jsonable(messages) else type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InputError(f"{where}[{i}] must be an object with 'role' and 'content', got "
                             f"{type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise InputError(f"{where}[{i}].role must be one of {', '.join(ROLES)}, got "
                             f"{json.dumps(role)[:40] if _jsonable(role) else type(role).__name__}")
        if not isinstance(content, str):
            raise InputError(f"{where}[{i}].content must be a string, got "
                             f"{type(content).__name__}")
        out.append(json.loads(json.dumps(dict(m))))  # plain JSON data only, as transformers does
    return out


def _jsonable(x: Any) -> bool:
    try:
        json.dumps(x)
    except (TypeError, ValueError):
        return False
    return True


def render(template: str | None, messages: Sequence[Mapping], tokenizer, *,
           add_generation_prompt: bool = False, check: bool = True) -> str:
    """The text the model reads for ``messages`` (``DEFAULT_TEMPLATE`` when ``template`` is
    None); equals ``apply_chat_template(..., tokenize=False)``. A template that raises (its
    ``raise_exception``, an undefined call) is one InputError line."""
    import jinja2

    source = check_template(template) if template is not None else DEFAULT_TEMPLATE
    chat = check_messages(messages) if check else list(messages)
    try:
        return _compiled(source).render(messages=chat, add_generation_prompt=add_generation_prompt,
                                        **special_tokens(tokenizer))
    except jinja2.TemplateError as e:
        raise InputError(f"the chat template refused these messages: {e}; fix the messages "
                         f"or the template") from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError, RecursionError,
            OverflowError, ZeroDivisionError) as e:
        raise InputError(f"the chat template failed on these messages: {type(e).__name__}: "
                         f"{str(e)[:200]}; fix the messages or the template") from None


def read_template_file(path: str | os.PathLike) -> str:
    """``--chat-template FILE``: the file's text, or its ``chat_template`` when it is a
    Hugging Face ``tokenizer_config.json`` (or a JSON string)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"chat template file {str(p)!r} does not exist; give a Jinja2 file "
                         f"or a tokenizer_config.json") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read chat template file {str(p)!r}: {e}") from None
    if p.suffix == ".json":
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise InputError(f"{str(p)!r} is not valid JSON ({e}); give the template as a "
                             f"Jinja2 text file or a tokenizer_config.json") from None
        found = _pick_template(doc.get("chat_template") if isinstance(doc, dict) else doc, p)
        if found is None:
            raise InputError(f"{str(p)!r} holds no 'chat_template'; give a file that has one")
        text = found
    return check_template(text, f"the chat template in {str(p)!r}")


def _pick_template(value: Any, where) -> str | None:
    """A ``chat_template`` value: a string, or transformers' list of ``{"name", "template"}``
    (the one named "default" is the chat template)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
        return None
    raise InputError(f"{where}: 'chat_template' must be a string or a list of named "
                     f"templates, got {type(value).__name__}")


def hf_template(folder: str | os.PathLike) -> str | None:
    """A Hugging Face folder's chat template: ``chat_template.jinja`` (transformers' newer
    place) or ``tokenizer_config.json``'s ``chat_template``; None when there is none."""
    folder = Path(folder)
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return read_template_file(jinja_file)
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        doc = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {str(config)!r}: {e}; fix or remove it") from None
    found = _pick_template(doc.get("chat_template") if isinstance(doc, dict) else None, config)
    return None if found is None else check_template(found, f"the chat template in {str(config)!r}")


def template_of(model, override: str | None = None) -> str:
    """The template a model is chatted with: ``override`` (``--chat-template``), else the
    one it carries, else ``DEFAULT_TEMPLATE``."""
    return override or getattr(model, "chat_template", None) or DEFAULT_TEMPLATE


def conversation_spans(template: str | None, messages: Sequence[Mapping], tokenizer,
                       where: str = "messages") -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, [(start, end) character span of each assistant reply]).
    Reply i's span is what the template adds between the conversation before it with the
    generation prompt and the conversation up to its end; a template for which the first
    is not a prefix of the second, or that renders earlier turns differently later, cannot
    mask a reply and is refused."""
    chat = check_messages(messages, where)
    full = render(template, chat, tokenizer, check=False)
    spans = []
    for i, m in enumerate(chat):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:  # OpenAI's weight 0: not trained
            continue
        before = render(template, chat[:i], tokenizer, add_generation_prompt=True, check=False)
        upto = render(template, chat[:i + 1], tokenizer, check=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise InputError(f"{where}[{i}]: the chat template does not render this "
                             f"conversation as a growing text (each turn appended), so the "
                             f"assistant's tokens cannot be found; use a template that appends")
        spans.append((len(before), len(upto)))
    if not spans:
        raise InputError(f"{where} has no assistant message, so nothing would carry loss; "
                         f"give each conversation at least one")
    return full, spans


def encode_conversation(template: str | None, messages: Sequence[Mapping], tokenizer,
                        where: str = "messages") -> tuple[list[int], list[bool]]:
    """(token ids, whether each token is part of an assistant reply). Pieces are encoded
    one by one, cut at the reply spans, so each reply's first token starts exactly where a
    prompt rendered with the generation prompt ends, as at inference."""
    text, spans = conversation_spans(template, messages, tokenizer, where)
    ids: list[int] = []
    mask: list[bool] = []
    at = 0
    for start, end in spans:
        for piece, mine in ((text[at:start], False), (text[start:end], True)):
            if piece:
                tokens = tokenizer.encode(piece, allow_special=True)
                ids += tokens
                mask += [mine] * len(tokens)
        at = end
    if text[at:]:
        tokens = tokenizer.encode(text[at:], allow_special=True)
        ids += tokens
        mask += [False] * len(tokens)
    return ids, mask


# ------------------------------------------------------------- conversation files (JSONL)


def _jsonl_lines(path: Path):
    """(line number, text) of each non-blank line; InputError naming a line not UTF-8."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path} line {n} is not valid UTF-8 (byte {e.start} of the "
                                 f"line); convert the file to UTF-8") from None
            if text.strip():
                yield n, text


def count_conversations(path: str | os.PathLike) -> int:
    """Non-blank lines of a conversations file (each must be one conversation)."""
    return sum(1 for _ in _jsonl_lines(Path(path)))


def read_conversations(path: str | os.PathLike):
    """Yield ``(line number, messages)`` for each line of a JSONL file in OpenAI's
    fine-tuning format, ``{"messages": [{"role", "content"}, ...]}`` (blank lines skipped).
    A line that is not such an object is one InputError naming the line and the field;
    the messages themselves are checked when rendered (``check_messages``)."""
    path = Path(path)
    for n, text in _jsonl_lines(path):
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise InputError(f"{path} line {n} is not valid JSON ({e}); each line must be one "
                             f"{{\"messages\": [...]}} object") from None
        if not isinstance(doc, dict) or "messages" not in doc:
            raise InputError(f"{path} line {n}: no 'messages' field; each line must be one "
                             f"{{\"messages\": [{{\"role\", \"content\"}}, ...]}} object")
        yield n, doc["messages"]


# ------------------------------------------------ a synthetic set for the README's recipe

# A compact template for small models trained from scratch: the answer starts 7 bytes after
# the question's last digit (numgpt's default puts "\x04assistant: " there, 14 bytes), so a
# byte-level model learns to read the question within a minute of CPU.
QA_TEMPLATE = ("{% for message in messages %}"
               "{% if message['role'] == 'system' %}{{ message['content'] + '\\n' }}"
               "{% elif message['role'] == 'user' %}{{ 'Q: ' + message['content'] + '\\n' }}"
               "{% else %}{{ 'A: ' + message['content'] + eos_token + '\\n' }}{% endif %}"
               "{% endfor %}"
               "{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}")


def arithmetic_set(numbers: int = 100, held_out: float = 0.2, repeat: int = 8,
                   seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(training conversations, held-out conversations) of the question ``"N+1"`` and the
    answer ``str(N + 1)`` for N in [0, numbers): a random ``held_out`` share of the N never
    appears in training (each other question ``repeat`` times, shuffled). Answering a
    held-out question takes the rule (copy the digits, add one, carry), not a memory."""
    import random

    if not (is_int(numbers) and numbers >= 5 and 0 < held_out < 1 and repeat >= 1):
        raise InputError(f"arithmetic_set needs numbers >= 5, held_out in (0, 1) and repeat "
                         f">= 1, got {numbers}, {held_out}, {repeat}")
    rng = random.Random(seed)
    ns = list(range(numbers))
    rng.shuffle(ns)
    cut = max(1, round(numbers * held_out))

    def conv(n: int) -> dict:
        return {"messages": [{"role": "user", "content": f"{n}+1"},
                             {"role": "assistant", "content": str(n + 1)}]}

    train = [conv(n) for n in ns[cut:] for _ in range(repeat)]
    rng.shuffle(train)
    return train, [conv(n) for n in sorted(ns[:cut])]


def write_arithmetic_set(folder: str | os.PathLike, **options) -> dict[str, Path]:
    """``arithmetic_set`` as files in ``folder``: ``train.jsonl`` and ``heldout.jsonl``
    (OpenAI's fine-tuning format), ``questions.txt`` (the held-out questions, one a line,
    for ``numgpt chat``) and ``template.jinja`` (``QA_TEMPLATE``). Returns the paths."""
    from .files import atomic_write, make_folder

    folder = make_folder(Path(folder), "chat-data")
    train, held = arithmetic_set(**options)
    lines = lambda convs: "".join(json.dumps(c) + "\n" for c in convs)  # noqa: E731
    files = {"train": (folder / "train.jsonl", lines(train)),
             "heldout": (folder / "heldout.jsonl", lines(held)),
             "questions": (folder / "questions.txt",
                           "".join(c["messages"][0]["content"] + "\n" for c in held)),
             "template": (folder / "template.jinja", QA_TEMPLATE + "\n")}
    for path, text in files.values():
        atomic_write(path, text)
    return {k: p for k, (p, _) in files.items()}
