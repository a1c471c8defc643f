"""Tokenizers: text <-> token ids.

Two tokenizers share one small interface (``encode``, ``decode``, ``decode_bytes``,
``token_bytes``, ``vocab_size``, ``eot_id``, ``to_config``):

- ``ByteTokenizer``: one token per UTF-8 byte (vocab 256). Needs no files; the default
  for training small models on your own text.
- ``GPT2Tokenizer``: GPT-2's byte-level BPE (vocab 50257), built from LOCAL files only
  (``vocab.json`` + ``merges.txt``, or OpenAI's ``encoder.json`` + ``vocab.bpe``) on top
  of ``tiktoken``. Nothing is ever downloaded: we hand tiktoken the rank table ourselves.
  GPT-2's own files ship inside the package (``numgpt/io/gpt2/``, with OpenAI's licence),
  so the spec ``"gpt2"`` needs no folder.

Why tiktoken's ranks can come straight from the vocab ids: GPT-2's vocabulary lists the 256
single bytes first (ids 0..255) and then one token per merge, in merge order (id 256 + k
for merge line k), then ``<|endoftext|>`` (50256). tiktoken merges, at each step, the
adjacent pair whose concatenation has the lowest rank; with rank == id that is exactly
the merge order. ``GPT2Tokenizer`` checks that the files obey this before trusting them.

A model records its tokenizer with ``to_config()``: by name when it is one numgpt ships
(``{"type": "bytes"}``, or ``{"type": "gpt2-bpe", "name": "gpt2"}`` for any files whose
vocabulary and merges equal GPT-2's, wherever they lie), else by the folder of its files.
``tokenizer_from_config`` and ``load_tokenizer`` rebuild it; ``save_files`` copies the BPE
files into a folder (an exported model, a checkpoint's own copy) so it is self-contained.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol

import numpy as np

from ..core.checks import check_token_ids
from ..errors import CheckpointError, ConfigError, InputError
from .files import atomic_write, make_folder

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "GPT2Tokenizer",
    "GPT2_PATTERN",
    "ENDOFTEXT",
    "PACKAGED_GPT2",
    "BPE_FILE_NAMES",
    "bytes_to_unicode",
    "load_tokenizer",
    "tokenizer_from_config",
    "save_files",
    "describe_token",
]

ENDOFTEXT = "<|endoftext|>"

# GPT-2's pre-tokenizer (openai/gpt-2 encoder.py): contractions, letter runs, digit runs,
# other-symbol runs (each optionally led by one space), then whitespace. BPE never merges
# across these pieces.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# GPT-2's vocab.json + merges.txt as shipped in the package (package data; see its LICENSE).
PACKAGED_GPT2 = Path(__file__).with_name("gpt2")

# (vocab file, merges file) pairs we accept, in order of preference.
BPE_FILE_NAMES = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))

_MERGES_HEADER = "#version"


class Tokenizer(Protocol):
    """What every numgpt tokenizer offers (structural type for annotations)."""

    vocab_size: int
    eot_id: int | None

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def decode_bytes(self, ids: Iterable[int]) -> bytes: ...
    def token_bytes(self, token_id: int) -> bytes: ...
    def to_config(self) -> dict: ...


# ---------------------------------------------------------------------------- helpers


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (openai/gpt-2 encoder.py).

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space,
    0x7F-0xA0, 0xAD) map to U+0100 onwards, so every token string is visible text.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _valid_ids(ids: Iterable[int], vocab_size: int) -> np.ndarray:
    """Ids as a 1-D int64 array, or InputError naming the first id outside [0, vocab)."""
    arr = np.asarray(ids if not isinstance(ids, (bytes, bytearray)) else list(ids))
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"token ids must be a flat sequence of integers, got array of "
                         f"shape {arr.shape} and dtype {arr.dtype}")
    return check_token_ids(arr, vocab_size, hint="was it produced with a different tokenizer?")


def _utf8(text: str) -> bytes:
    """UTF-8 bytes of ``text``; lone surrogates (not encodable) become U+FFFD, as in tiktoken."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        fixed = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return fixed.encode("utf-8")


