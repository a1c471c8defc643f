"""Next-token sanity checks: does the model predict the next token of real text?

``next_token_checks`` samples contexts from a token stream; for each it reports the token
that actually comes next, the model's argmax prediction, the top-K probabilities and the
probability the model gave the right token; the report's accuracy is the share of
contexts where the argmax was right. ``check_offset`` does the same for one chosen
position. Tokens are shown with ``describe_token`` (``' the'``, ``'\\n'``, ``b'\\xe2'``),
so byte-level and BPE models read alike.

The token stream comes from ``load_tokens``: a UTF-8 text file (encoded with the model's
tokenizer), a ``.bin`` written by ``numgpt prepare`` (its ``meta.json`` beside it gives the
dtype and the tokenizer, which must match the model's), or a prepared folder (its
``val.bin``).

Contexts run through the KV-cache path (``forward_cached``), which computes logits for
the last position only; probabilities are a float64 softmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.checks import log_softmax64
from ..errors import InputError
from ..io.data import read_meta
from ..io.tokenizer import describe_token

__all__ = ["SanityRow", "SanityReport", "load_tokens", "next_token_checks", "check_offset",
           "format_report", "format_row"]


@dataclass
class SanityRow:
    """One checked position: the context ``tokens[offset - ctx : offset]`` predicts
    ``expected = tokens[offset]``."""

    offset: int
    context: np.ndarray  # (ctx,) int
    expected: int
    predicted: int
    top: list[tuple[int, float]]  # (id, probability), most probable first
    p_expected: float

    @property
    def correct(self) -> bool:
        return self.predicted == self.expected


@dataclass
class SanityReport:
    rows: list[SanityRow]

    @property
    def accuracy(self) -> float:
        return sum(r.correct for r in self.rows) / max(len(self.rows), 1)

    @property
    def mean_nll(self) -> float:
        """Mean -log p(expected): the cross-entropy of the checked positions."""
        return float(np.mean([-np.log(max(r.p_expected, 1e-300)) for r in self.rows]))


# ---------------------------------------------------------------------- token sources

def _bin_meta(path: Path) -> dict:
    meta_path = path.parent / "meta.json"
    if not meta_path.is_file():
        raise InputError(f"{str(path)!r} has no meta.json beside it, so its dtype and tokenizer "
                         f"are unknown; pass the text file, or a .bin made by `numgpt prepare`")
    return read_meta(path.parent)  # every key checked: a wrong one is named, not a KeyError


def load_tokens(path, tokenizer) -> np.ndarray:
    """Token ids (N,) int64 from a text file, a prepared ``.bin``, or a prepared folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "val.bin"
    if not path.is_file():
        raise InputError(f"{str(path)!r} does not exist; pass a text file or a prepared .bin")
    if path.suffix == ".bin":
        meta = _bin_meta(path)
        mine = tokenizer.to_config()
        if meta["tokenizer"].get("type") != mine.get("type") or int(meta["vocab_size"]) != tokenizer.vocab_size:
            raise InputError(f"{str(path)!r} was tokenized with {meta['tokenizer'].get('type')} "
                             f"(vocab {meta['vocab_size']}) but the model uses {mine.get('type')} "
                             f"(vocab {tokenizer.vocab_size}); prepare it with the model's tokenizer")
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        return np.fromfile(path, dtype=dtype).astype(np.int64)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}); pass a "
                         f"text file or a .bin made by `numgpt prepare`") from None
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


# ---------------------------------------------------------------------- checks

def _check_ctx(model, tokens: np.ndarray, ctx: int, need: int) -> None:
    """``ctx`` within the model's context, and at least ``need`` tokens of data."""
    if not 1 <= ctx <= model.config.block_size:
        raise InputError(f"--ctx must be in [1, {model.config.block_size}] (the model's "
                         f"block_size), got {ctx}")
    if len(tokens) < need:
        raise InputError(f"the data has {len(tokens)} tokens; this check needs at least "
                         f"{need}; lower --ctx or use more text")


def _score(model, tokens: np.ndarray, offsets: np.ndarray, ctx: int, top: int,
           batch: int = 16) -> list[SanityRow]:
    """Rows for each offset; contexts are the ``ctx`` tokens before it (fewer near the start)."""
    rows = []
    for lo in range(0, len(offsets), batch):
        chunk = offsets[lo:lo + batch]
        width = int(min(ctx, chunk.min()))  # every row in a batch gets the same length
        idx = np.stack([tokens[o - width:o] for o in chunk])  # (A, width)
        cache = model.new_cache(slots=len(chunk), max_len=width)
        probs = np.exp(log_softmax64(model.forward_cached(idx, cache)))  # (A, V) float64
        for a, o in enumerate(chunk):
            order = np.argsort(-probs[a], kind="stable")[:top]
            expected = int(tokens[o])
            rows.append(SanityRow(int(o), idx[a], expected, int(order[0]),
                                  [(int(i), float(probs[a, i])) for i in order],
                                  float(probs[a, expected])))
    return rows


def next_token_checks(model, tokens: np.ndarray, n: int, *, ctx: int | None = None,
                      top: int = 5, seed: int = 0) -> SanityReport:
    """Check ``n`` positions drawn uniformly (``default_rng(seed)``) from ``[ctx, N)``."""
    ctx = min(model.config.block_size, 256) if ctx is None else ctx
    _check_ctx(model, tokens, ctx, need=ctx + 1)
    if n < 1:
        raise InputError(f"--next-from-data needs a count >= 1, got {n}")
    if top < 1:
        raise InputError(f"--top must be >= 1, got {top}")
    offsets = np.random.default_rng(seed).integers(ctx, len(tokens), size=n)  # (n,)
    return SanityReport(_score(model, tokens, offsets, ctx, top))


def check_offset(model, tokens: np.ndarray, offset: int, *, ctx: int | None = None,
                 top: int = 5) -> SanityRow:
    """Check the single position ``offset`` (its context: the up to ``ctx`` tokens before)."""
    ctx = min(model.config.block_size, 256) if ctx is None else ctx
    _check_ctx(model, tokens, ctx, need=2)
    if not 1 <= offset < len(tokens):
        raise InputError(f"--offset must be in [1, {len(tokens) - 1}] for this data "
                         f"({len(tokens)} tokens), got {offset}")
    return _score(model, tokens, np.array([offset]), ctx, top)[0]


# ---------------------------------------------------------------------- display

def format_row(row: SanityRow, tokenizer, preview: int = 12) -> str:
    """Several lines: the context tail, expected vs predicted, and the top-K list."""
    tail = row.context[-preview:] if preview > 0 else row.context[:0]
    text = tokenizer.decode_bytes(tail).decode("utf-8", errors="replace")
    mark = "ok  " if row.correct else "MISS"
    lines = [f"[{mark}] offset {row.offset}: ...{text!r}",
             f"       expected {describe_token(tokenizer, row.expected)} (p={row.p_expected:.3f}), "
             f"predicted {describe_token(tokenizer, row.predicted)}",
             "       top: " + ", ".join(f"{describe_token(tokenizer, i)} {p:.3f}" for i, p in row.top)]
    return "\n".join(lines)


def format_report(report: SanityReport, tokenizer, preview: int = 12) -> str:
    body = [format_row(r, tokenizer, preview) for r in report.rows]
    n, hits = len(report.rows), sum(r.correct for r in report.rows)
    body.append(f"accuracy: {hits}/{n} = {report.accuracy:.1%} (argmax equals the next token); "
                f"mean loss of the expected tokens {report.mean_nll:.3f} nats")
    return "\n".join(body)
