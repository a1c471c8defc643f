"""Tokenizers: byte round trips, and GPT-2 BPE against Hugging Face on the same local files."""

import json
import socket

import numpy as np
import pytest

from conftest import shared_data_dir
from numgpt.errors import CheckpointError, ConfigError, InputError
from numgpt.io.tokenizer import (
    PACKAGED_GPT2,
    ByteTokenizer,
    GPT2Tokenizer,
    describe_token,
    load_tokenizer,
    save_files,
    tokenizer_from_config,
)

EOT = "<|endoftext|>"

HARD_STRINGS = [
    "",
    "Hello.",
    "Hello world! How are you?",
    # several scripts, combining marks
    "Ελληνικά, русский язык, العربية, עברית, हिन्दी, 中文字符, 日本語のテキスト, 한국어",
    "e\u0301 n\u0303 a\u0308 — Zalgơ̴̢ text",
    # emoji: plain, skin tone, ZWJ family, flag, keycap
    "🙂 👍🏽 👩‍👩‍👧‍👦 👨‍💻 🏳️‍🌈 🇯🇵 1️⃣",
    # whitespace runs, tabs, CR, trailing and leading spaces, exotic spaces
    "a   b\n\n\t c",
    "trailing spaces   ",
    "   leading spaces",
    "line\r\nwindows\r\n",
    "\n\n\n",
    " \u00a0nbsp \u3000ideographic\u2028sep",
    # contractions (GPT-2's pattern is case-sensitive: "'S" is not a contraction)
    "I'm they'll don't 'S I'M we've you're she'd it's",
    "''' '' 'll' ",
    # numbers
    "12345 3.14 1,000,000 0x1F 1e-9 " + "9" * 40,
    # control bytes and code
    "\x00\x01\x7f tab\there",
    "def f(x):\n    return x ** 2  # square\n",
    # the end-of-text marker as plain text
    f"a{EOT}b",
    f"{EOT}{EOT} {EOT}\n",
    "<|endoftext", "|endoftext|>",
]


# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def gpt2(gpt2_tokenizer_dir):
    return GPT2Tokenizer.from_folder(gpt2_tokenizer_dir)


@pytest.fixture(scope="session")
def hf_reference(gpt2_tokenizer_dir):
    """Hugging Face's GPT-2 tokenizer built from the same local files (independent oracle).

    transformers 5 takes the file paths as ``vocab=``/``merges=``: the old
    ``vocab_file=``/``merges_file=`` keywords are silently ignored and give an EMPTY
    tokenizer, so we assert it is really GPT-2 before trusting it.
    """
    transformers = pytest.importorskip("transformers")
    ref = transformers.GPT2TokenizerFast(vocab=str(gpt2_tokenizer_dir / "vocab.json"),
                                         merges=str(gpt2_tokenizer_dir / "merges.txt"))
    assert len(ref) == 50257
    assert ref.encode("Hello.") == [15496, 13]
    return ref


@pytest.fixture(scope="session")
def shakespeare(shakespeare_path):
    return shakespeare_path.read_text(encoding="utf-8")


def hf_encode(ref, text, special):
    """HF ids; ``special=False`` spells <|endoftext|> out as text, like our default."""
    return ref(text, add_special_tokens=False, split_special_tokens=not special)["input_ids"]


