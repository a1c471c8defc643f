"""Text files -> token-id files on disk, and random (x, y) batches from them.

``prepare`` streams any number of UTF-8 text files through a tokenizer with bounded
memory and writes, into one folder:

- ``train.bin``, ``val.bin``: raw little-endian token ids (``uint16`` when the vocabulary
  has at most 65536 ids, else ``uint32``), the same layout as nanoGPT's files;
  ``val.bin`` is the LAST ``val_fraction`` of the token stream;
- ``meta.json``: tokenizer config, vocab size, dtype, tokens per split, source files.

``prepare_chat`` does the same for conversations (a JSONL file, one ``{"messages": [...]}``
per line, OpenAI's fine-tuning format): each is rendered with a chat template
(``numgpt.io.chat``) and, beside each split, ``{split}_mask.bin`` holds one byte per token,
1 where the token belongs to an assistant reply (it carries loss), else 0; ``meta.json``
names the mask files and records the template under ``"chat"``. The first token of every
conversation is 0 too, so no target crosses from one conversation into the next.

``load_split`` memory-maps one split; ``get_batch`` samples ``B`` windows of ``T + 1``
tokens from it: ``x = data[i:i+T]``, ``y = data[i+1:i+T+1]`` (the next-token targets);
with a mask, a target whose mask byte is 0 is ``IGNORE_INDEX`` (-1), which the loss skips.

Shapes: ``B`` batch size, ``T`` block size (context length), ``N`` tokens in a split.
"""

import codecs
import json
import numbers
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..core.checks import is_int
from ..errors import InputError
from .files import atomic_write, make_folder, temp_path, write_errors

__all__ = ["prepare", "prepare_chat", "load_split", "load_mask", "get_batch", "TokenDataset",
           "token_dtype", "read_meta", "split_advice", "val_tokens", "META_FORMAT",
           "META_VERSION", "SPLITS", "IGNORE_INDEX"]

META_FORMAT = "numgpt-tokens"
META_VERSION = 1
SPLITS = ("train", "val")
CHUNK_BYTES = 1 << 20  # 1 MiB of text per read
IGNORE_INDEX = -1  # a target the loss skips (the model's cross_entropy ignore_index)


def token_dtype(vocab_size: int) -> np.dtype:
    """Little-endian ``uint16`` when every id fits (vocab <= 65536), else ``uint32``."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


# ------------------------------------------------------------------------- validation

def _check_inputs(inputs) -> list[Path]:
    """Paths that exist, are files and can be opened; InputError naming the first bad one."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths = [Path(p) for p in inputs]
    if not paths:
        raise InputError("no input files given; pass at least one text file to prepare")
    for path in paths:
        if not path.exists():
            raise InputError(f"input file {str(path)!r} does not exist; check the path")
        if not path.is_file():
            raise InputError(f"input {str(path)!r} is not a regular file; pass text files, "
                             "not folders")
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise InputError(f"input file {str(path)!r} cannot be read ({e.strerror}); "
                             "check its permissions") from None
    return paths


def _check_options(val_fraction, block_size, batch_size, chunk_bytes) -> None:
    """InputError naming the first option outside its allowed range."""
    if not (isinstance(val_fraction, numbers.Real) and 0 <= val_fraction < 1):
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction!r}; "
                         "e.g. 0.1 keeps the last 10% of tokens for validation")
    for name, value in (("block_size", block_size), ("batch_size", batch_size)):
        if value is not None and not (is_int(value) and value >= 1):
            raise InputError(f"{name} must be a positive integer or None, got {value!r}")
    if not (is_int(chunk_bytes) and chunk_bytes >= 1):
        raise InputError(f"chunk_bytes must be a positive integer, got {chunk_bytes!r}")


def val_tokens(total: int, val_fraction: float) -> int:
    """Tokens in the val split of ``total`` tokens: the last ``round(total * val_fraction)``."""
    return round(total * val_fraction)


