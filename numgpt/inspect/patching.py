"""Activation patching: which activations carry the difference between two prompts.

Run a clean and a corrupted prompt of equal length; the metric is the logit difference
``logit[answer] - logit[wrong]`` at the last position. Then run the corrupted prompt again
with one activation taken from the clean run and report the normalised logit difference

    (LD_patched - LD_corrupted) / (LD_clean - LD_corrupted)

(1: the patch restores the clean answer; 0: it does nothing). Two sweeps, as
TransformerLens's ``get_act_patch_resid_pre`` and ``get_act_patch_attn_head_out_all_pos``:

* the residual stream entering each block (``blocks.{l}.hook_resid_pre``), one position at
  a time: (L, T);
* each head's output (``blocks.{l}.attn.hook_z``), all positions at once: (L, nh).

Each layer's sweep is one batched forward pass (row i patches position or head i), so a
sweep costs L passes, not L x T.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .common import Result, logit_diff, prompt, token

__all__ = ["Patching", "patch"]


@dataclass(frozen=True)
class Patching(Result):
    """resid (L, T) and heads (L, nh): normalised logit differences after each patch."""

    clean_ids: list[int]
    corrupted_ids: list[int]
    answer: int
    wrong: int
    clean_diff: float
    corrupted_diff: float
    resid: np.ndarray
    heads: np.ndarray


def _normalised(logits, answer, wrong, clean, corrupted) -> np.ndarray:
    return (logit_diff(logits, answer, wrong) - corrupted) / (clean - corrupted)


def patch(model, clean_ids, corrupted_ids, answer: int, wrong: int) -> Patching:
    """Patch clean activations into the corrupted run; see the module docstring."""
    clean, corrupted = prompt(model, clean_ids, "clean prompt"), prompt(model, corrupted_ids, "corrupted prompt")
    if clean.shape != corrupted.shape:
        raise InputError(f"the clean prompt has {clean.shape[1]} tokens and the corrupted one "
                         f"{corrupted.shape[1]}; patching lines positions up, so give prompts of "
                         f"equal length")
    answer, wrong = token(model, answer, "the answer token"), token(model, wrong, "the wrong token")
    c = model.config
    names = [f"blocks.{l}.{p}" for l in range(c.n_layer) for p in ("hook_resid_pre", "attn.hook_z")]
    clean_logits, cache = model.run_with_cache(clean, names)
    ld_clean = float(logit_diff(clean_logits, answer, wrong)[0])
    ld_corrupted = float(logit_diff(model.run_with_hooks(corrupted), answer, wrong)[0])
    if abs(ld_clean - ld_corrupted) < 1e-6 * max(1.0, abs(ld_clean)):
        raise InputError(f"the logit difference is {ld_clean:.6g} on both prompts, so there is "
                         f"nothing to restore; pick prompts (or answer/wrong tokens) the model "
                         f"tells apart")
    T, nh = clean.shape[1], c.n_head
    resid, heads = np.zeros((c.n_layer, T)), np.zeros((c.n_layer, nh))
    for l in range(c.n_layer):
        clean_resid, clean_z = cache[f"blocks.{l}.hook_resid_pre"], cache[f"blocks.{l}.attn.hook_z"]

        def one_position_each(x, hook, src=clean_resid):  # row i takes clean position i
            x[np.arange(T), np.arange(T)] = src[0]

        def one_head_each(z, hook, src=clean_z):  # row i takes clean head i, every position
            z[np.arange(nh), :, np.arange(nh)] = src[0].transpose(1, 0, 2)  # (nh, T, hs)
        runs = ((resid, f"blocks.{l}.hook_resid_pre", one_position_each, T),
                (heads, f"blocks.{l}.attn.hook_z", one_head_each, nh))
        for out, name, fn, rows in runs:
            logits = model.run_with_hooks(np.repeat(corrupted, rows, axis=0), [(name, fn)])
            out[l] = _normalised(logits, answer, wrong, ld_clean, ld_corrupted)
    return Patching([int(i) for i in clean[0]], [int(i) for i in corrupted[0]], answer, wrong,
                    ld_clean, ld_corrupted, resid, heads)