# ---------------------------------------------------------------------- ByteTokenizer


class ByteTokenizer:
    """One token per UTF-8 byte: ``vocab_size`` 256, no end-of-text token."""

    vocab_size = 256
    eot_id = None

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """UTF-8 bytes of ``text`` as ids. ``allow_special`` is accepted and ignored (none exist)."""
        return list(_utf8(text))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Raw bytes as ids (any bytes, valid UTF-8 or not)."""
        return list(data)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids back to the exact bytes; ``decode_bytes(encode_bytes(b)) == b`` for every ``b``."""
        return _valid_ids(ids, 256).astype(np.uint8).tobytes()

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text. Never raises on bad UTF-8: invalid byte sequences (e.g. a character
        cut in half) are shown as U+FFFD (``errors="replace"``). Use ``decode_bytes`` for an
        exact round trip. Ids outside [0, 256) raise InputError."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The single byte that ``token_id`` stands for."""
        return self.decode_bytes([token_id])

    def to_config(self) -> dict:
        """Serialisable description, inverse of ``tokenizer_from_config``."""
        return {"type": "bytes"}

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


# ---------------------------------------------------------------------- GPT2Tokenizer


def _find_bpe_files(folder: Path) -> tuple[Path, Path]:
    """The (vocab, merges) files in ``folder``, trying each naming in ``BPE_FILE_NAMES``."""
    if not folder.is_dir():
        raise InputError(f"tokenizer folder {str(folder)!r} does not exist or is not a "
                         f"folder; expected a folder holding vocab.json + merges.txt "
                         f"(or encoder.json + vocab.bpe), or the spec 'bytes' or 'gpt2'")
    for vocab_name, merges_name in BPE_FILE_NAMES:
        if (folder / vocab_name).is_file() and (folder / merges_name).is_file():
            return folder / vocab_name, folder / merges_name
    expected = " or ".join(f"{v} + {m}" for v, m in BPE_FILE_NAMES)
    found = sorted(p.name for p in folder.iterdir())[:10]
    raise InputError(f"no GPT-2 tokenizer files in {str(folder)!r}: expected {expected}; "
                     f"found {found or 'nothing'}")


def _read_vocab(text: str, where: str) -> dict[str, int]:
    """Parse a vocab.json / encoder.json text into {token string: id}."""
    try:
        vocab = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: not valid JSON ({e}); expected GPT-2's "
                              f"vocab.json / encoder.json") from None
    if not isinstance(vocab, dict) or not all(
            isinstance(k, str) and type(v) is int for k, v in vocab.items()):
        raise CheckpointError(f"{where}: expected a JSON object mapping token strings "
                              f"to integer ids")
    return vocab


def _parse_merges(text: str, where: str) -> list[tuple[str, str, int]]:
    """Parse merges text into (left, right, line number) triples.

    Skips a leading ``#version`` header line and blank lines (e.g. the trailing newline).
    """
    merges = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line or (lineno == 1 and line.startswith(_MERGES_HEADER)):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise CheckpointError(f"{where}: line {lineno} is {line!r}; every merge line "
                                  f"must be two tokens separated by one space")
        merges.append((parts[0], parts[1], lineno))
    return merges


def _check_ids(vocab: Mapping[str, int], where: str) -> None:
    """Ids must be exactly 0..len(vocab)-1, each used once."""
    if not vocab:
        raise CheckpointError(f"{where}: the vocabulary is empty")
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        dupes = len(ids) - len(set(ids))
        raise CheckpointError(f"{where}: token ids must be 0..{len(ids) - 1} with no gaps "
                              f"or repeats (found {dupes} repeated, max id {ids[-1]})")


