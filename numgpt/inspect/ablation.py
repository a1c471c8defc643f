"""Ablation: how much the model needs each attention head and each MLP.

Replace one component's output and measure the change of a metric against the clean run:

* a head: its output ``blocks.{l}.attn.hook_z[..., h, :]`` (before ``c_proj`` mixes heads);
* an MLP: ``blocks.{l}.hook_mlp_out``;

by zero (``"zero"``) or by its mean over a reference batch (``"mean"``: the average over every
position of every reference prompt, one vector per head or MLP, so the prompts may have any
lengths). The metric is the mean next-token cross-entropy of the prompt (loss;
needs T >= 2), or with ``answer`` and ``wrong`` the logit difference at the last position.
Each layer's heads are ablated in one batched pass (row i ablates head i).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.checks import is_int, log_softmax64
from ..errors import InputError
from .common import Result, logit_diff, prompt, token

__all__ = ["Ablation", "ablate", "METHODS"]

METHODS = ("zero", "mean")


@dataclass(frozen=True)
class Ablation(Result):
    """heads (L, nh) and mlps (L,): metric after the ablation minus the clean metric."""

    ids: list[int]
    method: str
    metric: str
    clean: float
    heads: np.ndarray
    mlps: np.ndarray


def loss(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Mean next-token cross-entropy of each row, float64: logits (B, T, V), ids (1, T) -> (B,)."""
    logp = log_softmax64(logits[:, :-1])  # (B, T-1, V)
    targets = np.broadcast_to(ids[:, 1:], logp.shape[:2])  # (B, T-1)
    return -np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0].mean(axis=-1)


def _means(model, reference) -> dict[str, np.ndarray]:
    """Mean over every position of every reference prompt (prompts may differ in length) of
    each layer's hook_z (nh, hs) and hook_mlp_out (C,)."""
    rows = list(reference)
    if rows and is_int(rows[0]):  # one prompt given as a flat list of ids
        rows = [rows]
    if not rows:
        raise InputError("mean ablation needs at least one reference prompt")
    names = [f"blocks.{l}.{p}" for l in range(model.config.n_layer) for p in ("attn.hook_z", "hook_mlp_out")]
    sums: dict[str, np.ndarray] = {}
    count = 0
    for row in rows:
        _, cache = model.run_with_cache(prompt(model, row, "reference prompt"), names)
        for n, a in cache.items():
            sums[n] = sums.get(n, 0.0) + a[0].astype(np.float64).sum(axis=0)
        count += len(row)
    return {n: (s / count).astype(model.config.np_dtype) for n, s in sums.items()}


def ablate(model, ids, method: str = "zero", reference=None, answer: int | None = None,
           wrong: int | None = None) -> Ablation:
    """Ablate every head and MLP of the model in turn on ``ids``; see the module docstring."""
    idx = prompt(model, ids)
    if method not in METHODS:
        raise InputError(f"ablation method must be one of {list(METHODS)}, got {method!r}")
    if (answer is None) != (wrong is None):
        raise InputError("give both the answer and the wrong token (logit difference) or neither (loss)")
    if answer is None:
        if idx.shape[1] < 2:
            raise InputError("the loss needs a prompt of at least 2 tokens (it predicts each next token)")
        metric_name, metric = "loss", lambda logits: loss(logits, idx)
    else:
        answer, wrong = token(model, answer, "the answer token"), token(model, wrong, "the wrong token")
        metric_name, metric = "logit diff", lambda logits: logit_diff(logits, answer, wrong)
    if method == "mean" and reference is None:
        raise InputError("mean ablation needs a reference batch of prompts to average over")
    means = _means(model, reference) if method == "mean" else None
    c = model.config
    clean = float(metric(model.run_with_hooks(idx))[0])
    heads, mlps = np.zeros((c.n_layer, c.n_head)), np.zeros(c.n_layer)
    rows = np.arange(c.n_head)
    for l in range(c.n_layer):
        z_name, mlp_name = f"blocks.{l}.attn.hook_z", f"blocks.{l}.hook_mlp_out"
        z_value = 0.0 if means is None else means[z_name][None]  # (1, nh, hs): head h -> [:, h]

        def each_head(z, hook, value=z_value):  # row i loses head i at every position
            z[rows, :, rows] = value if np.isscalar(value) else value[0][:, None, :]

        def the_mlp(out, hook, value=0.0 if means is None else means[mlp_name]):
            out[...] = value
        heads[l] = metric(model.run_with_hooks(np.repeat(idx, c.n_head, axis=0),
                                               [(z_name, each_head)])) - clean
        mlps[l] = float(metric(model.run_with_hooks(idx, [(mlp_name, the_mlp)]))[0]) - clean
    return Ablation([int(i) for i in idx[0]], method, metric_name, clean, heads, mlps)