def split_advice(counts: dict, block_size: int, *, need_val: bool = True) -> str:
    """What fixes splits too small for one window of ``block_size + 1`` tokens, in numbers.

    Raising val_fraction grows val by shrinking train, so the advice is the val_fraction
    range (3 decimals) in which BOTH splits hold a window, when there is one; the largest
    block_size the splits already fit; and, when the input cannot hold two windows, the
    fewest tokens it needs. ``need_val=False``: only train is used (val_fraction 0).
    """
    train, val = counts["train"], counts["val"]
    total, need = train + val, block_size + 1
    if not need_val:  # val_fraction 0: the train split is the whole input
        return (f"the input has {total} tokens: add at least {need - total} tokens of text"
                + (f", or lower block_size to {total - 1} or less" if total >= 2 else ""))
    fits = [k / 1000 for k in range(1, 1000)
            if min(val_tokens(total, k / 1000), total - val_tokens(total, k / 1000)) >= need]
    options = []
    if fits:
        options.append(f"re-run prepare with val_fraction (--val-fraction) between {fits[0]:g} "
                       f"and {fits[-1]:g}, where each split holds at least {need} (a larger "
                       f"one shrinks the train split)")
    if min(train, val) >= 2:
        options.append(f"lower block_size to {min(train, val) - 1} or less (the splits as they are)")
    elif total // 2 >= 2:
        options.append(f"lower block_size to {total // 2 - 1} or less with val_fraction 0.5")
    options.append(f"add text (the two splits need {2 * need} tokens at the very least)"
                   if total < 2 * need else "add text")
    return (f"the input has {total} tokens (train {train}, val {val}): " + "; or ".join(options))


def _check_split_sizes(counts: dict, val_fraction: float, block_size) -> None:
    """Each split in use must hold one window of ``block_size + 1`` tokens."""
    if block_size is None:
        return
    need = block_size + 1
    for split in SPLITS:
        if split == "val" and val_fraction == 0:
            continue
        if counts[split] < need:
            raise InputError(
                f"the {split} split has {counts[split]} tokens, but block_size {block_size} "
                f"needs at least {need} for one batch; "
                f"{split_advice(counts, block_size, need_val=val_fraction > 0)}")


# -------------------------------------------------------------------------- streaming

def _safe_cut(text: str, lo: int = 0) -> int:
    """Largest ``i > 0``, ``i >= lo``, such that encoding ``text[:i]`` and ``text[i:]``
    separately gives the same ids as encoding ``text``; 0 when there is none.

    The cut goes just before a space or newline that is followed by a non-space
    character. GPT-2's pre-tokenizer never lets a piece span such a point except the
    ``" word"`` piece that starts there, and the whitespace run before it ends as its
    own piece both ways (``\\s+(?!\\S)`` at end of text == backtracked run), so BPE ids
    are unchanged. For the byte tokenizer every cut is safe. ``lo`` skips a prefix
    already known to hold no cut (the carried text), so a long run without whitespace
    is scanned once, not once per chunk.
    """
    end = len(text) - 1  # the char after the cut must exist
    while end > 0:
        pos = max(text.rfind(" ", lo, end), text.rfind("\n", lo, end))
        if pos <= 0:
            return 0
        if not text[pos + 1].isspace():
            return pos
        end = pos
    return 0


def _encode_file(path: Path, tokenizer, sink, chunk_bytes: int, bar) -> None:
    """Encode one UTF-8 file chunk by chunk, passing each chunk's ids to ``sink``.

    Bytes are decoded incrementally (a multi-byte character split across reads waits
    for its tail); text after the last safe cut is carried into the next chunk. Memory
    is about ``chunk_bytes`` of text unless a file has a longer stretch with no space or
    newline, which is carried whole until one appears.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    carry, offset = "", 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(chunk_bytes)
            text = carry + _decode(decoder, raw, path, offset, final=not raw)
            offset += len(raw)
            bar.update(len(raw))
            if not raw:
                break
            cut = _safe_cut(text, lo=max(len(carry) - 1, 0))
            if cut:
                sink(tokenizer.encode(text[:cut]))
            carry = text[cut:]
    if text:
        sink(tokenizer.encode(text))


def _decode(decoder, raw: bytes, path: Path, offset: int, final: bool) -> str:
    """Decode the next bytes; InputError naming the file and byte offset if not UTF-8."""
    pending = len(decoder.getstate()[0])
    try:
        return decoder.decode(raw, final=final)
    except UnicodeDecodeError as e:
        where = offset - pending + e.start
        raise InputError(f"input file {str(path)!r} is not valid UTF-8 at byte {where} "
                         f"({e.reason}); convert it to UTF-8 first") from None


class _TokenWriter:
    """Appends id chunks to an open binary file as ``dtype``; counts them."""

    def __init__(self, fh, dtype: np.dtype, vocab_size: int):
        self.fh, self.dtype, self.vocab_size, self.count = fh, dtype, vocab_size, 0

    def __call__(self, ids) -> None:
        arr = np.asarray(ids, dtype=np.int64)  # (n,)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = int(arr.min() if arr.min() < 0 else arr.max())
            raise InputError(f"the tokenizer produced id {bad}, outside its vocab_size "
                             f"{self.vocab_size}; the tokenizer is inconsistent")
        arr.astype(self.dtype).tofile(self.fh)
        self.count += int(arr.size)


def _copy_tail(src: Path, dst: Path, start_byte: int, chunk_bytes: int) -> None:
    """Copy ``src[start_byte:]`` to ``dst`` in chunks (bounded memory)."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        fi.seek(start_byte)
        while block := fi.read(max(chunk_bytes, 1 << 16)):
            fo.write(block)


