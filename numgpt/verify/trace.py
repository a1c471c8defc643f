"""Validation checkpoints: record the intermediates of a greedy run, compare two recordings.

Someone implementing GPT-2 in another engine (or changing this one) needs to know not just
*that* the output differs but *where* it starts to. ``record`` runs a greedy generation
through the KV-cache path (the prompt pass, then one decode pass per new token) and keeps
twelve named checkpoints of every pass; ``compare`` lines two recordings up checkpoint by
checkpoint with a tolerance each, and ``first_failure`` names the earliest disagreement,
which is where the bug is. ``numgpt.verify.reference.record_transformers`` writes the same format
from a Hugging Face ``transformers`` model, so numgpt can be checked against the reference
engine (and any other engine against either).

Steps. ``n_steps`` = N greedy tokens. Step 0 is the prompt pass (T prompt tokens in, picks
generated token 0); step s >= 1 is the decode pass that feeds generated token s-1 and
picks token s. So a recording holds N passes and N generated ids.

Keys (``step{s}/NN_name`` for each step s, then ``gen/`` and ``meta/``), batch of one,
Tn new tokens this step (T at step 0, 1 after), Tk = tokens in the cache after it:

==  ====================  =============================================  ==============
 #  key                   what (block 0 unless said)                     shape
==  ====================  =============================================  ==============
 1  01_ln1                ``ln_1`` output                                (1, Tn, C)
 2  02_q, 02_k, 02_v      queries/keys/values of the new tokens,         (1, nh, Tn, hs)
                          after the head split
 3  03_cache_k/_v         the valid part of the KV cache after the step  (1, nh, Tk, hs)
 4  04_scores             ``q k^T / sqrt(hs)``, future keys set to -inf  (1, nh, Tn, Tk)
    04_probs              softmax of the scores                          (1, nh, Tn, Tk)
 5  05_attn_out           attention output after ``c_proj``              (1, Tn, C)
 6  06_mlp_out            MLP output                                     (1, Tn, C)
 7  07_block_out          block 0 output                                 (1, Tn, C)
 8  08_logits             logits after all layers, every new position    (1, Tn, V)
 9  09_last_logits        the selected last-position logits              (1, V)
10  10_argmax             the greedy token                               (1,) int64
11  11_probs              softmax of the last-position logits            (1, V)
12  gen/12_ids, 12_text   all generated ids, and their text              (N,), str
==  ====================  =============================================  ==============

``meta/format``, ``meta/engine``, ``meta/numgpt_version``, ``meta/config`` (JSON),
``meta/prompt_ids`` and ``meta/n_steps`` describe the run. Files are plain ``.npz`` (no
pickle; strings are unicode arrays), written atomically.

How numgpt fills them: checkpoints 1, 2, 3, 5, 6 and 7 are named hook points of block 0
(``HOOKED``: ``blocks.0.ln1.hook_out``, ``blocks.0.attn.hook_q``, ... see core/hooks.py),
read by ``GPT.forward_cached(..., hooks=...)`` with the fused attention kernel still in
place (nothing is recomputed). The fused
attention kernel never hands out its scores, so checkpoint 4 is computed from the
recorded q and cached keys with the reference chain (``ops.attention_reference_steps``:
``attention_scores``, ``causal_mask``, ``softmax``); an error inside the inference entry
itself shows at checkpoint 5.

Masked scores. numgpt masks future keys with -inf; Hugging Face's eager attention adds the
dtype's most negative finite value instead. Both recorders therefore store -inf at every
masked position (the reference recorder overwrites them), and ``compare`` counts two equal
infinities as a difference of 0 and an infinity against a number as an infinite one.

Tolerances (max abs difference, A versus B): 1e-5 for 1; 1e-4 for 2 and 4-7; 1e-4 for 3
across engines, and *exact* inside each recording (the cache of step s at positions below
the previous length equals step s-1's cache bit for bit: a cache must never rewrite the
past); 1e-3 for 8 and for 9 across engines, and 9 *exactly* equal to the last row of 8
inside each recording (the selection); exact for 10 and 12; 1e-6 for 11. Rows fail on
missing arrays and on shape mismatches (with a message, never a crash).

The first failure is the failing row with the earliest step, then the lowest checkpoint
number: once an argmax differs the engines feed different tokens, and every later step
differs for that reason alone.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .. import __version__
from ..core import ops
from ..core.checks import check_token_ids, is_int
from ..errors import InputError
from ..io.files import atomic_write, make_folder

__all__ = ["FORMAT", "Checkpoint", "CHECKPOINTS", "Row", "record", "save_trace", "load_trace",
           "compare", "tolerances", "first_failure", "passed", "summary", "format_table", "write_report",
           "check_prompt", "step_key", "meta", "generated", "describe", "n_steps"]

FORMAT = "numgpt-trace/1"
ENGINE = f"numgpt {__version__}"
EXACT = 0.0


@dataclass(frozen=True)
class Checkpoint:
    """One validation checkpoint: its number, title, array names and A-vs-B tolerance."""

    number: int
    title: str
    arrays: tuple[str, ...]
    tol: float


CHECKPOINTS = (
    Checkpoint(1, "LayerNorm output (block 0 ln_1)", ("01_ln1",), 1e-5),
    Checkpoint(2, "Q, K, V after the head split", ("02_q", "02_k", "02_v"), 1e-4),
    Checkpoint(3, "KV-cache contents (block 0)", ("03_cache_k", "03_cache_v"), 1e-4),
    Checkpoint(4, "attention scores and probabilities", ("04_scores", "04_probs"), 1e-4),
    Checkpoint(5, "attention output after c_proj", ("05_attn_out",), 1e-4),
    Checkpoint(6, "MLP output", ("06_mlp_out",), 1e-4),
    Checkpoint(7, "first block output", ("07_block_out",), 1e-4),
    Checkpoint(8, "logits after all layers", ("08_logits",), 1e-3),
    Checkpoint(9, "selected last-position logits", ("09_last_logits",), 1e-3),
    Checkpoint(10, "argmax token", ("10_argmax",), EXACT),
    Checkpoint(11, "softmax probabilities (last position)", ("11_probs",), 1e-6),
    Checkpoint(12, "generated ids and text", ("12_ids", "12_text"), EXACT),
)
_BY_NUMBER = {c.number: c for c in CHECKPOINTS}


def step_key(step: int, name: str) -> str:
    """``step_key(0, "01_ln1") -> "step0/01_ln1"``."""
    return f"step{step}/{name}"


# ------------------------------------------------------------------------- recording

def check_prompt(prompt_ids, n_steps: int, vocab_size: int, block_size: int) -> list[int]:
    """Validate a prompt and a step count; returns the ids as a list of ints.

    The run needs ``len(prompt) + n_steps - 1`` positions (the last token is picked, not fed).
    """
    ids = np.asarray(prompt_ids)
    if ids.ndim != 1 or ids.size == 0:
        raise InputError(f"prompt ids must be a non-empty 1-D list of integers, got {prompt_ids!r}")
    ids = check_token_ids(ids, vocab_size, what="prompt ids")
    if not is_int(n_steps) or n_steps < 1:
        raise InputError(f"the number of steps must be an integer >= 1, got {n_steps!r}")
    need = len(ids) + n_steps - 1
    if need > block_size:
        raise InputError(f"a {len(ids)}-token prompt and {n_steps} steps need {need} positions, "
                         f"more than the context length {block_size}; shorten either")
    return [int(i) for i in ids]


def meta(engine: str, prompt_ids: list[int], n_steps: int, config: Mapping[str, Any]) -> dict:
    """The ``meta/`` entries every recording carries (any recorder calls this)."""
    return {
        "meta/format": np.array(FORMAT),
        "meta/engine": np.array(engine),
        "meta/numgpt_version": np.array(__version__),
        "meta/config": np.array(json.dumps(dict(config), sort_keys=True, default=str)),
        "meta/prompt_ids": np.asarray(prompt_ids, dtype=np.int64),
        "meta/n_steps": np.array(n_steps, dtype=np.int64),
    }


def generated(ids: list[int], tokenizer) -> dict:
    """Checkpoint 12: the generated ids and their text ("" when there is no tokenizer)."""
    text = tokenizer.decode(ids) if tokenizer is not None else ""
    return {"gen/12_ids": np.asarray(ids, dtype=np.int64), "gen/12_text": np.array(text)}


# Checkpoints 1-3 and 5-7 are hook points of block 0 (core/hooks.py); True: the trace
# stores them heads first, (1, nh, Tn, hs), where the hook point is (1, Tn, nh, hs).
HOOKED = {"01_ln1": ("blocks.0.ln1.hook_out", False), "02_q": ("blocks.0.attn.hook_q", True),
          "02_k": ("blocks.0.attn.hook_k", True), "02_v": ("blocks.0.attn.hook_v", True),
          "03_cache_k": ("blocks.0.attn.hook_cache_k", False),
          "03_cache_v": ("blocks.0.attn.hook_cache_v", False),
          "05_attn_out": ("blocks.0.hook_attn_out", False),
          "06_mlp_out": ("blocks.0.hook_mlp_out", False),
          "07_block_out": ("blocks.0.hook_resid_post", False)}


def _block0_hooks(seen: dict) -> list:
    """Hooks that keep copies of block 0's checkpoints in ``seen`` under their trace keys
    (copies: the cache arrays are views that later steps overwrite)."""
    def keep(key: str, heads: bool):
        def fn(activation, hook):
            seen[key] = (activation.transpose(0, 2, 1, 3) if heads else activation).copy()
        return fn
    return [(name, keep(key, heads)) for key, (name, heads) in HOOKED.items()]


def _attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masked scaled scores and their softmax from the REFERENCE chain
    (``ops.attention_reference_steps``), checkpoint 4.

    q (1, nh, Tn, hs), keys/values (1, nh, Tk, hs) -> scores, probs (1, nh, Tn, Tk); the
    queries are the newest Tn positions, so query i sees keys j <= Tk - Tn + i.
    """
    ref = ops.attention_reference_steps(q, keys, values)
    return ref.masked, ref.probs


