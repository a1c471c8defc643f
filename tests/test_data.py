"""prepare -> token files -> batches: round trips, streaming equivalence, bad input."""

import json

import numpy as np
import pytest
import regex

from numgpt.io.data import TokenDataset, get_batch, load_split, prepare
from numgpt.errors import InputError
from numgpt.io.tokenizer import GPT2_PATTERN, ByteTokenizer, GPT2Tokenizer

# multi-byte characters (2, 3, 4 bytes), whitespace runs, \r\n, tabs, unicode spaces,
# contractions and digits: the places a naive chunk boundary would change the ids
TRICKY = ("Héllo wörld!  It's   3.14\r\n\tnaïve café — 日本語のテキスト 🙂🙂 end\n\n"
          "  spaces   before\u3000ideographic\u00a0nbsp x'll 12345 \n \n"
          "ok...\"quoted\" (paren) 🚀x 🚀  \t\n") * 3


class PieceTokenizer:
    """Stand-in for a context-sensitive tokenizer: GPT-2's pre-tokenizer pieces, each
    spelled as its UTF-8 bytes then a separator id 256. Any change to how the text is
    split into pieces changes the ids."""

    vocab_size = 257
    _pat = regex.compile(GPT2_PATTERN)

    def encode(self, text):
        ids = []
        for piece in self._pat.findall(text):
            ids.extend(piece.encode("utf-8"))
            ids.append(256)
        return ids

    def to_config(self):
        return {"type": "pieces"}


class WideTokenizer:
    """A vocabulary above 65536: each character maps to 65000 + (code point mod 5000)."""

    vocab_size = 70_000

    def encode(self, text):
        return [65_000 + ord(c) % 5000 for c in text]

    def to_config(self):
        return {"type": "wide"}


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def all_ids(folder):
    return np.concatenate([load_split(folder, "train"), load_split(folder, "val")])


# ------------------------------------------------------------------------- round trips

def test_byte_tokenizer_round_trip(tmp_path):
    src = write(tmp_path, "a.txt", TRICKY)
    meta = prepare([src], ByteTokenizer(), tmp_path / "out", progress=False)
    ids = all_ids(tmp_path / "out")
    assert ids.dtype == np.uint16 and meta["dtype"] == "uint16"
    assert bytes(ids.astype(np.uint8)) == TRICKY.encode("utf-8")
    on_disk = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert on_disk == meta
    assert meta["tokenizer"] == {"type": "bytes"} and meta["vocab_size"] == 256
    assert meta["sources"][0]["bytes"] == len(TRICKY.encode("utf-8"))


def test_files_are_raw_little_endian(tmp_path):
    src = write(tmp_path, "a.txt", "abc" * 10)
    prepare([src], ByteTokenizer(), tmp_path / "out", val_fraction=0.0, progress=False)
    raw = (tmp_path / "out" / "train.bin").read_bytes()
    assert raw == b"".join(b.to_bytes(2, "little") for b in b"abc" * 10)