def _split_file(all_tmp: Path, val_tmp: Path, n_train: int, itemsize: int,
                chunk_bytes: int) -> None:
    """Move the tail of ``all_tmp`` (from token ``n_train``) into ``val_tmp``; truncate."""
    _copy_tail(all_tmp, val_tmp, n_train * itemsize, chunk_bytes)
    with open(all_tmp, "r+b") as f:
        f.truncate(n_train * itemsize)


def _make_out_dir(out_dir) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"output folder {str(out)!r} exists and is not a folder; "
                         "choose another out_dir")
    return make_folder(out, "prepare")


# ---------------------------------------------------------------------------- prepare

def prepare(inputs, tokenizer, out_dir, val_fraction: float = 0.1, *,
            block_size: int | None = None, batch_size: int | None = None,
            progress: bool = True, chunk_bytes: int = CHUNK_BYTES) -> dict:
    """Tokenize text files into ``out_dir/{train.bin, val.bin, meta.json}``.

    Args:
        inputs: text file paths (UTF-8), concatenated in order; each file is encoded on
            its own, so no token spans two files.
        tokenizer: has ``encode(text) -> list[int]``, ``vocab_size``, ``to_config()``.
        out_dir: created if missing; existing outputs are replaced atomically
            (``meta.json`` is written last, so a folder with it is complete).
        val_fraction: in [0, 1); the last ``round(N * val_fraction)`` tokens are ``val``.
        block_size: when given, each split in use must hold ``block_size + 1`` tokens.
        batch_size: recorded in meta.json; validated but it adds no size requirement,
            since ``get_batch`` samples windows with replacement.
        progress: show a tqdm bar over input bytes.
        chunk_bytes: bytes read per chunk (memory bound; small values are for tests).

    Returns:
        The meta dict that was written to ``meta.json``.

    Raises:
        InputError: no inputs, a missing/unreadable/non-UTF-8 file (named), empty input,
            val_fraction outside [0, 1), or a split too small for one window.
    """
    paths = _check_inputs(inputs)
    _check_options(val_fraction, block_size, batch_size, chunk_bytes)
    tok_config = tokenizer.to_config()
    vocab_size, dtype = int(tokenizer.vocab_size), token_dtype(int(tokenizer.vocab_size))
    out = _make_out_dir(out_dir)
    all_tmp = temp_path(out / "train.bin")
    val_tmp = None
    try:
        val_tmp = temp_path(out / "val.bin")
        with write_errors(out / "train.bin", "the folder's previous files are kept"):
            total = _stream_tokens(paths, tokenizer, all_tmp, dtype, vocab_size, chunk_bytes,
                                   progress)
        if total == 0:
            names = ", ".join(repr(str(p)) for p in paths)
            raise InputError(f"the input is empty: {names} hold no text; pass files with "
                                 "text to tokenize")
        n_val = val_tokens(total, val_fraction)
        counts = {"train": total - n_val, "val": n_val}
        _check_split_sizes(counts, val_fraction, block_size)
        with write_errors(out / "val.bin", "the folder's previous files are kept"):
            _split_file(all_tmp, val_tmp, counts["train"], dtype.itemsize, chunk_bytes)
        meta = _meta(tok_config, vocab_size, dtype, counts, val_fraction, paths,
                     block_size, batch_size)
        with write_errors(out, "the folder has no meta.json until prepare is run again"):
            _publish(out, all_tmp, val_tmp, meta)
        return meta
    finally:
        for tmp in (all_tmp, val_tmp):
            if tmp is not None:
                tmp.unlink(missing_ok=True)