def _step_arrays(seen: Mapping[str, np.ndarray], logits: np.ndarray) -> dict[str, np.ndarray]:
    """The checkpoint arrays of one step, from block 0's hook points and logits (1, Tn, V)."""
    scores, probs = _attention(seen["02_q"], seen["03_cache_k"], seen["03_cache_v"])
    last = logits[:, -1].copy()  # (1, V): the selection, checkpoint 9
    return {
        **seen, "04_scores": scores, "04_probs": probs,
        "08_logits": logits, "09_last_logits": last,
        "10_argmax": np.argmax(last, axis=-1).astype(np.int64),  # (1,)
        "11_probs": ops.softmax(last)[0],  # (1, V)
    }


def record(model, prompt_ids, n_steps: int, tokenizer=None) -> dict[str, np.ndarray]:
    """Greedy-generate ``n_steps`` tokens with the KV cache and record every checkpoint.

    model: a numgpt ``GPT``; prompt_ids: 1-D ints; tokenizer (default ``model.tokenizer``)
    only decodes checkpoint 12's text. Returns ``{key: array}`` as described in the module
    docstring; ``save_trace`` writes it.
    """
    c = model.config
    ids = check_prompt(prompt_ids, n_steps, c.vocab_size, c.block_size)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    cache = model.new_cache(1, len(ids) + n_steps - 1)
    trace = meta(ENGINE, ids, n_steps, c.to_dict())
    new = np.asarray([ids], dtype=np.int64)  # (1, T)
    picked: list[int] = []
    for step in range(n_steps):
        seen: dict[str, np.ndarray] = {}
        logits = model.forward_cached(new, cache, all_logits=True, hooks=_block0_hooks(seen))  # (1, Tn, V)
        arrays = _step_arrays(seen, logits)
        trace.update({step_key(step, k): v for k, v in arrays.items()})
        picked.append(int(arrays["10_argmax"][0]))
        new = np.asarray([[picked[-1]]], dtype=np.int64)  # (1, 1)
    trace.update(generated(picked, tokenizer))
    return trace