def hf_decode(ref, ids):
    return ref.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def write_files(folder, vocab, merges, *, header=False):
    """Write a GPT-2 tokenizer folder in Hugging Face naming from a vocab dict and merge lines."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = (["#version: 0.2"] if header else []) + merges
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def read_files(folder):
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = [m for m in (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
              if m and not m.startswith("#version")]
    return vocab, merges


# ------------------------------------------------------------------- byte tokenizer


def test_byte_round_trip_is_exact_for_random_bytes_including_invalid_utf8():
    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 1000, 65536):
        data = rng.integers(0, 256, size=n, dtype=np.uint8).tobytes()
        ids = tok.encode_bytes(data)
        assert len(ids) == n and all(0 <= i < 256 for i in ids)
        assert tok.decode_bytes(ids) == data
        assert tok.decode_bytes(np.array(ids, dtype=np.uint16)) == data
    assert tok.vocab_size == 256 and tok.eot_id is None


def test_byte_encode_is_utf8_and_decode_shows_replacement_char_for_invalid_bytes():
    tok = ByteTokenizer()
    assert tok.encode("é€🙂") == list("é€🙂".encode("utf-8"))
    assert tok.decode(tok.encode("héllo\n")) == "héllo\n"
    # a lone continuation byte, a cut-off 3-byte character, and 0xff: no exception
    assert tok.decode([0x80, ord("a"), 0xE2, 0x82, ord("b"), 0xFF]) == "\ufffda\ufffdb\ufffd"


def test_byte_decode_rejects_ids_outside_the_vocabulary():
    with pytest.raises(InputError, match="256"):
        ByteTokenizer().decode([65, 256])
    with pytest.raises(InputError, match="-1"):
        ByteTokenizer().decode_bytes([-1])


# ----------------------------------------------------------------- GPT-2 BPE basics


def test_gpt2_standard_case_hello(gpt2):
    assert gpt2.encode("Hello.") == [15496, 13]
    assert gpt2.decode([15496, 13]) == "Hello."
    assert gpt2.vocab_size == 50257 and gpt2.eot_id == 50256


def test_gpt2_endoftext_is_special_by_default_and_plain_when_asked(gpt2, hf_reference):
    """One rule everywhere (the HF tokenizer's): <|endoftext|> is id 50256 unless the caller
    asks for ordinary text."""
    text = f"one{EOT}two {EOT}"
    plain = gpt2.encode(text, allow_special=False)
    special = gpt2.encode(text)
    assert special == gpt2.encode(text, allow_special=True)
    assert 50256 not in plain and special.count(50256) == 2
    assert plain == hf_encode(hf_reference, text, special=False)
    assert special == hf_encode(hf_reference, text, special=True)
    # both ways decode back to the same text, as Hugging Face does
    assert gpt2.decode(plain) == gpt2.decode(special) == text == hf_decode(hf_reference, special)


def test_gpt2_decode_never_raises_on_partial_utf8_and_matches_reference(gpt2, hf_reference):
    ids = gpt2.encode("a 🙂 €")
    for cut in range(len(ids) + 1):  # every prefix, including ones ending mid-character
        assert gpt2.decode(ids[:cut]) == hf_decode(hf_reference, ids[:cut])
    assert gpt2.token_bytes(447) == b"\xe2\x80"
    assert gpt2.decode([447]) == "\ufffd"


def test_gpt2_token_bytes_concatenate_to_decode_bytes_for_streaming(gpt2):
    text = "Streaming 🙂 works — even mid-character.\n"
    ids = gpt2.encode(text)
    assert b"".join(gpt2.token_bytes(i) for i in ids) == gpt2.decode_bytes(ids) == text.encode()


def test_gpt2_decode_rejects_ids_outside_the_vocabulary(gpt2):
    with pytest.raises(InputError, match="50257"):
        gpt2.decode([15496, 50257])


# ------------------------------------------------------------ parity with Hugging Face


def test_gpt2_matches_hugging_face_on_all_of_tinyshakespeare(gpt2, hf_reference, shakespeare):
    ids = gpt2.encode(shakespeare)
    ref_ids = hf_encode(hf_reference, shakespeare, special=False)
    assert len(ids) == len(ref_ids) > 300_000
    assert ids == ref_ids
    assert gpt2.decode(ids) == hf_decode(hf_reference, ref_ids) == shakespeare


@pytest.mark.parametrize("text", HARD_STRINGS)
@pytest.mark.parametrize("special", [False, True], ids=["plain", "allow_special"])
def test_gpt2_matches_hugging_face_on_hard_strings(gpt2, hf_reference, text, special):
    ids = gpt2.encode(text, allow_special=special)
    assert ids == hf_encode(hf_reference, text, special=special)
    assert gpt2.decode(ids) == hf_decode(hf_reference, ids) == text


def test_negative_control_self_consistent_but_corrupted_ranks_give_different_ids(
        gpt2_tokenizer_dir, hf_reference, shakespeare, tmp_path):
    """Swap merges #0 ('Ġ t') and #2 ('h e') together with their vocab ids: the files still
    pass the consistency check, but the parity comparison must notice the difference."""
    vocab, merges = read_files(gpt2_tokenizer_dir)
    merges[0], merges[2] = merges[2], merges[0]
    vocab["Ġt"], vocab["he"] = vocab["he"], vocab["Ġt"]
    bad = GPT2Tokenizer.from_folder(write_files(tmp_path / "bad", vocab, merges))
    ids = bad.encode(shakespeare)
    ref_ids = hf_encode(hf_reference, shakespeare, special=False)
    assert ids != ref_ids  # the parity assertion above would fail on this tokenizer
    assert sum(a != b for a, b in zip(ids, ref_ids)) > 0  # not just a length difference
    assert bad.decode(ids) == shakespeare  # still a valid tokenizer, just not GPT-2's


# ----------------------------------------------------------------- files and naming


def test_openai_file_naming_with_version_header_gives_identical_encodings(
        gpt2, gpt2_tokenizer_dir, shakespeare, tmp_path):
    folder = tmp_path / "openai"
    folder.mkdir()
    (folder / "encoder.json").write_bytes((gpt2_tokenizer_dir / "vocab.json").read_bytes())
    merges = (gpt2_tokenizer_dir / "merges.txt").read_text(encoding="utf-8")
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + merges, encoding="utf-8")
    openai = load_tokenizer(str(folder))
    assert openai.encode(shakespeare[:200_000]) == gpt2.encode(shakespeare[:200_000])
    for text in HARD_STRINGS:
        assert openai.encode(text, allow_special=True) == gpt2.encode(text, allow_special=True)


def test_merges_with_and_without_version_header_both_load(gpt2_tokenizer_dir, tmp_path):
    vocab, merges = read_files(gpt2_tokenizer_dir)
    for header in (False, True):
        tok = load_tokenizer(write_files(tmp_path / f"h{header}", vocab, merges, header=header))
        assert tok.encode("Hello. I'm a little late") == [15496, 13, 314, 1101, 257, 1310, 2739]


def test_folder_without_tokenizer_files_names_the_folder_and_expected_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(InputError) as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert "vocab.json" in str(err.value) and "encoder.json" in str(err.value)
    with pytest.raises(InputError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_merges_inconsistent_with_vocab_ids_are_rejected(gpt2_tokenizer_dir, tmp_path):
    vocab, merges = read_files(gpt2_tokenizer_dir)
    swapped = list(merges)
    swapped[0], swapped[2] = swapped[2], swapped[0]
    with pytest.raises(CheckpointError, match="line 1 .*do not belong together"):
        load_tokenizer(write_files(tmp_path / "swapped", vocab, swapped))
    with pytest.raises(CheckpointError, match="line 3 is 'h e x'"):
        load_tokenizer(write_files(tmp_path / "three", vocab, merges[:2] + ["h e x"]))


def test_loading_fetches_nothing(gpt2_tokenizer_dir, monkeypatch):
    import tiktoken.load

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer tried to fetch or open a network resource")

    monkeypatch.setattr(tiktoken.load, "read_file", refuse)
    monkeypatch.setattr(tiktoken.load, "read_file_cached", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert load_tokenizer(gpt2_tokenizer_dir).encode("Hello.") == [15496, 13]


# ------------------------------------------------------------ config and save_files


def test_config_round_trip_for_both_tokenizers(gpt2, custom_bpe_dir):
    """GPT-2's own files are recorded by name, wherever they were read from (was: by their
    absolute path, so a checkpoint broke when that folder moved); other BPE files by path."""
    assert isinstance(tokenizer_from_config(ByteTokenizer().to_config()), ByteTokenizer)
    cfg = gpt2.to_config()
    assert cfg == {"type": "gpt2-bpe", "name": "gpt2"}
    assert tokenizer_from_config(json.loads(json.dumps(cfg))).encode("Hello.") == [15496, 13]
    other = GPT2Tokenizer.from_folder(custom_bpe_dir)
    assert other.builtin is None and other.vocab_size == 1257
    assert other.to_config() == {"type": "gpt2-bpe", "path": str(custom_bpe_dir.resolve())}
    assert tokenizer_from_config(other.to_config()).encode("Hello.") == other.encode("Hello.")
    # a relative path resolves against the folder holding the config
    rel = tokenizer_from_config({"type": "gpt2-bpe", "path": custom_bpe_dir.name},
                                base_dir=custom_bpe_dir.parent)
    assert rel.encode("Hello. I'm late") == other.encode("Hello. I'm late")
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)


@pytest.mark.parametrize("cfg, match", [
    ({"type": "sentencepiece"}, "unknown tokenizer type"),
    ({"type": "bytes", "path": "x"}, "unknown keys"),
    ({"type": "gpt2-bpe"}, "needs a string 'path'"),
    ({"type": "gpt2-bpe", "name": "gpt3"}, "'name' must be 'gpt2'"),
    ({"type": "gpt2-bpe", "name": "gpt2", "path": "x"}, "comes without 'path'"),
    ("bytes", "mapping"),
])
def test_bad_tokenizer_config_is_a_config_error(cfg, match):
    with pytest.raises(ConfigError, match=match):
        tokenizer_from_config(cfg)


def test_save_files_writes_exact_copies_and_byte_tokenizer_writes_nothing(
        gpt2, gpt2_tokenizer_dir, tmp_path):
    out = tmp_path / "export"
    assert save_files(gpt2, out) is True
    for name in ("vocab.json", "merges.txt"):
        assert (out / name).read_bytes() == (gpt2_tokenizer_dir / name).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["merges.txt", "vocab.json"]
    assert load_tokenizer(out).encode("Hello.") == [15496, 13]
    empty = tmp_path / "bytes_export"
    empty.mkdir()
    assert save_files(ByteTokenizer(), empty) is False
    assert list(empty.iterdir()) == []


# ------------------------------------------------------------------ display, speed


def test_describe_token_is_readable(gpt2):
    assert describe_token(gpt2, 262) == "' the'"
    assert describe_token(gpt2, 198) == "'\\n'"
    assert describe_token(gpt2, 50256) == "'<|endoftext|>'"
    assert describe_token(gpt2, 447) == "b'\\xe2\\x80'"  # first 2 bytes of a 3-byte char
    assert describe_token(ByteTokenizer(), 0xE2) == "b'\\xe2'"
    assert describe_token(ByteTokenizer(), ord("a")) == "'a'"


# ------------------------------------------------------------ the files in the package


def test_packaged_gpt2_files_are_the_shared_ones_byte_for_byte():
    shared = shared_data_dir() / "gpt2"
    if not all((shared / n).is_file() for n in ("vocab.json", "merges.txt")):
        pytest.skip(f"no GPT-2 files in {shared} to compare the packaged copy with")
    for name in ("vocab.json", "merges.txt"):
        assert (PACKAGED_GPT2 / name).read_bytes() == (shared / name).read_bytes(), name
    licence = (PACKAGED_GPT2 / "LICENSE").read_text(encoding="utf-8")
    assert "Modified MIT License" in licence and "Copyright (c) 2019 OpenAI" in licence
    assert "github.com/openai/gpt-2" in licence


def test_spec_gpt2_is_the_packaged_bpe_with_no_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder called gpt2 here: the name alone must do
    tok = load_tokenizer("gpt2")
    assert isinstance(tok, GPT2Tokenizer) and tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.encode("Hello.") == [15496, 13]
    assert tok.builtin == "gpt2" and tok.path == PACKAGED_GPT2.resolve()
    assert tokenizer_from_config({"type": "gpt2-bpe", "name": "gpt2"}).encode("Hello.") == [15496, 13]
    # a folder named gpt2 is reached by a path, not by the bare name
    with pytest.raises(InputError, match="does not exist"):
        load_tokenizer("./gpt2")


def test_gpt2_is_recognised_by_content_in_any_naming(gpt2_tokenizer_dir, custom_bpe_dir, tmp_path):
    """OpenAI's names, a #version header and re-spaced JSON are the same tokenizer; one
    merge fewer is not."""
    vocab, merges = read_files(gpt2_tokenizer_dir)
    openai = tmp_path / "openai"
    openai.mkdir()
    (openai / "encoder.json").write_text(json.dumps(vocab, indent=1), encoding="utf-8")
    (openai / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    assert load_tokenizer(openai).to_config() == {"type": "gpt2-bpe", "name": "gpt2"}
    # in-memory text (a GGUF's tokenizer) is recognised too
    text = GPT2Tokenizer(json.dumps(vocab), "\n".join(merges))
    assert text.to_config() == {"type": "gpt2-bpe", "name": "gpt2"}
    # negative control: a different BPE keeps its path
    other = load_tokenizer(custom_bpe_dir)
    assert other.builtin is None and other.to_config()["path"] == str(custom_bpe_dir.resolve())


def test_package_data_declares_the_gpt2_folder():
    """setuptools ships what pyproject's package-data names: the glob must cover the files."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")
    root = PACKAGED_GPT2.parents[2]
    data = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    globs = data["tool"]["setuptools"]["package-data"]["numgpt.io"]
    for name in ("vocab.json", "merges.txt", "LICENSE"):
        assert any(fnmatch.fnmatch(f"gpt2/{name}", g) for g in globs), name
