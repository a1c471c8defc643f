"""Direct logit attribution: how much each head and MLP writes toward a token's logit.

The logit of token t at position p is ``LN_f(x) . e_t`` with x the final residual stream, a
sum of components (embeddings, each head's output through its slice of ``c_proj``, each
attention bias, each MLP's output). With the final LayerNorm's scale s (the standard
deviation of x at p) held fixed, as TransformerLens's ``stack_head_results(apply_ln=True)``
and ``logit_attrs`` do, the logit splits exactly into one term per component:

    attr(c) = ((c - mean(c)) / s) . (gamma * e_t)        plus   beta . e_t   (ln_f's bias)

gamma and beta are ln_f's gain and bias, e_t the token's row of the tied embedding; with
``contrast`` the direction is e_t - e_contrast. The terms sum to the logit (difference).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.nn import Parameter
from ..errors import InputError
from .common import Result, prompt, token

__all__ = ["Attribution", "attribute"]


@dataclass(frozen=True)
class Attribution(Result):
    """heads (L, nh), mlps (L,), attn_bias (L,), embed, pos_embed, ln_bias: each component's
    share of ``logit`` (the logit, or logit difference with ``contrast``) at ``position``."""

    ids: list[int]
    target: int
    contrast: int | None
    position: int
    heads: np.ndarray
    mlps: np.ndarray
    attn_bias: np.ndarray
    embed: float
    pos_embed: float
    ln_bias: float
    logit: float


def attribute(model, ids, target: int, position: int = -1, contrast: int | None = None) -> Attribution:
    """Direct logit attribution of ``target`` (minus ``contrast``) at ``position`` of ids."""
    idx = prompt(model, ids)
    T, c = idx.shape[1], model.config
    if not isinstance(position, int) or not -T <= position < T:
        raise InputError(f"position must be in [{-T}, {T}) for a {T}-token prompt, got {position!r}")
    p = position % T
    target = token(model, target, "the target token")
    contrast = None if contrast is None else token(model, contrast, "the contrast token")
    weights = [b.attn.c_proj.weight for b in model.h] + [model.wte.weight]
    if not all(isinstance(w, Parameter) for w in weights):
        raise InputError("attribution reads the float weights (c_proj, wte); load the float "
                         "checkpoint, not the quantized one")
    names = ["hook_embed", "hook_pos_embed", f"blocks.{c.n_layer - 1}.hook_resid_post"] + \
        [f"blocks.{l}.{n}" for l in range(c.n_layer) for n in ("attn.hook_z", "hook_mlp_out")]
    _, cache = model.run_with_cache(idx, names)
    final = cache[f"blocks.{c.n_layer - 1}.hook_resid_post"][0, p].astype(np.float64)  # (C,)
    centred = final - final.mean()
    scale = np.sqrt((centred * centred).mean() + model.ln_f.eps)  # frozen ln_f scale
    e = model.wte.weight.data.astype(np.float64)
    direction = e[target] - (0.0 if contrast is None else e[contrast])  # (C,)
    gamma = model.ln_f.weight.data.astype(np.float64)
    beta = 0.0 if model.ln_f.bias is None else model.ln_f.bias.data.astype(np.float64)
    through = gamma * direction / scale  # (C,)

    def attr(v: np.ndarray) -> np.ndarray:  # (..., C) -> (...)
        v = v.astype(np.float64)
        return (v - v.mean(axis=-1, keepdims=True)) @ through

    hs = c.n_embd // c.n_head
    heads, mlps, biases = np.zeros((c.n_layer, c.n_head)), np.zeros(c.n_layer), np.zeros(c.n_layer)
    for l, block in enumerate(model.h):
        z = cache[f"blocks.{l}.attn.hook_z"][0, p].astype(np.float64)  # (nh, hs)
        w_o = block.attn.c_proj.weight.data.astype(np.float64).reshape(c.n_head, hs, c.n_embd)
        heads[l] = attr(np.einsum("hd,hdc->hc", z, w_o))  # each head's write (nh, C)
        bias = block.attn.c_proj.bias
        biases[l] = 0.0 if bias is None else attr(bias.data)
        mlps[l] = attr(cache[f"blocks.{l}.hook_mlp_out"][0, p])
    embed, pos = attr(cache["hook_embed"][0, p]), attr(cache["hook_pos_embed"][0, p])
    ln_bias = float(np.dot(beta, direction)) if np.ndim(beta) else 0.0
    logit = float(heads.sum() + mlps.sum() + biases.sum() + embed + pos + ln_bias)
    return Attribution([int(i) for i in idx[0]], target, contrast, p, heads, mlps, biases,
                       float(embed), float(pos), ln_bias, logit)