def prepare_chat(conversations, tokenizer, out_dir, val_fraction: float = 0.1, *,
                 template: str | None = None, block_size: int | None = None,
                 batch_size: int | None = None) -> dict:
    """Render the conversations of a JSONL file (``numgpt.io.chat.read_conversations``) with
    ``template`` (default ``chat.DEFAULT_TEMPLATE``) into ``out_dir``: ``train.bin``,
    ``val.bin``, their loss masks ``train_mask.bin``, ``val_mask.bin`` and ``meta.json``.

    The last ``round(n * val_fraction)`` conversations are ``val`` (whole conversations, so
    no conversation is split). A token's mask byte is 1 when it is part of an assistant
    reply (its text and the separator after it, what the model must learn to write), 0
    elsewhere and at each conversation's first token. Returns the meta dict written.
    InputError names the line and field of a bad conversation, or a split too small."""
    from . import chat

    path = _check_inputs([conversations])[0]
    _check_options(val_fraction, block_size, batch_size, CHUNK_BYTES)
    template = chat.check_template(template) if template is not None else chat.DEFAULT_TEMPLATE
    vocab_size, dtype = int(tokenizer.vocab_size), token_dtype(int(tokenizer.vocab_size))
    lines = chat.count_conversations(path)
    n_val = val_tokens(lines, val_fraction)  # conversations, not tokens
    out = _make_out_dir(out_dir)
    names = {s: (f"{s}.bin", f"{s}_mask.bin") for s in SPLITS}
    tmps = {(s, k): temp_path(out / names[s][k]) for s in SPLITS for k in (0, 1)}
    counts, assistant, convs = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    try:
        with write_errors(out / "train.bin", "the folder's previous files are kept"), \
                open(tmps["train", 0], "wb") as tt, open(tmps["train", 1], "wb") as tm, \
                open(tmps["val", 0], "wb") as vt, open(tmps["val", 1], "wb") as vm:
            files = {"train": (_TokenWriter(tt, dtype, vocab_size), tm),
                     "val": (_TokenWriter(vt, dtype, vocab_size), vm)}
            for i, (line, messages) in enumerate(chat.read_conversations(path)):
                split = "train" if i < lines - n_val else "val"
                ids, mask = chat.encode_conversation(template, messages, tokenizer,
                                                     where=f"{path} line {line}: messages")
                mask[0] = False  # the first target of a conversation follows another one
                writer, mask_file = files[split]
                writer(ids)
                np.asarray(mask, np.uint8).tofile(mask_file)
                counts[split] += len(ids)
                assistant[split] += int(sum(mask))
                convs[split] += 1
        _check_split_sizes(counts, val_fraction, block_size)
        meta = _meta(tokenizer.to_config(), vocab_size, dtype, counts, val_fraction, [path],
                     block_size, batch_size)
        for s in SPLITS:
            meta["splits"][s].update(mask=names[s][1], conversations=convs[s],
                                     assistant_tokens=assistant[s])
        meta["chat"] = {"template": template}
        with write_errors(out, "the folder has no meta.json until prepare is run again"):
            (out / "meta.json").unlink(missing_ok=True)
            for (s, k), tmp in tmps.items():
                os.replace(tmp, out / names[s][k])
            atomic_write(out / "meta.json", json.dumps(meta, indent=2) + "\n")
        return meta
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)


def _stream_tokens(paths, tokenizer, dest: Path, dtype, vocab_size, chunk_bytes,
                   progress) -> int:
    """Encode every file into ``dest``; returns the number of tokens written."""
    total_bytes = sum(p.stat().st_size for p in paths)
    with open(dest, "wb") as fh, tqdm(total=total_bytes, unit="B", unit_scale=True,
                                      desc="prepare", disable=not progress) as bar:
        writer = _TokenWriter(fh, dtype, vocab_size)
        for path in paths:
            _encode_file(path, tokenizer, writer, chunk_bytes, bar)
    return writer.count


def _meta(tok_config, vocab_size, dtype, counts, val_fraction, paths, block_size,
          batch_size) -> dict:
    return {
        "format": META_FORMAT, "version": META_VERSION,
        "tokenizer": tok_config, "vocab_size": vocab_size,
        "dtype": dtype.name, "byteorder": "little",
        "splits": {s: {"file": f"{s}.bin", "tokens": counts[s]} for s in SPLITS},
        "val_fraction": float(val_fraction),
        "block_size": block_size, "batch_size": batch_size,
        "sources": [{"path": str(p.resolve()), "bytes": p.stat().st_size} for p in paths],
    }


