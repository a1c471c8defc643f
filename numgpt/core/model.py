"""The GPT-2 model: the weight-tied ``GPT`` and the KV-cache inference path (its typed config,
``GPTConfig``, lives in ``core/config.py`` and is re-exported here).

Two ways through the same layers:

* ``model(idx, targets)`` -> ``(logits, loss)`` builds a graph for training and is the
  reference path (a full recompute of every position).
* ``model.forward_cached(idx, cache, rows)`` runs only the new tokens of each cache row,
  writes their keys/values into a preallocated ``KVCache`` (no concatenation per token)
  and returns logits for the positions asked for. Tests prove it equals the reference.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import ops
from ..errors import ConfigError, InputError
from .checks import check_token_ids
from .config import PRESETS, GPTConfig
from .kernels import ops_for
from .nn import Block, Embedding, LayerNorm, Module, dropout
from .quant import QuantizedEmbedding
from .tensor import Tensor, apply, no_grad

__all__ = ["GPTConfig", "GPT", "KVCache", "PRESETS", "Probe", "PROBE_POINTS"]

@dataclass
class KVCache:
    """Preallocated keys and values for ``slots`` independent sequences.

    k, v: (L, slots, nh, max_len, hs). ``lengths[s]`` is how many positions of slot s are
    filled; new tokens of a slot go to positions ``lengths[s]`` onward. Slots are
    independent, so a batch of prompts of different lengths (or requests joining a
    running batch) share one cache.
    """

    k: np.ndarray
    v: np.ndarray
    lengths: np.ndarray = field(default=None)  # (slots,) int

    @classmethod
    def allocate(cls, config: GPTConfig, slots: int = 1, max_len: int | None = None) -> "KVCache":
        max_len = config.block_size if max_len is None else max_len
        if not 1 <= max_len <= config.block_size:
            raise ConfigError(f"cache length must be in [1, {config.block_size}], got {max_len}")
        shape = (config.n_layer, slots, config.n_head, max_len, config.head_size)
        return cls(np.zeros(shape, config.np_dtype), np.zeros(shape, config.np_dtype),
                   np.zeros(slots, dtype=np.int64))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    def reset(self, rows=None) -> None:
        """Mark slots as empty (all when rows is None); the stale values are masked anyway."""
        self.lengths[slice(None) if rows is None else rows] = 0


# A probe sees ``probe(name, layer, array)`` for each name below, once per layer per call.
Probe = Callable[[str, int, np.ndarray], None]
PROBE_POINTS = {
    "ln_1": "ln_1 output (A, Tn, C)",
    "q": "queries of the new tokens after the head split (A, nh, Tn, hs)",
    "k": "keys of the new tokens after the head split (A, nh, Tn, hs)",
    "v": "values of the new tokens after the head split (A, nh, Tn, hs)",
    "cache_k": "this layer's cached keys after the write, positions [0, Tk) (A, nh, Tk, hs)",
    "cache_v": "this layer's cached values after the write (A, nh, Tk, hs)",
    "attn_out": "attention output after c_proj, before the residual add (A, Tn, C)",
    "mlp_out": "MLP output, before the residual add (A, Tn, C)",
    "block_out": "the block's output (the residual stream after it) (A, Tn, C)",
}


def _report(probe: Probe, layer: int, **arrays) -> None:
    """Hand each named intermediate (Tensor or ndarray) to the probe as an ndarray."""
    for name, value in arrays.items():
        probe(name, layer, value.data if isinstance(value, Tensor) else value)


def _check_rows(rows, n: int, slots: int) -> np.ndarray:
    """Cache slots for ``n`` rows of ids: default 0..n-1; distinct, in [0, slots); (n,) int64."""
    rows = np.arange(n) if rows is None else np.asarray(rows)
    if rows.shape != (n,) or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
        raise InputError(f"rows must be {n} integer slot numbers (one per row of ids), got {rows!r}")
    if n and (rows.min() < 0 or rows.max() >= slots or len(np.unique(rows)) != n):
        raise InputError(f"rows must be distinct slots in [0, {slots}), got {rows.tolist()}; "
                         f"allocate a cache with more slots or pass other rows")
    return rows.astype(np.int64, copy=False)


def _as_index(rows: np.ndarray):
    """A contiguous ascending run of slots becomes a slice, so cache reads are views, not copies."""
    if len(rows) and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
        return slice(int(rows[0]), int(rows[0]) + len(rows))
    return rows


class GPT(Module):
    """GPT-2: token + position embeddings, ``n_layer`` pre-LN blocks, final LayerNorm,
    and an output head tied to the token embedding (``logits = x @ wte^T``)."""

    def __init__(self, config: GPTConfig, seed: int | None = 0):
        self.config = config
        c, dt = config, config.np_dtype
        self.wte = Embedding(c.vocab_size, c.n_embd, dt, c.kernels)
        self.wpe = Embedding(c.block_size, c.n_embd, dt, c.kernels)
        self.h = [Block(c.n_embd, c.n_head, c.bias, c.activation, c.dropout, c.layer_norm_epsilon, dt,
                        c.kernels) for _ in range(c.n_layer)]
        self.ln_f = LayerNorm(c.n_embd, c.bias, c.layer_norm_epsilon, dt, c.kernels)
        self.ops = ops_for(c.kernels)
        self.tokenizer = None  # attached by the loaders
        if seed is not None:
            self.init_weights(np.random.default_rng(seed))

    def init_weights(self, rng: np.random.Generator) -> None:
        """GPT-2 init: N(0, 0.02) weights and embeddings, zero biases, unit LayerNorm gains,
        residual projections (``c_proj``) scaled to N(0, 0.02 / sqrt(2 n_layer))."""
        proj_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.parameters().items():
            if ".ln_" in name or name.startswith("ln_f"):
                p.data[...] = 1.0 if name.endswith("weight") else 0.0
            elif name.endswith("bias"):
                p.data[...] = 0.0
            else:
                std = proj_std if name.endswith("c_proj.weight") else 0.02
                p.data[...] = rng.normal(0.0, std, p.data.shape)

    # ------------------------------------------------------------------ training path
    def _check_ids(self, idx: np.ndarray, start: int | np.ndarray = 0) -> np.ndarray:
        """idx (B, T) as int64 after the shared id rule (``check_token_ids``); the context
        check counts the ``start`` positions a cache row already holds."""
        idx = np.asarray(idx)
        if idx.ndim != 2:
            raise InputError(f"token ids must be an integer array of shape (B, T), got {idx.dtype} {idx.shape}")
        idx = check_token_ids(idx, self.config.vocab_size)
        end = int(np.max(start)) + idx.shape[1]
        if end > self.config.block_size:
            raise InputError(f"sequence of {end} positions exceeds the context length "
                             f"block_size={self.config.block_size}")
        return idx

    def embed(self, idx: np.ndarray, positions: np.ndarray, rng=None) -> Tensor:
        """Token + position embeddings: idx (B, T), positions (B, T) or (T,) -> (B, T, C)."""
        x = self.wte(idx) + self.wpe(positions)
        return dropout(x, self.config.dropout, rng)

    def head(self, x: Tensor) -> Tensor:
        """Final LayerNorm then the tied head: (B, T, C) -> (B, T, V). A quantized table
        multiplies by its own q8_0 blocks (``core.quant``), inference only."""
        if isinstance(self.wte, QuantizedEmbedding):
            return self.wte.head(self.ln_f(x))
        return apply(self.ops.tied_head, self.ln_f(x), self.wte.weight)

    def forward(self, idx: np.ndarray, targets: np.ndarray | None = None,
                rng: np.random.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        """idx (B, T) int -> logits (B, T, V) and, with targets (B, T), the mean cross-entropy.

        Targets equal to -1 are ignored. Dropout is applied only when ``rng`` is given.
        """
        idx = self._check_ids(idx)
        x = self.embed(idx, np.arange(idx.shape[1]), rng)
        for block in self.h:
            x = block(x, rng)
        logits = self.head(x)
        loss = None
        if targets is not None:
            loss = apply(self.ops.cross_entropy, logits, targets=np.asarray(targets), ignore_index=-1)
        return logits, loss

    # ----------------------------------------------------------------- inference path
    def forward_cached(self, idx: np.ndarray, cache: KVCache, rows=None,
                       all_logits: bool = False, probe: Probe | None = None) -> np.ndarray:
        """Run new tokens through the model, reading and extending the KV cache.

        idx (A, Tn): Tn new tokens for each of A cache slots ``rows`` (default 0..A-1); row
        a continues from position ``cache.lengths[rows[a]]``. Returns logits (A, V) for the
        last new token of each row, or (A, Tn, V) with ``all_logits``. No graph is built.

        ``probe``, when given, is called as ``probe(name, layer, array)`` with the
        intermediates of every layer as this same code computes them (see ``PROBE_POINTS``);
        the arrays may be views into the cache, so a probe that keeps them must copy.
        ``numgpt.verify.trace`` records validation checkpoints this way. None (the default) costs
        one ``is None`` test per layer.
        """
        idx = self._check_ids(idx)  # shape and ids first, so a 1-D idx is not read as rows
        rows = _check_rows(rows, len(idx), cache.slots)
        start = cache.lengths[rows]  # (A,)
        idx = self._check_ids(idx, start)
        if int(np.max(start)) + idx.shape[1] > cache.max_len:
            raise InputError(f"cache holds {cache.max_len} positions; {int(np.max(start))} are used "
                             f"and {idx.shape[1]} more were given")
        positions = start[:, None] + np.arange(idx.shape[1])  # (A, Tn)
        with no_grad():
            x = self.embed(idx, positions)
            for layer, block in enumerate(self.h):
                a = block.attn
                h = block.ln_1(x)
                y = self._cached_attention(a.c_attn(h), cache, layer, rows, start, probe)  # (A, Tn, C)
                attn_out = a.c_proj(y)
                x = x + attn_out
                mlp_out = block.mlp(block.ln_2(x))
                x = x + mlp_out
                if probe is not None:
                    _report(probe, layer, ln_1=h, attn_out=attn_out, mlp_out=mlp_out, block_out=x)
            if not all_logits:
                x = x[:, -1]  # (A, C): logits only where they are needed
            logits = self.head(x).data
        cache.lengths[rows] = start + idx.shape[1]
        return logits

    def _cached_attention(self, qkv: Tensor, cache: KVCache, layer: int, rows: np.ndarray,
                          start: np.ndarray, probe: Probe | None = None) -> Tensor:
        """Write the new keys/values at each row's position, attend over the row's cache."""
        A, Tn, _ = qkv.shape
        q, k, v = ops.split_heads(qkv.data, self.config.n_head)  # views, (A, nh, Tn, hs)
        index = _as_index(rows)
        if Tn == 1:  # one token per row, rows may sit at different positions
            cache.k[layer, rows, :, start] = k[:, :, 0]  # (A, nh, hs)
            cache.v[layer, rows, :, start] = v[:, :, 0]
        else:
            for a in range(A):
                cache.k[layer, rows[a], :, start[a]:start[a] + Tn] = k[a]
                cache.v[layer, rows[a], :, start[a]:start[a] + Tn] = v[a]
        if probe is not None:
            Tk = int((start + Tn).max())
            _report(probe, layer, q=q, k=k, v=v, cache_k=cache.k[layer, index, :, :Tk],
                    cache_v=cache.v[layer, index, :, :Tk])  # (A, nh, Tk, hs)
        y = self.ops.cached_attention(qkv.data, cache.k, cache.v, layer=layer, rows=rows, start=start,
                                      n_head=self.config.n_head,
                                      block=self.h[layer].attn.attention_block)  # (A, Tn, C)
        return Tensor(y)

    def set_kernels(self, path: str) -> None:
        """Switch every layer to the op path ``path`` ("fast" or "reference") and record it in
        ``config.kernels``; the weights are unchanged."""
        self.config.kernels = path
        self.config.__post_init__()  # refuses an unknown path
        for module in self.modules():
            if hasattr(module, "ops"):
                module.ops = ops_for(path)

    def new_cache(self, slots: int = 1, max_len: int | None = None) -> KVCache:
        return KVCache.allocate(self.config, slots, max_len)