def test_val_is_the_last_fraction_of_tokens(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    src = write(tmp_path, "a.txt", text)
    meta = prepare([src], ByteTokenizer(), tmp_path / "out", val_fraction=0.25, progress=False)
    assert meta["splits"]["train"]["tokens"] == 750 and meta["splits"]["val"]["tokens"] == 250
    val = load_split(tmp_path / "out", "val")
    assert bytes(val.astype(np.uint8)) == text[750:].encode()


def test_several_inputs_are_concatenated_in_order(tmp_path):
    a, b = write(tmp_path, "a.txt", "first file\n"), write(tmp_path, "b.txt", "second")
    meta = prepare([a, b], ByteTokenizer(), tmp_path / "out", val_fraction=0.0, progress=False)
    assert bytes(all_ids(tmp_path / "out").astype(np.uint8)) == b"first file\nsecond"
    assert [s["bytes"] for s in meta["sources"]] == [11, 6]


def test_vocab_above_65536_uses_uint32(tmp_path):
    src = write(tmp_path, "a.txt", TRICKY)
    meta = prepare([src], WideTokenizer(), tmp_path / "out", progress=False)
    ids = all_ids(tmp_path / "out")
    assert meta["dtype"] == "uint32" and ids.dtype == np.uint32
    assert ids.tolist() == WideTokenizer().encode(TRICKY) and ids.max() > 65535


# ------------------------------------------------------------------ streaming in chunks

@pytest.mark.parametrize("chunk_bytes", [1, 2, 3, 4, 5, 7, 11, 64, 1000])
@pytest.mark.parametrize("tokenizer", [ByteTokenizer(), PieceTokenizer()],
                         ids=["bytes", "gpt2-pieces"])
def test_streaming_equals_encoding_whole_text(tmp_path, tokenizer, chunk_bytes):
    src = write(tmp_path, "a.txt", TRICKY)
    prepare([src], tokenizer, tmp_path / "out", val_fraction=0.0, progress=False,
            chunk_bytes=chunk_bytes)
    assert all_ids(tmp_path / "out").tolist() == tokenizer.encode(TRICKY)


def test_streaming_with_real_gpt2_bpe(tmp_path, gpt2_tokenizer_dir, shakespeare_path):
    tok = GPT2Tokenizer.from_folder(gpt2_tokenizer_dir)
    text = TRICKY + shakespeare_path.read_text(encoding="utf-8")[:200_000]
    src = write(tmp_path, "a.txt", text)
    for chunk_bytes in (13, 4096):
        prepare([src], tok, tmp_path / "out", val_fraction=0.0, progress=False,
                chunk_bytes=chunk_bytes)
        assert all_ids(tmp_path / "out").tolist() == tok.encode(text), chunk_bytes


def test_tokenizer_sees_bounded_chunks(tmp_path):
    seen = []

    class Recording(ByteTokenizer):
        def encode(self, text, **kw):
            seen.append(len(text))
            return super().encode(text)

    src = write(tmp_path, "a.txt", "word " * 20_000)
    prepare([src], Recording(), tmp_path / "out", progress=False, chunk_bytes=1000)
    assert len(seen) > 50 and max(seen) <= 2000


def test_progress_false_prints_nothing(tmp_path, capsys):
    src = write(tmp_path, "a.txt", "hello world")
    prepare([src], ByteTokenizer(), tmp_path / "out", progress=False)
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- batches

@pytest.fixture
def prepared(tmp_path):
    text = "".join(chr(ord("a") + (i * 7) % 26) for i in range(5000))
    src = write(tmp_path, "a.txt", text)
    prepare([src], ByteTokenizer(), tmp_path / "out", progress=False)
    return tmp_path / "out"


def test_batches_are_shifted_windows_of_the_data(prepared):
    data = load_split(prepared, "train")
    x, y = get_batch(data, 8, 32, np.random.default_rng(0))
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == np.int64
    assert np.array_equal(y[:, :-1], x[:, 1:])
    ix = np.random.default_rng(0).integers(0, len(data) - 32, size=8)
    for b, i in enumerate(ix):
        assert np.array_equal(x[b], data[i:i + 32]) and np.array_equal(y[b], data[i + 1:i + 33])


def test_same_seed_same_batches(prepared):
    ds = TokenDataset(prepared)
    a = ds.get_batch("train", 4, 16, np.random.default_rng(42))
    b = ds.get_batch("train", 4, 16, np.random.default_rng(42))
    c = ds.get_batch("train", 4, 16, np.random.default_rng(43))
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_batch_from_split_of_exactly_block_plus_one(prepared):
    data = np.arange(17, dtype=np.uint16)
    x, y = get_batch(data, 3, 16, np.random.default_rng(0))
    assert np.array_equal(x, np.tile(np.arange(16), (3, 1)))
    assert np.array_equal(y, np.tile(np.arange(1, 17), (3, 1)))


def test_get_batch_rejects_a_split_too_short():
    with pytest.raises(InputError, match=r"16 tokens.*block_size 16.*17"):
        get_batch(np.arange(16, dtype=np.uint16), 2, 16, np.random.default_rng(0))


@pytest.mark.parametrize("kwargs, word", [
    (dict(batch_size=0), "batch_size"), (dict(block_size=-1), "block_size"),
    (dict(rng=7), "Generator"),
])
def test_get_batch_rejects_bad_arguments(kwargs, word):
    args = dict(data=np.arange(100), batch_size=2, block_size=8, rng=np.random.default_rng(0))
    with pytest.raises(InputError, match=word):
        get_batch(**{**args, **kwargs})


def test_dataset_reports_splits_and_vocab(prepared):
    ds = TokenDataset(prepared)
    assert ds.vocab_size == 256 and len(ds.train) == 4500 and len(ds.val) == 500
    assert ds.tokenizer_config == {"type": "bytes"}


def test_empty_val_split_loads_as_empty(tmp_path):
    src = write(tmp_path, "a.txt", "some text here")
    prepare([src], ByteTokenizer(), tmp_path / "out", val_fraction=0.0, progress=False)
    assert len(load_split(tmp_path / "out", "val")) == 0


# ------------------------------------------------------------------------- bad input

def test_no_inputs(tmp_path):
    with pytest.raises(InputError, match="no input files"):
        prepare([], ByteTokenizer(), tmp_path / "out")


def test_missing_file_is_named(tmp_path):
    ok = write(tmp_path, "ok.txt", "text")
    with pytest.raises(InputError, match="nope.txt"):
        prepare([ok, tmp_path / "nope.txt"], ByteTokenizer(), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before touching the disk


def test_folder_as_input_is_named(tmp_path):
    (tmp_path / "adir").mkdir()
    with pytest.raises(InputError, match="adir.*not a regular file"):
        prepare([tmp_path / "adir"], ByteTokenizer(), tmp_path / "out")


def test_unreadable_file_is_named(tmp_path, monkeypatch):
    import numgpt.io.data as data_module

    src = write(tmp_path, "secret.txt", "text")

    def deny(path, *args, **kwargs):  # chmod 0 does not stop root, so fake the refusal
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(data_module, "open", deny, raising=False)
    with pytest.raises(InputError, match="secret.txt.*cannot be read.*Permission denied"):
        prepare([src], ByteTokenizer(), tmp_path / "out")


def test_non_utf8_file_is_named_with_offset(tmp_path):
    src = tmp_path / "latin1.txt"
    src.write_bytes(b"caf\xe9 au lait")
    with pytest.raises(InputError, match=r"latin1.txt.*UTF-8 at byte 3"):
        prepare([src], ByteTokenizer(), tmp_path / "out", progress=False, chunk_bytes=2)


def test_empty_input(tmp_path):
    src = write(tmp_path, "empty.txt", "")
    with pytest.raises(InputError, match="empty.txt.*no text"):
        prepare([src], ByteTokenizer(), tmp_path / "out", progress=False)


@pytest.mark.parametrize("val_fraction", [-0.1, 1.0, 1.5, "0.1"])
def test_val_fraction_out_of_range(tmp_path, val_fraction):
    src = write(tmp_path, "a.txt", "text")
    with pytest.raises(InputError, match=f"val_fraction.*{val_fraction!r}"):
        prepare([src], ByteTokenizer(), tmp_path / "out", val_fraction=val_fraction)


@pytest.mark.parametrize("text, split", [("x" * 60, "train"), ("x" * 200, "val")])
def test_split_too_small_for_one_block(tmp_path, text, split):
    src = write(tmp_path, "a.txt", text)
    with pytest.raises(InputError, match=f"{split} split has .* block_size 64 needs at least 65"):
        prepare([src], ByteTokenizer(), tmp_path / "out", block_size=64, progress=False)


def test_failed_prepare_leaves_previous_output_intact(tmp_path):
    out = tmp_path / "out"
    prepare([write(tmp_path, "a.txt", "good data " * 100)], ByteTokenizer(), out,
            progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(InputError):
        prepare([write(tmp_path, "b.txt", "tiny")], ByteTokenizer(), out, block_size=64,
                progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp files left


def test_load_split_of_a_folder_that_is_not_prepared(tmp_path):
    with pytest.raises(InputError, match="not a prepared data folder.*meta.json"):
        load_split(tmp_path, "train")


def test_load_split_detects_a_truncated_file(prepared):
    path = prepared / "train.bin"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(InputError, match="train.bin.*100 bytes.*re-run prepare"):
        load_split(prepared, "train")


def test_load_split_unknown_split(prepared):
    with pytest.raises(InputError, match="'test'"):
        load_split(prepared, "test")


@pytest.mark.parametrize("edit, key, want", [
    (lambda m: m.pop("vocab_size"), "vocab_size", "missing"),
    (lambda m: m.update(vocab_size="256"), "vocab_size", "'256' (str)"),
    (lambda m: m.update(vocab_size=10**6), "vocab_size", "at most 65536 for dtype uint16"),
    (lambda m: m.pop("tokenizer"), "tokenizer", "missing"),
    (lambda m: m.update(tokenizer="bytes"), "tokenizer", "'bytes' (str)"),
    (lambda m: m["splits"]["train"].update(tokens=-1), "splits.train.tokens", "-1 (int)"),
    (lambda m: m["splits"]["val"].update(tokens=2.5), "splits.val.tokens", "2.5 (float)"),
    (lambda m: m["splits"]["train"].pop("file"), "splits.train.file", "missing"),
    (lambda m: m["splits"]["val"].update(file="../../etc/passwd"), "splits.val.file", "'../../etc/passwd'"),
])
def test_meta_json_with_a_wrong_type_or_missing_key_is_refused_by_key(prepared, edit, key, want):
    """A hand-edited meta.json fails on load with the key, what it holds and the fix, not as a
    KeyError or TypeError deep inside training."""
    path = prepared / "meta.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    with pytest.raises(InputError) as e:
        TokenDataset(prepared)
    assert f"key {key!r}" in str(e.value) and want in str(e.value) and "meta.json" in str(e.value)
    assert "run `numgpt prepare`" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------- tiny corpora: advice in numbers (issue 21)

RANGE = r"val_fraction \(--val-fraction\) between ([0-9.]+) and ([0-9.]+)"


def test_tiny_split_advice_names_a_val_fraction_range_that_works(tmp_path):
    """Issue 21 group 12: the advice was 'raise val_fraction' (which shrinks the train split)
    with no number. The range it names now is checked against prepare itself, and so is the
    largest block_size it names."""
    import re

    src = write(tmp_path, "a.txt", "x" * 200)  # 200 tokens: val 20 at the default 0.1
    with pytest.raises(InputError, match="val split has 20 tokens") as err:
        prepare([src], ByteTokenizer(), tmp_path / "out", block_size=64, progress=False)
    message = str(err.value)
    lo, hi = (float(x) for x in re.search(RANGE, message).groups())
    for fraction in (lo, hi):  # both ends work...
        prepare([src], ByteTokenizer(), tmp_path / "ok", val_fraction=fraction, block_size=64,
                progress=False)
    for fraction in (round(lo - 0.001, 3), round(hi + 0.001, 3)):  # ...and the next values do not
        with pytest.raises(InputError, match="split has"):
            prepare([src], ByteTokenizer(), tmp_path / "no", val_fraction=fraction, block_size=64,
                    progress=False)
    largest = int(re.search(r"lower block_size to (\d+) or less", message).group(1))
    prepare([src], ByteTokenizer(), tmp_path / "ok", block_size=largest, progress=False)
    with pytest.raises(InputError, match="split has"):
        prepare([src], ByteTokenizer(), tmp_path / "no", block_size=largest + 1, progress=False)


def test_input_too_small_for_two_windows_says_so_and_names_no_fraction(tmp_path):
    src = write(tmp_path, "a.txt", "x" * 100)  # 2 x 65 = 130 tokens are needed for block 64
    with pytest.raises(InputError) as err:
        prepare([src], ByteTokenizer(), tmp_path / "out", block_size=64, progress=False)
    message = str(err.value)
    assert "val_fraction (--val-fraction) between" not in message
    assert "the two splits need 130 tokens" in message and "\n" not in message


def test_training_on_a_tiny_split_gives_the_same_advice(tmp_path):
    """`numgpt train` said 're-run prepare with more text or a larger --val-fraction' for a
    train split too small as well, where a larger one makes it smaller still."""
    import re

    from numgpt.train.loop import train

    src = write(tmp_path, "a.txt", "x" * 200)
    prepare([src], ByteTokenizer(), tmp_path / "data", val_fraction=0.9, progress=False)
    with pytest.raises(InputError, match="train split of .* has 20 tokens") as err:
        train({"data": str(tmp_path / "data"), "out": str(tmp_path / "run"), "block_size": 64,
               "n_layer": 1, "n_head": 2, "n_embd": 16, "plot": False, "sample_tokens": 0},
              progress=False)
    message = str(err.value)
    assert "larger --val-fraction" not in message
    lo, hi = (float(x) for x in re.search(RANGE, message).groups())
    assert lo < hi < 0.9  # the fix for a train split too small is a SMALLER fraction
    prepare([src], ByteTokenizer(), tmp_path / "ok", val_fraction=hi, block_size=64, progress=False)


def test_prepare_with_the_shipped_gpt2_tokenizer_needs_no_folder(tmp_path, monkeypatch, capsys):
    """`numgpt prepare --tokenizer gpt2` stopped with 'tokenizer folder gpt2 does not exist'
    unless a model folder of that name sat in the current folder (issue 21 group 11)."""
    from numgpt.cli import main
    from numgpt.io.tokenizer import load_tokenizer

    monkeypatch.chdir(tmp_path)  # nothing called gpt2 here
    text = "Hello. I'm a little late to the party, but here I am.\n" * 40
    write(tmp_path, "in.txt", text)
    assert main(["prepare", "--input", "in.txt", "--tokenizer", "gpt2", "--out", "data",
                 "--val-fraction", "0"]) == 0
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["tokenizer"] == {"type": "gpt2-bpe", "name": "gpt2"} and meta["vocab_size"] == 50257
    assert all_ids(tmp_path / "data").tolist() == load_tokenizer("gpt2").encode(text)
    assert load_tokenizer("gpt2").encode("Hello.") == [15496, 13]