# ------------------------------------------------------------------------------ files

def save_trace(path: str | os.PathLike, trace: Mapping[str, np.ndarray]) -> Path:
    """Write a recording as ``.npz`` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    if trace.get("meta/format") is None or str(trace["meta/format"]) != FORMAT:
        raise InputError(f"not a numgpt trace (no meta/format = {FORMAT!r}); record one with "
                         f"numgpt.verify.trace.record or numgpt.verify.reference.record_transformers")
    make_folder(path.parent, "the trace")
    return atomic_write(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in trace.items()}))


def load_trace(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a recording written by ``save_trace`` (no pickle); refuses anything else."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"trace file {path} does not exist; record one with `numgpt trace`")
    try:
        with np.load(path, allow_pickle=False) as z:
            trace = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{path} is not a readable .npz trace ({exc}); record it again "
                         f"with `numgpt trace`") from exc
    found = str(trace["meta/format"]) if "meta/format" in trace else None
    if found != FORMAT:
        raise InputError(f"{path} has trace format {found!r}, expected {FORMAT!r}; "
                         f"record it again with this numgpt")
    return trace


# ---------------------------------------------------------------------------- compare

@dataclass
class Row:
    """One line of a comparison: one array of one checkpoint, one kind of check.

    check: "A vs B" (across engines), "within A" / "within B" (inside one recording).
    max_diff: max abs difference over all steps compared (inf on a shape mismatch).
    step: the first step that fails (-1 for the prompt, None when the row passes).
    """

    checkpoint: int
    array: str
    check: str
    shapes: str
    max_diff: float
    tol: float
    passed: bool
    step: int | None = None
    message: str = ""

    @property
    def title(self) -> str:
        return _BY_NUMBER[self.checkpoint].title if self.checkpoint in _BY_NUMBER else "prompt ids"


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Max |a - b| in float64; equal entries (equal infinities too) count 0, NaN counts inf."""
    if a.size == 0:
        return 0.0
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    with np.errstate(invalid="ignore"):
        d = np.where(a64 == b64, 0.0, np.abs(a64 - b64))
    return float(np.where(np.isnan(d), np.inf, d).max())


