"""Logit lens: what each layer would predict if the model stopped there.

The residual stream entering each block (``blocks.{l}.hook_resid_pre``) and leaving the last
one (``blocks.{L-1}.hook_resid_post``) is put through the final LayerNorm (its statistics
recomputed for that stream, as TransformerLens's ``accumulated_resid(apply_ln=True)`` with
``recompute_ln``) and the tied head. The last row is therefore the model's own prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core import ops
from ..core.checks import is_int
from ..errors import InputError
from ..core.tensor import Tensor, no_grad
from .common import prompt, token

__all__ = ["LogitLens", "logit_lens", "stream_names"]


def stream_names(n_layer: int) -> list[str]:
    """The L + 1 residual-stream points of the lens: each block's input, then the last output."""
    return [f"blocks.{l}.hook_resid_pre" for l in range(n_layer)] + [f"blocks.{n_layer - 1}.hook_resid_post"]


@dataclass(frozen=True)
class LogitLens:
    """layers: L + 1 labels; top_ids, top_probs (L + 1, T, k); target_probs (L + 1, T) or None."""

    ids: list[int]
    layers: list[str]
    top_ids: np.ndarray
    top_probs: np.ndarray
    target: int | None
    target_probs: np.ndarray | None

    def to_dict(self) -> dict:
        return {"ids": self.ids, "layers": self.layers, "top_ids": self.top_ids.tolist(),
                "top_probs": self.top_probs.tolist(), "target": self.target,
                "target_probs": None if self.target_probs is None else self.target_probs.tolist()}


def logit_lens(model, ids, target: int | None = None, k: int = 5) -> LogitLens:
    """Each layer's top-``k`` tokens (and ``target``'s probability) at every position of ids (T,)."""
    idx = prompt(model, ids)
    if target is not None:
        target = token(model, target, "the target token")
    if not is_int(k) or not 1 <= k <= model.config.vocab_size:
        raise InputError(f"k must be an integer in [1, {model.config.vocab_size}], got {k!r}")
    names = stream_names(model.config.n_layer)
    _, cache = model.run_with_cache(idx, names)
    tops, top_p, target_p = [], [], []
    with no_grad():
        for name in names:
            logits = model.head(Tensor(cache[name])).data[0]  # (T, V)
            probs = ops.softmax(logits.astype(np.float64))[0]  # (T, V)
            order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]  # (T, k)
            tops.append(order)
            top_p.append(np.take_along_axis(probs, order, axis=-1))
            if target is not None:
                target_p.append(probs[:, target])
    labels = [f"L{l} in" for l in range(model.config.n_layer)] + ["final"]
    return LogitLens([int(i) for i in idx[0]], labels, np.stack(tops), np.stack(top_p), target,
                     None if target is None else np.stack(target_p))
