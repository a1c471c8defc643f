"""The GPT-2 model: the weight-tied ``GPT`` and the KV-cache inference path (its typed config,
``GPTConfig``, lives in ``core/config.py`` and is re-exported here).

Two ways through the same layers:

* ``model(idx, targets)`` -> ``(logits, loss)`` builds a graph for training and is the
  reference path (a full recompute of every position).
* ``model.forward_cached(idx, cache, rows)`` runs only the new tokens of each cache row,
  writes their keys/values into a preallocated ``KVCache`` (no concatenation per token)
  and returns logits for the positions asked for. Tests prove it equals the reference.

With hooks (``forward_cached(..., hooks=...)``, ``run_with_hooks``, ``run_with_cache``) the
cached pass goes through ``_hooked_layers``, where every named hook point of
``core/hooks.py`` sits; with none it is the fused pass and never enters that code.
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
from .hooks import Hooks
from .kernels import ops_for
from .nn import Block, Embedding, LayerNorm, Module, dropout
from .quant import QuantizedEmbedding, QuantizedLinear
from .quant import linear as quant_linear
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


# Each probe name is a hook point (core/hooks.py); True: heads axis first, as the probe shows it.
_PROBE_HOOKS = {"ln_1": ("ln1.hook_out", False), "q": ("attn.hook_q", True),
                "k": ("attn.hook_k", True), "v": ("attn.hook_v", True),
                "cache_k": ("attn.hook_cache_k", False), "cache_v": ("attn.hook_cache_v", False),
                "attn_out": ("hook_attn_out", False), "mlp_out": ("hook_mlp_out", False),
                "block_out": ("hook_resid_post", False)}


def _probe_hooks(probe: Probe, n_layer: int) -> Hooks:
    """The probe as hooks: ``probe(name, layer, array)`` at each of ``PROBE_POINTS``."""
    def report(name: str, heads: bool):
        def fn(activation, hook):
            probe(name, hook.layer(), activation.transpose(0, 2, 1, 3) if heads else activation)
        return fn
    return Hooks([(f"blocks.{layer}.{point}", report(name, heads)) for layer in range(n_layer)
                  for name, (point, heads) in _PROBE_HOOKS.items()], n_layer)


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


def _norm(ln: LayerNorm, x: np.ndarray) -> np.ndarray:
    """What ``ln(Tensor(x)).data`` computes, on the array: its path's layernorm op."""
    return ln.ops.layernorm(x, ln.weight.data, None if ln.bias is None else ln.bias.data,
                            eps=ln.eps)[0]