def _fmt_shape(shape: tuple[int, ...] | None) -> str:
    return "missing" if shape is None else str(tuple(int(n) for n in shape))


def _shapes(first: tuple, last: tuple) -> str:
    """"(1, 2, 1024) -> (1, 1, 1024)" for the first and last step (one shape when equal)."""
    a, b = _fmt_shape(first), _fmt_shape(last)
    return a if a == b else f"{a} -> {b}"


def n_steps(trace: Mapping[str, np.ndarray]) -> int:
    return int(trace["meta/n_steps"])


class _Tally:
    """Accumulates one row's per-step differences: max diff, first failing step, message."""

    def __init__(self, tol: float):
        self.tol, self.max_diff, self.step, self.message = tol, 0.0, None, ""

    def add(self, step: int, diff: float, message: str = "") -> None:
        self.max_diff = max(self.max_diff, diff)
        if (diff > self.tol or message) and self.step is None:
            self.step = step
            self.message = message or f"step {step}: max abs diff {diff:.3g} > {_fmt_tol(self.tol)}"

    def row(self, number: int, array: str, check: str, shapes: str) -> Row:
        return Row(number, array, check, shapes, self.max_diff, self.tol, self.step is None,
                   self.step, self.message)


def _pair(a: Mapping, b: Mapping, key: str) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """The two arrays under ``key`` and a message when they cannot be compared."""
    x, y = a.get(key), b.get(key)
    if x is None or y is None:
        where = " and ".join(n for n, t in (("A", x), ("B", y)) if t is None)
        return x, y, f"{key} missing in {where}"
    if x.shape != y.shape:
        return x, y, f"{key}: shape {_fmt_shape(x.shape)} in A but {_fmt_shape(y.shape)} in B"
    return x, y, ""


def _across(a: Mapping, b: Mapping, number: int, name: str, steps: int, tol: float) -> Row:
    """A-vs-B row for one per-step array over steps 0..steps-1."""
    tally, first, last = _Tally(tol), None, None
    for s in range(steps):
        x, y, problem = _pair(a, b, step_key(s, name))
        if s == 0 and x is not None:
            first = x.shape
        last = x.shape if x is not None else last
        tally.add(s, math.inf if problem else _max_abs_diff(x, y), problem)
    return tally.row(number, name, "A vs B", _shapes(first, last))