def _publish(out: Path, train_tmp: Path, val_tmp: Path, meta: dict) -> None:
    """Rename temp files into place; meta.json last so it marks a complete folder."""
    (out / "meta.json").unlink(missing_ok=True)
    os.replace(train_tmp, out / "train.bin")
    os.replace(val_tmp, out / "val.bin")
    atomic_write(out / "meta.json", json.dumps(meta, indent=2) + "\n")


# ---------------------------------------------------------------------------- reading

def read_meta(folder) -> dict:
    """meta.json of a ``prepare`` output, every key checked, or InputError saying what the
    folder lacks or which key is wrong."""
    folder = Path(folder)
    path = folder / "meta.json"
    hint = "run `numgpt prepare` (numgpt.io.data.prepare) to create it"
    if not path.is_file():
        raise InputError(f"{str(folder)!r} is not a prepared data folder: no meta.json; {hint}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{str(path)!r} cannot be read as JSON ({e}); {hint}") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise InputError(f"{str(path)!r} is not a numgpt token meta file (format "
                         f"{meta.get('format') if isinstance(meta, dict) else None!r}, "
                         f"expected {META_FORMAT!r}); {hint}")
    splits = meta.get("splits")
    if not (isinstance(splits, dict) and all(isinstance(splits.get(s), dict) for s in SPLITS)):
        raise InputError(f"{str(path)!r} lists no train/val splits; {hint}")
    if meta.get("version") != META_VERSION or meta.get("dtype") not in ("uint16", "uint32"):
        raise InputError(f"{str(path)!r} has version {meta.get('version')!r} and dtype "
                         f"{meta.get('dtype')!r}; this numgpt reads version {META_VERSION} "
                         f"with uint16/uint32; re-run prepare")
    _check_meta_fields(meta, path, hint)
    return meta


def _check_meta_fields(meta: dict, path: Path, hint: str) -> None:
    """Every key the readers use, with its type and range: a hand-edited or foreign meta.json
    is refused here by key, never deep inside training as a KeyError or TypeError."""
    def bad(key: str, value, want: str) -> InputError:
        found = "missing" if value is _MISSING else f"{value!r} ({type(value).__name__})"
        return InputError(f"{str(path)!r}: key {key!r} must be {want}, found {found}; {hint}")

    vocab = meta.get("vocab_size", _MISSING)
    if not (is_int(vocab) and vocab >= 1):
        raise bad("vocab_size", vocab, "a positive integer")
    if vocab > 1 << 32 or (meta["dtype"] == "uint16" and vocab > 1 << 16):
        raise bad("vocab_size", vocab, f"at most {1 << 16 if meta['dtype'] == 'uint16' else 1 << 32} "
                                       f"for dtype {meta['dtype']}")
    tok = meta.get("tokenizer", _MISSING)
    if not (isinstance(tok, dict) and isinstance(tok.get("type"), str)):
        raise bad("tokenizer", tok, "an object with a string 'type'")
    if meta.get("byteorder", "little") != "little":
        raise bad("byteorder", meta.get("byteorder"), "'little'")
    for split in SPLITS:
        entry = meta["splits"][split]
        name, tokens = entry.get("file", _MISSING), entry.get("tokens", _MISSING)
        if not (isinstance(name, str) and name and Path(name).name == name and name not in (".", "..")):
            raise bad(f"splits.{split}.file", name, "a file name inside the folder (no path)")
        if not (is_int(tokens) and tokens >= 0):
            raise bad(f"splits.{split}.tokens", tokens, "an integer >= 0")
        mask = entry.get("mask")
        if mask is not None and not (isinstance(mask, str) and mask and Path(mask).name == mask
                                     and mask not in (".", "..", name)):
            raise bad(f"splits.{split}.mask", mask, "a file name inside the folder (no path)")
    chat = meta.get("chat")
    if chat is not None and not (isinstance(chat, dict) and isinstance(chat.get("template"), str)):
        raise bad("chat", chat, "an object with the string 'template'")


_MISSING = object()