def _check_merges(vocab: Mapping[str, int], merges: list[tuple[str, str, int]],
                  where: str) -> None:
    """Merge line k must produce the token with id 256 + k (so rank order == merge order)."""
    for k, (left, right, lineno) in enumerate(merges):
        expected = 256 + k
        for part in (left, right):
            if part not in vocab:
                raise CheckpointError(f"{where}: line {lineno} merges {left!r} + {right!r} "
                                      f"but {part!r} is not in the vocabulary; the vocab and "
                                      f"merges files do not belong together")
        got = vocab.get(left + right)
        if got != expected:
            raise CheckpointError(
                f"{where}: line {lineno} (merge #{k}) makes {left + right!r}, whose vocab id "
                f"is {got}, but GPT-2 BPE needs id {expected} (256 + merge index) so that "
                f"ranks follow merge order; the vocab and merges files do not belong "
                f"together (re-export both from the same tokenizer)")


def _rank_tables(vocab: Mapping[str, int], n_merges: int,
                 where: str) -> tuple[dict[bytes, int], dict[str, int]]:
    """Split the vocab into tiktoken's mergeable ranks (bytes -> rank) and special tokens.

    Ids 0..255 + n_merges are BPE tokens (spelled in the byte-to-unicode alphabet);
    ids above are special tokens such as ``<|endoftext|>``.
    """
    byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
    n_bpe = 256 + n_merges
    ranks: dict[bytes, int] = {}
    specials: dict[str, int] = {}
    for token, token_id in vocab.items():
        if token_id >= n_bpe:
            specials[token] = token_id
            continue
        try:
            ranks[bytes(byte_of[ch] for ch in token)] = token_id
        except KeyError:
            raise CheckpointError(f"{where}: token {token!r} (id {token_id}) has a character "
                                  f"outside GPT-2's byte-to-unicode alphabet") from None
    singles = sum(1 for b in ranks if len(b) == 1)
    if singles != 256 or any(len(b) == 1 and r >= 256 for b, r in ranks.items()):
        raise CheckpointError(f"{where}: ids 0..255 must be the 256 single bytes "
                              f"(found {singles} single-byte tokens)")
    return ranks, specials


def _identity(vocab: Mapping[str, int], n_merges: int) -> str:
    """A digest of what decides every id: the tokens in id order and how many are merges
    (the merge lines are checked to follow id order, so they add nothing). Two files that
    spell the same tokenizer differently (JSON spacing, a #version header, OpenAI's or
    Hugging Face's names) get the same digest."""
    tokens = [""] * len(vocab)
    for token, token_id in vocab.items():
        tokens[token_id] = token
    text = json.dumps([tokens, n_merges], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=1)
def _packaged_identity() -> str | None:
    """The digest of the packaged GPT-2 files; None if they are missing (a broken install)."""
    try:
        vocab_path, merges_path = _find_bpe_files(PACKAGED_GPT2)
        vocab = _read_vocab(vocab_path.read_text(encoding="utf-8"), str(vocab_path))
        merges = _parse_merges(merges_path.read_text(encoding="utf-8"), str(merges_path))
    except (OSError, InputError, CheckpointError):
        return None
    return _identity(vocab, len(merges))