def _cache_within(t: Mapping, label: str) -> Row:
    """Inside one recording: step s's cache keeps step s-1's cache exactly, grown by Tn."""
    tally, shapes = _Tally(EXACT), []
    for s in range(n_steps(t)):
        for name in ("03_cache_k", "03_cache_v"):
            now, before = t.get(step_key(s, name)), t.get(step_key(s - 1, name))
            new = t.get(step_key(s, "02_k"))
            if now is None or new is None:
                tally.add(s, math.inf, f"step {s}: {name} or 02_k missing")
                continue
            if now.ndim != 4 or (before is not None and before.ndim != 4) or new.ndim != 4:
                tally.add(s, math.inf, f"step {s}: {name} must be (1, nh, Tk, hs), got "
                                       f"{_fmt_shape(now.shape)}")
                continue
            shapes.append(now.shape)
            prev_len = 0 if before is None else before.shape[2]
            if now.shape[2] != prev_len + new.shape[2]:
                tally.add(s, math.inf, f"step {s}: {name} holds {now.shape[2]} positions, expected "
                                       f"{prev_len} before + {new.shape[2]} new")
            elif before is not None:
                tally.add(s, _max_abs_diff(now[:, :, :prev_len], before))
    return tally.row(3, "03_cache_k/v", f"within {label}",
                     _shapes(shapes[0], shapes[-1]) if shapes else "missing")


def _selection_within(t: Mapping, label: str) -> Row:
    """Inside one recording: 09_last_logits is exactly the last row of 08_logits."""
    tally, shape = _Tally(EXACT), None
    for s in range(n_steps(t)):
        logits, last = t.get(step_key(s, "08_logits")), t.get(step_key(s, "09_last_logits"))
        if logits is None or last is None:
            tally.add(s, math.inf, f"step {s}: 08_logits or 09_last_logits missing")
        elif logits.ndim != 3 or last.shape != logits.shape[:1] + logits.shape[2:]:
            tally.add(s, math.inf, f"step {s}: 09_last_logits {_fmt_shape(last.shape)} is not "
                                   f"the last row of 08_logits {_fmt_shape(logits.shape)}")
        else:
            shape = last.shape
            tally.add(s, _max_abs_diff(logits[:, -1], last))
    return tally.row(9, "09 == 08[:, -1]", f"within {label}", _fmt_shape(shape))


def _prompt_row(a: Mapping, b: Mapping) -> Row:
    x, y = a.get("meta/prompt_ids"), b.get("meta/prompt_ids")
    same = x is not None and y is not None and x.shape == y.shape and bool(np.all(x == y))
    message = "" if same else f"the recordings are of different prompts: {x} vs {y}"
    return Row(0, "meta/prompt_ids", "A vs B", _fmt_shape(None if x is None else x.shape),
               0.0 if same else math.inf, EXACT, same, None if same else -1, message)


def _ids_row(a: Mapping, b: Mapping) -> Row:
    x, y = a.get("gen/12_ids"), b.get("gen/12_ids")
    if x is None or y is None:
        return Row(12, "12_ids", "A vs B", "missing", math.inf, EXACT, False, 0, "gen/12_ids missing")
    n = min(len(x), len(y))
    differ = np.nonzero(x[:n] != y[:n])[0]
    first = int(differ[0]) if len(differ) else (None if len(x) == len(y) else n)
    message = "" if first is None else (
        f"token {first} differs: {x[first]} vs {y[first]}" if len(differ)
        else f"A generated {len(x)} tokens, B {len(y)}")
    diff = 0.0 if first is None else (_max_abs_diff(x[:n], y[:n]) if len(differ) else math.inf)
    return Row(12, "12_ids", "A vs B", _shapes(x.shape, y.shape), diff, EXACT, first is None,
               first, message)


def _text_row(a: Mapping, b: Mapping) -> Row:
    x, y = str(a.get("gen/12_text", "")), str(b.get("gen/12_text", ""))
    same = x == y
    return Row(12, "12_text", "A vs B", f"{len(x)} chars", 0.0 if same else math.inf, EXACT, same,
               None if same else max(n_steps(a), n_steps(b)) - 1,
               "" if same else f"text differs: {x!r} vs {y!r}")


