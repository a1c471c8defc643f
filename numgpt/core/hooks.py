"""Named hook points: read or replace any activation of a forward pass by name.

The names are TransformerLens's (``blocks.3.attn.hook_pattern``), so code written against
its ``run_with_cache`` / ``run_with_hooks`` reads the same here, and every activation is
checked against TransformerLens's ``TransformerBridge`` on the same weights
(tests/test_hooks.py). A hook is a plain function ``fn(activation, hook) -> array or None``:
``hook.name`` is the point's name and ``hook.layer()`` its block; returning an array (same
shape) replaces the activation, and editing the array in place does the same, so either
way the rest of the forward pass computes from the new value.

Where each point sits is written once, in ``GPT._hooked_layers`` (core/model.py); the
validation trace (verify/trace.py) records its checkpoints through these names. A model
with no hook set never enters that code: ``forward`` and ``forward_cached`` run the fused
fast path exactly as before.

Shapes (B rows, T new positions, Tk keys, C width, nh heads, hs head size, F = 4C):

=====================================  ==============================================
name                                   activation
=====================================  ==============================================
hook_embed, hook_pos_embed             token / position embedding (B, T, C)
blocks.{l}.hook_resid_pre              residual stream entering block l (B, T, C)
blocks.{l}.ln1.hook_normalized         (x - mean) / sqrt(var + eps), before the gain (B, T, C)
blocks.{l}.ln1.hook_out                ln_1 output, after gain and bias (B, T, C)
blocks.{l}.attn.hook_q / hook_k / v    queries / keys / values of the new tokens (B, T, nh, hs)
blocks.{l}.attn.hook_cache_k / _v      numgpt only: the KV cache after this pass's write,
                                       read-only (B, nh, Tk, hs)
blocks.{l}.attn.hook_attn_scores       q k^T / sqrt(hs), masked keys set to the dtype's
                                       most negative finite value (B, nh, T, Tk)
blocks.{l}.attn.hook_pattern           softmax of the scores (B, nh, T, Tk)
blocks.{l}.attn.hook_z                 each head's output pattern @ v (B, T, nh, hs)
blocks.{l}.hook_attn_out               attention output after c_proj (B, T, C)
blocks.{l}.hook_resid_mid              residual stream after the attention add (B, T, C)
blocks.{l}.ln2.hook_normalized / out   as ln1, for ln_2 (B, T, C)
blocks.{l}.mlp.hook_pre / hook_post    MLP hidden before / after the GELU (B, T, F)
blocks.{l}.hook_mlp_out                MLP output (B, T, C)
blocks.{l}.hook_resid_post             residual stream leaving block l (B, T, C)
ln_final.hook_normalized / hook_out    as ln1, for ln_f (B, T, C)
=====================================  ==============================================

Masked scores: TransformerLens's bridge runs Hugging Face's eager attention, which fills
masked scores with the dtype's most negative finite value (``torch.finfo(dtype).min``), not
-inf; numgpt's hook point does the same, so the two are equal entry for entry.

Residual edits: an edit at ``hook_resid_pre``, ``hook_resid_mid`` or ``hook_resid_post`` is
the residual stream from there on, as in TransformerLens's ``HookedTransformer``. (Its 4.3
``TransformerBridge`` aliases ``hook_resid_mid`` to ``ln2.hook_in``, so an edit there reaches
only the MLP's input; tests/test_hooks.py shows both.)

Cost: the per-head points (scores, pattern, z) need the unfused attention chain
(``ops.attention_scores``, ``causal_mask``, ``softmax``, ``P @ V``), so a layer runs it
only when one of its per-head points has a hook; every other layer keeps the fused kernel.
A LayerNorm computes its ``hook_normalized`` only when that point has a hook, and then
forms its output from it (``normalized * gain + bias``, as TransformerLens does).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from ..errors import InputError

__all__ = ["HookFn", "Hook", "Hooks", "hook_names", "LAYER_POINTS", "GLOBAL_POINTS",
           "HEAD_POINTS", "READ_ONLY"]

HookFn = Callable[[np.ndarray, "Hook"], "np.ndarray | None"]

GLOBAL_POINTS = ("hook_embed", "hook_pos_embed")
LAYER_POINTS = (  # in the order the forward pass reaches them
    "hook_resid_pre", "ln1.hook_normalized", "ln1.hook_out",
    "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_cache_k", "attn.hook_cache_v",
    "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "hook_attn_out",
    "hook_resid_mid", "ln2.hook_normalized", "ln2.hook_out", "mlp.hook_pre", "mlp.hook_post",
    "hook_mlp_out", "hook_resid_post",
)
FINAL_POINTS = ("ln_final.hook_normalized", "ln_final.hook_out")
HEAD_POINTS = ("attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z")  # need the unfused chain
READ_ONLY = ("attn.hook_cache_k", "attn.hook_cache_v")  # views of the cache: read, never replace


def hook_names(n_layer: int) -> list[str]:
    """Every hook point of an ``n_layer`` model, in the order a forward pass reaches them."""
    return ([*GLOBAL_POINTS] + [f"blocks.{l}.{p}" for l in range(n_layer) for p in LAYER_POINTS]
            + [*FINAL_POINTS])


@dataclass(frozen=True)
class Hook:
    """What a hook function is told about the point it runs at (TransformerLens's
    ``HookPoint`` offers the same ``name`` and ``layer()``)."""

    name: str

    def layer(self) -> int | None:
        """The block index, or None for the embeddings and ln_final."""
        parts = self.name.split(".")
        return int(parts[1]) if parts[0] == "blocks" else None


class Hooks:
    """The hooks of one forward pass: ``[(name, fn), ...]`` checked against the model's names.

    ``name`` may also be a predicate ``name -> bool`` (TransformerLens's filter form), which
    attaches ``fn`` to every point it accepts. Several functions at one point run in the
    order given, each seeing the previous one's result.
    """

    def __init__(self, hooks: Iterable[tuple], n_layer: int):
        names = hook_names(n_layer)
        self.fns: dict[str, list[HookFn]] = {}
        for entry in hooks:
            if not (isinstance(entry, tuple) and len(entry) == 2 and callable(entry[1])):
                raise InputError(f"a hook must be a (name, fn) pair with fn(activation, hook), "
                                 f"got {entry!r}")
            name, fn = entry
            for n in _select(name, names, n_layer):
                self.fns.setdefault(n, []).append(fn)
        self.head_layers = {int(n.split(".")[1]) for n in self.fns
                            if n.startswith("blocks.") and n.split(".", 2)[2] in HEAD_POINTS}

    def wants(self, name: str) -> bool:
        return name in self.fns

    def __call__(self, name: str, activation: np.ndarray) -> np.ndarray:
        """Run the hooks at ``name`` on ``activation``; returns the (possibly new) activation."""
        for fn in self.fns.get(name, ()):
            out = fn(activation, Hook(name))
            if out is None or out is activation:
                continue
            if name.split(".", 2)[-1] in READ_ONLY:
                raise InputError(f"hook point {name} is read-only (a view of the KV cache); "
                                 f"replace blocks.{{l}}.attn.hook_k or hook_v instead")
            out = np.asarray(out)
            if out.shape != activation.shape:
                raise InputError(f"the hook at {name} returned shape {out.shape}; the activation "
                                 f"there is {activation.shape}, so return that shape (or None)")
            activation = out.astype(activation.dtype, copy=False)
        return activation


def _select(name, names: list[str], n_layer: int) -> list[str]:
    """The hook points ``name`` (a string or a predicate) selects; unknown names are refused
    with the closest known ones."""
    if callable(name):
        return [n for n in names if name(n)]
    if isinstance(name, str) and name in names:
        return [name]
    close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else \
        f"the names are {names[0]}, ..., {names[-1]} (numgpt.core.hooks.hook_names)"
    raise InputError(f"unknown hook point {name!r} for a {n_layer}-layer model; {hint}")