def _read_utf8(path: Path) -> str:
    """A tokenizer file's text; a file that is not UTF-8 (a stranger's folder) is one line."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); a GPT-2 "
                         f"vocab.json/merges.txt is UTF-8") from None


class GPT2Tokenizer:
    """GPT-2 byte-level BPE from local files, encoded by tiktoken.

    Build with ``GPT2Tokenizer.from_folder(path)`` (or ``load_tokenizer(path)``); the
    constructor takes the raw file texts so the exact files can be written back out.

    ``<|endoftext|>`` means one thing everywhere in numgpt, the Hugging Face tokenizer's rule:
    it is the special token ``eot_id`` (50256), in training data, evaluation text, prompts
    and server requests alike. ``encode(text, allow_special=False)`` spells it out as seven
    ordinary tokens instead (tiktoken's ``encode_ordinary``), for text that merely quotes it.

    ``builtin`` is ``"gpt2"`` when the files hold GPT-2's own vocabulary and merges (the
    files numgpt ships, wherever these were read from), else None.
    """

    def __init__(self, vocab_text: str, merges_text: str, *,
                 source: str | os.PathLike | None = None, name: str = "gpt2-local") -> None:
        where = str(source) if source is not None else "GPT-2 tokenizer files"
        vocab = _read_vocab(vocab_text, where)
        merges = _parse_merges(merges_text, where)
        _check_ids(vocab, where)
        _check_merges(vocab, merges, where)
        ranks, specials = _rank_tables(vocab, len(merges), where)
        self._vocab_text = vocab_text
        self._merges_text = merges_text
        self.path = Path(source).resolve() if source is not None else None
        self.vocab_size = len(vocab)
        self.eot_id = specials.get(ENDOFTEXT)
        self.builtin = "gpt2" if _identity(vocab, len(merges)) == _packaged_identity() else None
        self._encoding = _make_encoding(name, ranks, specials)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "GPT2Tokenizer":
        """Read ``vocab.json`` + ``merges.txt`` (or ``encoder.json`` + ``vocab.bpe``)."""
        folder = Path(folder)
        vocab_path, merges_path = _find_bpe_files(folder)
        return cls(_read_utf8(vocab_path), _read_utf8(merges_path), source=folder)

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        """Token ids of ``text``; ``<|endoftext|>`` is 50256 unless ``allow_special=False``."""
        if allow_special:
            return self._encoding.encode(text, allowed_special="all")
        return self._encoding.encode_ordinary(text)

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of raw bytes; text must be valid UTF-8 (InputError otherwise)."""
        try:
            return self.encode(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise InputError(f"GPT-2 BPE encodes text; these bytes are not UTF-8 ({e})") from None

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes the ids stand for (special tokens spelled out)."""
        return self._encoding.decode_bytes(_valid_ids(ids, self.vocab_size).tolist())

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text. Never raises on bad UTF-8 (e.g. a cut-off multi-byte character):
        invalid bytes are shown as U+FFFD (``errors="replace"``). Out-of-vocab ids raise
        InputError."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token, e.g. ``b' the'``; may be a partial UTF-8 character."""
        return self.decode_bytes([token_id])

    def to_config(self) -> dict:
        """Serialisable description, inverse of ``tokenizer_from_config``: GPT-2's own BPE by
        name (``{"type": "gpt2-bpe", "name": "gpt2"}``, so a checkpoint does not depend on
        where the files were), any other by the folder it was read from."""
        if self.builtin is not None:
            return {"type": "gpt2-bpe", "name": self.builtin}
        if self.path is None:
            raise ConfigError("this GPT2Tokenizer was built from in-memory text, not a "
                              "folder; call save_files(tokenizer, folder) and load that")
        return {"type": "gpt2-bpe", "path": str(self.path)}

    def save_files(self, folder: str | os.PathLike) -> None:
        """Write ``vocab.json`` + ``merges.txt`` into ``folder``, byte-identical to the source
        (a file that already holds exactly that is left as it is)."""
        folder = make_folder(Path(folder), "the tokenizer files")
        for name, text in (("vocab.json", self._vocab_text), ("merges.txt", self._merges_text)):
            data = text.encode("utf-8")
            path = folder / name
            if not (path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data):
                atomic_write(path, data)

    def __repr__(self) -> str:
        return f"GPT2Tokenizer(vocab_size={self.vocab_size}, path={str(self.path)!r})"


def _make_encoding(name: str, ranks: dict[bytes, int], specials: dict[str, int]):
    """A tiktoken Encoding from an explicit rank table: nothing is looked up or fetched."""
    import tiktoken  # local import: the byte tokenizer works without tiktoken installed

    return tiktoken.Encoding(name=name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens=specials)


# ------------------------------------------------------------------ config and files


@functools.lru_cache(maxsize=1)
def _packaged_gpt2() -> GPT2Tokenizer:
    """GPT-2's BPE from the files in the package, built once per process (it is immutable)."""
    if not all((PACKAGED_GPT2 / name).is_file() for name in BPE_FILE_NAMES[0]):
        raise InputError(f"the GPT-2 BPE files that ship with numgpt are missing from "
                         f"{str(PACKAGED_GPT2)!r} (a broken install); reinstall numgpt, or "
                         f"pass a folder holding vocab.json + merges.txt")
    return GPT2Tokenizer.from_folder(PACKAGED_GPT2)


def load_tokenizer(spec: str | os.PathLike) -> ByteTokenizer | GPT2Tokenizer:
    """``"bytes"`` -> ByteTokenizer; ``"gpt2"`` -> GPT-2's BPE from the files in the package;
    anything else is a folder with GPT-2 BPE files (write ``./gpt2`` for a folder of that
    name)."""
    if isinstance(spec, str) and spec == "bytes":
        return ByteTokenizer()
    if isinstance(spec, str) and spec == "gpt2":
        return _packaged_gpt2()
    return GPT2Tokenizer.from_folder(spec)


def tokenizer_from_config(cfg: Mapping[str, Any],
                          base_dir: str | os.PathLike | None = None) -> ByteTokenizer | GPT2Tokenizer:
    """Rebuild a tokenizer from ``to_config()`` output.

    ``{"type": "gpt2-bpe", "name": "gpt2"}`` is GPT-2's BPE from the package. A relative
    ``path`` is resolved against ``base_dir`` (e.g. the model folder holding the config), so
    an exported folder can say ``{"type": "gpt2-bpe", "path": "."}``.
    """
    if not isinstance(cfg, Mapping) or "type" not in cfg:
        raise ConfigError(f"tokenizer config must be a mapping with a 'type' key, got {cfg!r}")
    kind = cfg["type"]
    allowed = {"bytes": {"type"}, "gpt2-bpe": {"type", "path", "name"}}
    if not isinstance(kind, str) or kind not in allowed:
        raise ConfigError(f"unknown tokenizer type {kind!r}; expected one of {sorted(allowed)}")
    extra = set(cfg) - allowed[kind]
    if extra:
        raise ConfigError(f"unknown keys {sorted(extra)} in {kind!r} tokenizer config")
    if kind == "bytes":
        return ByteTokenizer()
    if "name" in cfg:
        if cfg["name"] != "gpt2" or "path" in cfg:
            raise ConfigError(f"'gpt2-bpe' tokenizer config {cfg!r}: 'name' must be 'gpt2' (the "
                              f"BPE shipped with numgpt) and comes without 'path'")
        return load_tokenizer("gpt2")
    if not isinstance(cfg.get("path"), str):
        raise ConfigError(f"'gpt2-bpe' tokenizer config needs a string 'path' (a folder of BPE "
                          f"files) or 'name': 'gpt2', got {cfg!r}")
    path = Path(cfg["path"])
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return GPT2Tokenizer.from_folder(path)


def save_files(tokenizer: Tokenizer, folder: str | os.PathLike) -> bool:
    """Write the tokenizer's files into ``folder``; True if written, False if it has none."""
    if isinstance(tokenizer, GPT2Tokenizer):
        tokenizer.save_files(folder)
        return True
    return False


def describe_token(tokenizer: Tokenizer, token_id: int) -> str:
    """A readable form of one token: ``' the'``, ``'\\n'``, or ``b'\\xe2'`` if not whole UTF-8."""
    raw = tokenizer.token_bytes(token_id)
    try:
        return repr(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(raw)