def tolerances(scale: float = 1.0, overrides: Mapping[int, float] | None = None) -> dict[int, float]:
    """The A-vs-B tolerance of each checkpoint 1..11: ``CHECKPOINTS``' value times ``scale``
    (exact ones stay exact), then ``overrides`` (checkpoint number -> tolerance) on top.

    Looser tolerances are for recordings that are not meant to agree to float32 rounding,
    such as a q8_0 model against its float32 original. InputError on a scale or tolerance
    that is not a finite number >= 0 (scale > 0) and on a checkpoint outside 1..11 (12, the
    generated ids and text, is always exact)."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise InputError(f"tolerance scale must be a finite number > 0, got {scale!r}; "
                         f"e.g. 100 for a q8_0 model against its float32 original")
    out = {c.number: c.tol * scale for c in CHECKPOINTS[:-1]}
    for number, tol in (overrides or {}).items():
        if number not in out:
            raise InputError(f"no checkpoint {number!r} takes a tolerance: checkpoints 1..11 do "
                             f"(12, the generated ids and text, is always exact)")
        if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
            raise InputError(f"tolerance for checkpoint {number} must be a finite number >= 0, "
                             f"got {tol!r}")
        out[number] = float(tol)
    return out


def compare(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], *,
            tolerance_scale: float = 1.0, atol: Mapping[int, float] | None = None) -> list[Row]:
    """Compare recording A with recording B; one ``Row`` per array and check, in checkpoint order.

    Steps beyond the shorter recording are not compared array by array; the generated-ids
    row fails when the step counts differ. ``tolerance_scale`` and ``atol`` loosen (or
    tighten) the A-vs-B tolerances, see ``tolerances``; the checks within one recording
    keep theirs.
    """
    tol = tolerances(tolerance_scale, atol)
    steps = min(n_steps(a), n_steps(b))
    rows = [_prompt_row(a, b)]
    for cp in CHECKPOINTS[:-1]:
        rows += [_across(a, b, cp.number, name, steps, tol[cp.number]) for name in cp.arrays]
        if cp.number == 3:
            rows += [_cache_within(a, "A"), _cache_within(b, "B")]
        if cp.number == 9:
            rows += [_selection_within(a, "A"), _selection_within(b, "B")]
    return rows + [_ids_row(a, b), _text_row(a, b)]


def passed(rows: list[Row]) -> bool:
    return all(r.passed for r in rows)


def first_failure(rows: list[Row]) -> Row | None:
    """The failing row with the earliest step, then the lowest checkpoint (None if all pass)."""
    failing = [(r.step if r.step is not None else math.inf, r.checkpoint, i)
               for i, r in enumerate(rows) if not r.passed]
    return rows[min(failing)[2]] if failing else None


def summary(rows: list[Row]) -> str:
    """One line: all pass, or the first failing checkpoint and why."""
    bad = first_failure(rows)
    if bad is None:
        return f"PASS: all 12 checkpoints agree ({len(rows)} checks)"
    n_bad = sum(not r.passed for r in rows)
    return (f"FAIL: first failing checkpoint: {bad.checkpoint} ({bad.title}; {bad.array}, "
            f"{bad.check}): {bad.message}  [{n_bad} of {len(rows)} checks fail]")


def _fmt_tol(tol: float) -> str:
    if tol == EXACT:
        return "exact"
    short = f"{tol:.0e}"
    return short if float(short) == tol else f"{tol:.3g}"  # a scaled tolerance, e.g. 5e-3 * 3


def _fmt_diff(d: float) -> str:
    return "inf" if math.isinf(d) else ("0" if d == 0 else f"{d:.3g}")


def format_table(rows: list[Row]) -> str:
    """Markdown table, one line per row."""
    lines = ["| # | checkpoint | array | check | shape (first -> last step) | max abs diff "
             "| tolerance | result |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        result = "PASS" if r.passed else f"**FAIL** ({r.message})"
        lines.append(f"| {r.checkpoint} | {r.title} | `{r.array}` | {r.check} | {r.shapes} "
                     f"| {_fmt_diff(r.max_diff)} | {_fmt_tol(r.tol)} | {result} |")
    return "\n".join(lines)


def describe(trace: Mapping[str, np.ndarray]) -> str:
    """``engine, prompt ids, steps, generated ids``: one line about a recording."""
    return (f"{trace['meta/engine']}: prompt {trace['meta/prompt_ids'].tolist()}, "
            f"{n_steps(trace)} steps, generated {trace['gen/12_ids'].tolist()} "
            f"{str(trace['gen/12_text'])!r}")


def write_report(path: str | os.PathLike, rows: list[Row], a: Mapping, b: Mapping,
                 heading: str = "Trace comparison", notes: str = "") -> Path:
    """Write the table with a heading, both recordings described, and the summary (atomic)."""
    path = Path(path)
    text = "\n\n".join(part for part in (
        f"# {heading}", notes, f"- A: {describe(a)}\n- B: {describe(b)}",
        format_table(rows), summary(rows)) if part) + "\n"
    make_folder(path.parent, "the report")
    return atomic_write(path, text)