def load_split(folder, split: str) -> np.ndarray:
    """Memory-map one split of a ``prepare`` output: read-only ``(N,)`` array.

    Returns an ``np.memmap`` (an empty ``np.ndarray`` when the split has no tokens,
    since an empty file cannot be mapped). The dtype comes from meta.json.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    n = int(meta["splits"][split]["tokens"])
    path = folder / meta["splits"][split]["file"]
    size = path.stat().st_size if path.is_file() else None
    if size != n * dtype.itemsize:
        raise InputError(f"{str(path)!r} has {size if size is not None else 'no'} bytes but "
                         f"meta.json says {n} {meta['dtype']} tokens ({n * dtype.itemsize} "
                         "bytes); the folder is incomplete or mixed, re-run prepare")
    if n == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))


def load_mask(folder, split: str) -> np.ndarray | None:
    """The loss mask of one split (``prepare_chat``): read-only ``(N,)`` uint8, 1 where the
    token carries loss; None for a split without one (every target counts)."""
    folder = Path(folder)
    meta = read_meta(folder)
    name = meta["splits"][split].get("mask")
    if name is None:
        return None
    n, path = int(meta["splits"][split]["tokens"]), folder / name
    size = path.stat().st_size if path.is_file() else None
    if size != n:
        raise InputError(f"{str(path)!r} has {size if size is not None else 'no'} bytes but "
                         f"meta.json says {n} tokens (one mask byte each); the folder is "
                         f"incomplete or mixed, re-run prepare --chat")
    return np.zeros(0, np.uint8) if n == 0 else np.memmap(path, dtype=np.uint8, mode="r",
                                                           shape=(n,))


def get_batch(data: np.ndarray, batch_size: int, block_size: int,
              rng: np.random.Generator, mask: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``batch_size`` random windows from a 1-D token array.

    ``ix = rng.integers(0, N - T, size=B)``; ``x[b] = data[ix[b] : ix[b]+T]`` and
    ``y[b] = data[ix[b]+1 : ix[b]+T+1]``.

    Args:
        data: ``(N,)`` token ids (e.g. from ``load_split``), ``N >= T + 1``.
        batch_size: ``B``; block_size: ``T``.
        rng: the only source of randomness; same generator state, same batch.
        mask: ``(N,)`` loss mask (``load_mask``) or None; where it is 0 the target is
            ``IGNORE_INDEX``. The same windows are drawn either way.
    Returns:
        ``x, y``: ``(B, T)`` int64 each, separate contiguous arrays.
    """
    for name, value in (("batch_size", batch_size), ("block_size", block_size)):
        if not (is_int(value) and value >= 1):
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(rng, np.random.Generator):
        raise InputError(f"rng must be a numpy.random.Generator "
                         f"(np.random.default_rng(seed)), got {type(rng).__name__}")
    if np.ndim(data) != 1:
        raise InputError(f"data must be a 1-D array of token ids, got shape {np.shape(data)}")
    if len(data) < block_size + 1:
        raise InputError(f"the split has {len(data)} tokens, but block_size {block_size} "
                         f"needs at least {block_size + 1}; lower block_size or add data")
    ix = rng.integers(0, len(data) - block_size, size=batch_size)  # (B,)
    window = ix[:, None] + np.arange(block_size + 1)               # (B, T+1)
    tokens = np.asarray(data)[window].astype(np.int64)             # (B, T+1)
    x, y = np.ascontiguousarray(tokens[:, :-1]), np.ascontiguousarray(tokens[:, 1:])
    if mask is not None:
        y[np.asarray(mask)[window[:, 1:]] == 0] = IGNORE_INDEX     # (B, T)
    return x, y


class TokenDataset:
    """A ``prepare`` output folder: meta plus memory-mapped splits.

    ``ds.train`` / ``ds.val`` are ``(N,)`` arrays; ``ds.get_batch("train", B, T, rng)``
    returns ``(x, y)`` of shape ``(B, T)``.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        self.vocab_size = int(self.meta["vocab_size"])
        self.tokenizer_config = self.meta["tokenizer"]
        self.splits = {s: load_split(self.folder, s) for s in SPLITS}
        self.masks = {s: load_mask(self.folder, s) for s in SPLITS}  # None: all targets count

    @property
    def train(self) -> np.ndarray:
        return self.splits["train"]

    @property
    def val(self) -> np.ndarray:
        return self.splits["val"]

    def get_batch(self, split: str, batch_size: int, block_size: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``get_batch`` on one split: ``(x, y)``, each ``(B, T)`` int64."""
        if split not in self.splits:
            raise InputError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        return get_batch(self.splits[split], batch_size, block_size, rng, self.masks[split])

    def __repr__(self) -> str:
        counts = {s: len(a) for s, a in self.splits.items()}
        return f"TokenDataset({str(self.folder)!r}, {counts}, dtype={self.meta['dtype']})"
