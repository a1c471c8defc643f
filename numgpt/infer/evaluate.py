"""Evaluation: strided-window perplexity and LAMBADA-style last-word scoring, exactly as the
reference course's evaluation harness does them, so its published figures reproduce.

Perplexity (``perplexity``), the course's loop over a text of ``N`` token ids with
``L = block_size`` and ``stride`` (default ``L // 2``)::

    begin, prev_end = 0, 0
    while True:
        end = min(begin + L, N - 1)
        x, y = ids[begin:end], ids[begin + 1:end + 1]   # read up to L tokens, predict the next of each
        sum the NLLs of the last trg_len = end - prev_end positions of y
        prev_end = end
        if end == N - 1: stop
        begin += stride

The first window scores all its ``end`` targets; each later window scores only the
targets past the previous window's end. So every token from the second on is scored exactly
once: in the first window with all the tokens before it as context, in a later one with
between ``L - stride + 1`` and ``L`` tokens of context. ``stride`` may be 1 .. L (``L`` is the
fastest, no overlap; 1 gives every token the full context of ``L``). The mean NLL is the sum
of the per-token NLLs over the number of tokens scored; perplexity is ``exp`` of it.
Bits per byte (``bits_per_byte``), the tokenizer-independent figure: the summed NLL in bits
over the UTF-8 bytes of the scored tokens, ``sum(nll) / (ln 2 * bytes)``.

LAMBADA (``lambada``), the course's loop: each example's text is split at its last space
(``rsplit(" ", 1)``); the target is the final word *with* its leading space (``" " + word``),
the context is everything before. Context and target are encoded separately, the model
reads ``context + target`` (the context cut from the left if the pair exceeds ``block_size``)
and scores each target token given everything before it. An example is correct when every
target token is the argmax of its position. Two perplexities are reported: per token,
``exp`` of the mean NLL over all target tokens (the course's), and per word, ``exp`` of the
mean over examples of each target word's summed NLL (what lm-evaluation-harness reports as
LAMBADA perplexity: ``exp(-mean loglikelihood)``).

Both run without building a graph, and compute the log-softmax in float64.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..core.checks import check_token_ids, log_softmax64
from ..errors import InputError
from ..core.tensor import no_grad

__all__ = ["Window", "windows", "token_nll", "perplexity", "split_last_word", "lambada",
           "load_lambada_jsonl"]


# -------------------------------------------------------------------------- windows


@dataclass(frozen=True)
class Window:
    """One forward pass of the course's loop: the model reads tokens ``[begin, end)``, so
    position ``p`` predicts token ``p + 1``; the tokens ``[score_from, end]`` (inclusive:
    the last target is token ``end``) are scored, each with the tokens from ``begin`` up to it
    as context."""

    begin: int
    end: int
    score_from: int


def windows(n_tokens: int, block_size: int, stride: int) -> list[Window]:
    """The course's windows over ``n_tokens`` ids: they score tokens 1..n_tokens-1 once each.

    Window ``w`` reads ``[w * stride, min(w * stride + block_size, n_tokens - 1))`` and scores
    the targets past the previous window's end; the loop stops at the window that reaches
    ``n_tokens - 1``."""
    if not 1 <= stride <= block_size:
        raise InputError(f"stride must lie in [1, block_size = {block_size}], got {stride}; "
                         f"a longer stride would skip the tokens between two windows")
    if n_tokens < 2:
        raise InputError(f"perplexity needs at least 2 tokens (one to predict from), got {n_tokens}")
    out, begin, prev_end = [], 0, 0
    while True:
        end = min(begin + block_size, n_tokens - 1)
        out.append(Window(begin, end, prev_end + 1))
        prev_end = end
        if end == n_tokens - 1:
            return out
        begin += stride


def _as_ids(ids, vocab_size: int, what: str) -> np.ndarray:
    """Token ids as a 1-D int64 array inside the model's vocabulary, else InputError."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise InputError(f"{what} must be a flat sequence of integer token ids, got shape "
                         f"{arr.shape} and dtype {arr.dtype}")
    return check_token_ids(arr, vocab_size, what=what,
                           hint="was the text encoded with another tokenizer?")


def _last_logits(model, ids: np.ndarray, n_last: int) -> np.ndarray:
    """Logits of the last ``n_last`` positions of one window: ids (T,) -> (n_last, V).

    The full causal forward over the window (no graph), with the output head applied only
    where scores are needed."""
    with no_grad():
        x = model.embed(ids[None], np.arange(len(ids)))  # (1, T, C)
        for block in model.h:
            x = block(x)
        return model.head(x[:, len(ids) - n_last:]).data[0]  # (1, n_last, V) -> (n_last, V)