def _project(layer, x: np.ndarray) -> np.ndarray:
    """What ``layer(Tensor(x)).data`` computes for a ``Linear`` (``ops.linear``) or a
    ``QuantizedLinear`` (``quant.linear``), on the array: x (..., in) -> (..., out)."""
    bias = None if layer.bias is None else layer.bias.data
    if isinstance(layer, QuantizedLinear):
        return quant_linear(x, layer.weight, bias)
    return ops.linear(x, layer.weight.data, bias)[0]


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
        return self.unembed(self.ln_f(x))

    def unembed(self, h: Tensor) -> Tensor:
        """The tied head alone: (..., C) -> (..., V), ``h @ wte^T``."""
        if isinstance(self.wte, QuantizedEmbedding):
            return self.wte.head(h)
        return apply(self.ops.tied_head, h, self.wte.weight)

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
                       all_logits: bool = False, probe: Probe | None = None,
                       hooks: "Hooks | list | None" = None) -> np.ndarray:
        """Run new tokens through the model, reading and extending the KV cache.

        idx (A, Tn): Tn new tokens for each of A cache slots ``rows`` (default 0..A-1); row
        a continues from position ``cache.lengths[rows[a]]``. Returns logits (A, V) for the
        last new token of each row, or (A, Tn, V) with ``all_logits``. No graph is built.

        ``hooks`` (a ``core.hooks.Hooks`` or ``[(name, fn), ...]``) runs the pass through the
        named hook points (``_hooked_layers``); ``probe``, the older view of the same points,
        is called as ``probe(name, layer, array)`` (see ``PROBE_POINTS``); arrays handed out
        may be views into the cache, so a probe that keeps them must copy. With neither (the
        default) the pass is the fused fast path and never touches the hook machinery.
        """
        idx = self._check_ids(idx)  # shape and ids first, so a 1-D idx is not read as rows
        rows = _check_rows(rows, len(idx), cache.slots)
        start = cache.lengths[rows]  # (A,)
        idx = self._check_ids(idx, start)
        if int(np.max(start)) + idx.shape[1] > cache.max_len:
            raise InputError(f"cache holds {cache.max_len} positions; {int(np.max(start))} are used "
                             f"and {idx.shape[1]} more were given")
        if probe is not None and hooks is not None:
            raise InputError("forward_cached takes a probe or hooks, not both; pass the probe's "
                             "points as hooks (numgpt.core.hooks)")
        positions = start[:, None] + np.arange(idx.shape[1])  # (A, Tn)
        with no_grad():
            if hooks is None and probe is None:
                # the fused pass on arrays: the same ops in the same order as the layers' own
                # forwards (bit-identical logits), without a Tensor and an op wrapper per op:
                # a decode token is the matrix products plus this Python between them
                # (benchmarks/profile_decode.py's "rest" row)
                x = self.wte(idx).data + self.wpe(positions).data  # (A, Tn, C)
                for layer, block in enumerate(self.h):
                    a, mlp = block.attn, block.mlp
                    qkv = _project(a.c_attn, _norm(block.ln_1, x))  # (A, Tn, 3C)
                    self._write_cache(qkv, cache, layer, rows, start)
                    x = x + _project(a.c_proj, self._fused_attention(qkv, cache, layer, rows, start).data)
                    h = getattr(mlp.ops, mlp.activation)(_project(mlp.c_fc, _norm(block.ln_2, x)))[0]
                    x = x + _project(mlp.c_proj, h)  # (A, Tn, C)
                if not all_logits:
                    x = x[:, -1]  # (A, C): logits only where they are needed
                logits = self.head(Tensor(x)).data
            else:
                if not isinstance(hooks, Hooks):
                    hooks = Hooks(hooks, self.config.n_layer) if probe is None else \
                        _probe_hooks(probe, self.config.n_layer)
                logits = self._hooked_layers(idx, positions, cache, rows, start, all_logits, hooks)
        cache.lengths[rows] = start + idx.shape[1]
        return logits

    def forward_packed(self, segments, cache: KVCache, logits=None) -> list[np.ndarray | None]:
        """Several cache slots' new tokens of different lengths in one pass (the server's step:
        decode rows and prompt chunks together).

        segments [(slot, ids), ...]: ``ids`` (n,) new tokens of cache slot ``slot`` (distinct
        slots), continuing from position ``cache.lengths[slot]``. The segments are packed into
        N = sum(n) rows, so every linear layer, LayerNorm and MLP runs once on (1, N, C):
        each weight matrix is read once per call for all of them. Only the attention runs per
        group: the one-token segments together (the decode kernel, as ``forward_cached``'s
        decode step), each longer segment alone with its own length (the prompt kernel),
        each writing its keys and values at its own positions first.

        logits: one entry per segment, "last" (default), "all" or None -> a list holding
        (V,), (n, V) or None per segment: the head runs on the rows asked for only.
        Equals ``forward_cached`` of each segment alone to the rounding of the row count
        (tests/test_packed.py).
        """
        want = ["last"] * len(segments) if logits is None else list(logits)
        if len(want) != len(segments) or any(w not in ("last", "all", None) for w in want):
            raise InputError(f"logits must give 'last', 'all' or None for each of the "
                             f"{len(segments)} segments, got {logits!r}")
        if not segments:
            return []
        slots = _check_rows([s for s, _ in segments], len(segments), cache.slots)
        ids = [np.asarray(t) for _, t in segments]
        if any(t.ndim != 1 or t.size == 0 for t in ids):
            raise InputError("each segment needs a non-empty 1-D array of token ids")
        start = cache.lengths[slots].copy()  # (S,)
        sizes = np.asarray([t.size for t in ids])  # (S,)
        idx = check_token_ids(np.concatenate(ids)[None], self.config.vocab_size)  # (1, N)
        end = int(np.max(start + sizes))
        if end > min(cache.max_len, self.config.block_size):
            raise InputError(f"cache holds {cache.max_len} positions of a {self.config.block_size}-"
                             f"position context; a segment would end at {end}")
        offsets = np.concatenate([[0], np.cumsum(sizes)])  # (S + 1,)
        positions = np.concatenate([s + np.arange(n) for s, n in zip(start, sizes)])[None]  # (1, N)
        one = np.flatnonzero(sizes == 1)  # segments fed one token (decode rows)
        many = np.flatnonzero(sizes > 1)  # prompt chunks
        with no_grad():  # on arrays, the ops of forward_cached's fused pass in its order
            x = self.wte(idx).data[0] + self.wpe(positions).data[0]  # (N, C)
            for layer, block in enumerate(self.h):
                a, mlp = block.attn, block.mlp
                qkv = _project(a.c_attn, _norm(block.ln_1, x))  # (N, 3C)
                y = np.empty((qkv.shape[0], qkv.shape[1] // 3), qkv.dtype)  # (N, C)
                if one.size:
                    q1 = qkv[offsets[one]][:, None]  # (D, 1, 3C)
                    self._write_cache(q1, cache, layer, slots[one], start[one])
                    y[offsets[one]] = self._fused_attention(q1, cache, layer, slots[one],
                                                            start[one]).data[:, 0]  # (D, C)
                for s in many:
                    qs = qkv[None, offsets[s]:offsets[s + 1]]  # (1, n, 3C)
                    self._write_cache(qs, cache, layer, slots[s:s + 1], start[s:s + 1])
                    y[offsets[s]:offsets[s + 1]] = self._fused_attention(
                        qs, cache, layer, slots[s:s + 1], start[s:s + 1]).data[0]  # (n, C)
                x = x + _project(a.c_proj, y)
                h = getattr(mlp.ops, mlp.activation)(_project(mlp.c_fc, _norm(block.ln_2, x)))[0]
                x = x + _project(mlp.c_proj, h)  # (N, C)
            picked = [np.arange(offsets[s], offsets[s + 1]) if w == "all" else [offsets[s + 1] - 1]
                      for s, w in enumerate(want) if w is not None]
            out = self.head(Tensor(x[np.concatenate(picked)])).data if picked else None  # (M, V)
        cache.lengths[slots] = start + sizes
        result, at = [], 0
        for s, w in enumerate(want):
            if w is None:
                result.append(None)
                continue
            n = int(sizes[s]) if w == "all" else 1
            result.append(out[at:at + n] if w == "all" else out[at])
            at += n
        return result

    def _write_cache(self, qkv: np.ndarray, cache: KVCache, layer: int, rows: np.ndarray,
                     start: np.ndarray) -> None:
        """Write the new keys/values of qkv (A, Tn, 3C) at each row's position."""
        A, Tn, _ = qkv.shape
        _, k, v = ops.split_heads(qkv, self.config.n_head)  # views, (A, nh, Tn, hs)
        if Tn == 1:  # one token per row, rows may sit at different positions
            cache.k[layer, rows, :, start] = k[:, :, 0]  # (A, nh, hs)
            cache.v[layer, rows, :, start] = v[:, :, 0]
        else:
            for a in range(A):
                cache.k[layer, rows[a], :, start[a]:start[a] + Tn] = k[a]
                cache.v[layer, rows[a], :, start[a]:start[a] + Tn] = v[a]

    def _fused_attention(self, qkv: np.ndarray, cache: KVCache, layer: int, rows: np.ndarray,
                         start: np.ndarray) -> Tensor:
        """The inference entry over the row's cache (keys already written): (A, Tn, C)."""
        y = self.ops.cached_attention(qkv, cache.k, cache.v, layer=layer, rows=rows, start=start,
                                      n_head=self.config.n_head,
                                      block=self.h[layer].attn.attention_block)  # (A, Tn, C)
        return Tensor(y)

    # ------------------------------------------------------------------ hook points
    def _hooked_layers(self, idx: np.ndarray, positions: np.ndarray, cache: KVCache,
                       rows: np.ndarray, start: np.ndarray, all_logits: bool, hooks: Hooks) -> np.ndarray:
        """``forward_cached``'s pass with every hook point of ``core.hooks`` in its place.

        The one definition of where each named activation sits. Same layers and ops as the
        fused pass (bit-identical logits while no hook replaces anything), except where a
        point needs more: a layer with a per-head hook runs the unfused attention chain, a
        LayerNorm with a ``hook_normalized`` forms its output from the normalized array.
        """
        H = hooks
        x = H("hook_embed", self.wte(idx).data) + H("hook_pos_embed", self.wpe(positions).data)
        for layer, block in enumerate(self.h):
            p = f"blocks.{layer}."
            x = H(p + "hook_resid_pre", x)
            h = self._hooked_norm(block.ln_1, x, H, p + "ln1")
            qkv = block.attn.c_attn(Tensor(h)).data  # (A, Tn, 3C)
            y = self._hooked_attention(qkv, cache, layer, rows, start, H, p + "attn.")  # (A, Tn, C)
            attn_out = H(p + "hook_attn_out", block.attn.c_proj(Tensor(y)).data)
            x = H(p + "hook_resid_mid", x + attn_out)
            h = self._hooked_norm(block.ln_2, x, H, p + "ln2")
            mlp = block.mlp
            pre = H(p + "mlp.hook_pre", mlp.c_fc(Tensor(h)).data)  # (A, Tn, 4C)
            post = H(p + "mlp.hook_post", apply(getattr(mlp.ops, mlp.activation), Tensor(pre)).data)
            mlp_out = H(p + "hook_mlp_out", mlp.c_proj(Tensor(post)).data)
            x = H(p + "hook_resid_post", x + mlp_out)
        h = self._hooked_norm(self.ln_f, x, H, "ln_final")
        if not all_logits:
            h = h[:, -1]  # (A, C)
        return self.unembed(Tensor(h)).data

    @staticmethod
    def _hooked_norm(ln: LayerNorm, x: np.ndarray, H: Hooks, name: str) -> np.ndarray:
        """LayerNorm with ``{name}.hook_normalized`` ((x - mean) / sqrt(var + eps)) and
        ``{name}.hook_out``; the normalized array is formed only when hooked."""
        if H.wants(name + ".hook_normalized"):
            centred = x - x.mean(axis=-1, keepdims=True)
            scale = np.sqrt((centred * centred).mean(axis=-1, keepdims=True) + x.dtype.type(ln.eps))
            normalized = H(name + ".hook_normalized", centred / scale)
            out = normalized * ln.weight.data
            if ln.bias is not None:
                out = out + ln.bias.data
        else:
            out = ln(Tensor(x)).data
        return H(name + ".hook_out", out)

    def _hooked_attention(self, qkv: np.ndarray, cache: KVCache, layer: int, rows: np.ndarray,
                          start: np.ndarray, H: Hooks, p: str) -> np.ndarray:
        """Attention with hook points: q/k/v before the cache write, then the fused kernel,
        or the unfused chain when a per-head point of this layer is hooked. -> (A, Tn, C)."""
        q, k, v = ops.split_heads(qkv, self.config.n_head)  # views of qkv, (A, nh, Tn, hs)
        for name, view in (("hook_q", q), ("hook_k", k), ("hook_v", v)):
            seen = view.transpose(0, 2, 1, 3)  # (A, Tn, nh, hs), a view: in-place edits land in qkv
            new = H(p + name, seen)
            if new is not seen:
                seen[...] = new
        self._write_cache(qkv, cache, layer, rows, start)
        lengths = start + qkv.shape[1]  # (A,)
        Tk, index = int(lengths.max()), _as_index(rows)
        H(p + "hook_cache_k", cache.k[layer, index, :, :Tk])  # (A, nh, Tk, hs)
        H(p + "hook_cache_v", cache.v[layer, index, :, :Tk])
        if layer not in H.head_layers:
            return self._fused_attention(qkv, cache, layer, rows, start).data
        keys, values = cache.k[layer, index, :, :Tk], cache.v[layer, index, :, :Tk]
        same = bool(np.all(lengths == Tk))
        scores, _ = ops.attention_scores(q, keys)  # (A, nh, Tn, Tk)
        scores, _ = ops.causal_mask(scores, key_lengths=None if same else lengths,
                                    fill=np.finfo(scores.dtype).min)
        pattern, _ = ops.softmax(H(p + "hook_attn_scores", scores))
        pattern = H(p + "hook_pattern", pattern)
        z = H(p + "hook_z", (pattern @ values).transpose(0, 2, 1, 3))  # (A, nh, Tn, hs) -> (A, Tn, nh, hs)
        return z.reshape(*z.shape[:2], -1)  # (A, Tn, C), heads side by side

    def run_with_hooks(self, ids, hooks=()) -> np.ndarray:
        """One pass over ids (B, T) or (T,) from an empty cache with ``hooks`` =
        ``[(name, fn), ...]`` (see ``core.hooks``) -> logits (B, T, V)."""
        idx = np.asarray(ids)
        idx = idx[None] if idx.ndim == 1 else idx
        if idx.ndim != 2 or idx.shape[1] == 0:
            raise InputError(f"token ids must be a non-empty (B, T) or (T,) integer array, got "
                             f"shape {np.shape(ids)}")
        idx = check_token_ids(idx, self.config.vocab_size, self.config.block_size)  # before the cache
        return self.forward_cached(idx, self.new_cache(len(idx), idx.shape[1]), all_logits=True,
                                   hooks=Hooks(hooks, self.config.n_layer))

    def run_with_cache(self, ids, names=None, hooks=()) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``run_with_hooks`` that also keeps a copy of the activations at ``names`` (None:
        every hook point; a list of names; or a predicate name -> bool), after ``hooks`` ran
        -> (logits (B, T, V), {name: array})."""
        store: dict[str, np.ndarray] = {}

        def keep(activation, hook):
            store[hook.name] = activation.copy()
        chosen = [(lambda n: True, keep)] if names is None else (
            [(names, keep)] if callable(names) or isinstance(names, str) else [(n, keep) for n in names])
        logits = self.run_with_hooks(ids, [*hooks, *chosen])
        return logits, store

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