def _nll_and_argmax(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-position NLL (float64) of ``targets`` and whether each is the argmax.

    logits (n, V), targets (n,) -> (n,), (n,) bool."""
    nll = -log_softmax64(logits)[np.arange(len(targets)), targets]  # (n,)
    return nll, np.argmax(logits, axis=-1) == targets


# ------------------------------------------------------------------------ perplexity


def token_nll(model, ids, *, stride: int | None = None, progress: bool = False) -> np.ndarray:
    """NLL of every token from the second on under the strided protocol: ids (N,) -> (N - 1,),
    entry i is the NLL of token i + 1."""
    ids = _as_ids(ids, model.config.vocab_size, "text")
    L = model.config.block_size
    stride = max(1, L // 2) if stride is None else int(stride)
    plan = windows(len(ids), L, stride)
    out = np.empty(len(ids) - 1)
    for w in _progress(plan, progress, "perplexity", "window"):
        n = w.end + 1 - w.score_from  # the course's trg_len = end - prev_end
        logits = _last_logits(model, ids[w.begin:w.end], n)  # position p predicts p + 1
        out[w.score_from - 1:w.end] = _nll_and_argmax(logits, ids[w.score_from:w.end + 1])[0]
    return out


def perplexity(model, ids, *, stride: int | None = None, max_tokens: int | None = None,
               progress: bool = True, tokenizer=None) -> dict:
    """Strided sliding-window perplexity of a token sequence (the course's loop, above).

    ids: the text's token ids (N,). stride: window advance (default block_size // 2).
    max_tokens: use only the first max_tokens ids (so max_tokens - 1 are scored).
    tokenizer: gives each scored token's bytes for bits per byte (default the model's).
    Returns ``{"tokens": tokens scored, "nll": mean NLL (nats), "perplexity": exp(nll),
    "bytes": UTF-8 bytes of the scored tokens, "bits_per_byte"}``; the last two only when
    a tokenizer is known.
    """
    if max_tokens is not None:
        if max_tokens < 2:
            raise InputError(f"max_tokens must be >= 2 (one token is scored per token after "
                             f"the first), got {max_tokens}")
        ids = np.asarray(ids)[:max_tokens]
    nll = token_nll(model, ids, stride=stride, progress=progress)
    mean = float(nll.sum() / len(nll))
    out = {"tokens": int(len(nll)), "nll": mean, "perplexity": math.exp(mean)}
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is not None:
        n_bytes = len(tokenizer.decode_bytes(np.asarray(ids)[1:]))  # the scored tokens' bytes
        out["bytes"] = n_bytes
        out["bits_per_byte"] = float(nll.sum()) / (math.log(2) * n_bytes) if n_bytes else math.nan
    return out


# --------------------------------------------------------------------------- LAMBADA


def split_last_word(text: str) -> tuple[str, str]:
    """``"the cat sat on the mat"`` -> ``("the cat sat on the", " mat")``: split at the last
    space (trailing whitespace ignored); the target keeps its leading space."""
    text = text.rstrip()
    i = text.rfind(" ")
    if i <= 0 or i == len(text) - 1:
        raise InputError(f"cannot split {text[-60:]!r} into context and a last word: it needs "
                         f"some text, a space, then the word")
    return text[:i], text[i:]


def _score_example(model, tokenizer, text: str, where: str) -> tuple[np.ndarray, bool]:
    """NLL of each target token and whether all are argmax, for one LAMBADA text."""
    context, target = split_last_word(text)
    V, L = model.config.vocab_size, model.config.block_size
    ctx = _as_ids(tokenizer.encode(context), V, f"{where} context")
    tgt = _as_ids(tokenizer.encode(target), V, f"{where} target")
    if len(tgt) >= L:
        raise InputError(f"{where}: the target {target!r} is {len(tgt)} tokens; it must be "
                         f"shorter than block_size={L}")
    ids = np.concatenate([ctx, tgt])[-L:]  # keep the most recent context
    logits = _last_logits(model, ids[:-1], len(tgt))  # (len(tgt), V)
    nll, hit = _nll_and_argmax(logits, tgt)
    return nll, bool(hit.all())


def lambada(model, examples: Sequence[str], tokenizer, *, progress: bool = False) -> dict:
    """Last-word prediction over ``examples`` (texts); see the module docstring.

    Returns ``{"examples", "tokens" (target tokens scored), "nll" (mean per target token),
    "perplexity" (per token), "word_perplexity" (exp of the mean per-example summed NLL, as
    lm-evaluation-harness reports it), "accuracy" (fraction of examples whose every target
    token is the argmax)}``.
    """
    if len(examples) == 0:
        raise InputError("LAMBADA needs at least one example")
    nlls, correct = [], 0
    for i, text in enumerate(_progress(examples, progress, "lambada", "example")):
        nll, ok = _score_example(model, tokenizer, text, f"example {i}")
        nlls.append(nll)
        correct += ok
    allnll = np.concatenate(nlls)
    mean = float(allnll.sum() / len(allnll))
    per_word = float(np.mean([n.sum() for n in nlls]))
    return {"examples": len(examples), "tokens": int(len(allnll)), "nll": mean,
            "perplexity": math.exp(mean), "word_perplexity": math.exp(per_word),
            "accuracy": correct / len(examples)}


def load_lambada_jsonl(path) -> list[str]:
    """Texts of a LAMBADA JSONL file: one ``{"text": "..."}`` object per line (blank lines
    skipped). InputError names the line of anything else."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"LAMBADA file {str(path)!r} does not exist")
    texts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be "
                                 f'an object like {{"text": "..."}}') from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise InputError(f'{path}:{lineno}: expected an object with a string "text" '
                                 f"field, got {line.strip()[:80]!r}")
            texts.append(obj["text"])
    if not texts:
        raise InputError(f"{path}: no examples (the file is empty)")
    return texts


def _progress(items, enabled: bool, desc: str, unit: str) -> Iterator:
    """``items`` wrapped in a tqdm bar when enabled (imported only then)."""
    if not enabled:
        return iter(items)
    from tqdm import tqdm

    return iter(tqdm(items, desc=desc, unit=unit, leave=False))
