"""The GPT-2 model: a typed config, the weight-tied ``GPT``, and the KV-cache inference path.

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
from .nn import Block, Embedding, LayerNorm, Module, dropout
from .tensor import Tensor, apply, no_grad

__all__ = ["GPTConfig", "GPT", "KVCache", "PRESETS", "Probe", "PROBE_POINTS"]

_DTYPES = {"float32": np.float32, "float64": np.float64}
_FIELD_TYPES = {"int": int, "bool": bool, "float": float, "str": str}  # annotations are strings here


@dataclass
class GPTConfig:
    """Shape and numerics of a GPT-2 model. Unknown keys and impossible values are refused.

    The one place model shapes are validated (``_check_shapes``); a new field needs only its
    annotation and default, plus a line in ``_check_numerics`` if some values are impossible.
    """

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    bias: bool = True
    dropout: float = 0.0
    activation: str = "gelu_tanh"  # GPT-2's gelu_new; "gelu" is the exact erf form (nanoGPT)
    layer_norm_epsilon: float = 1e-5
    dtype: str = "float32"

    def __post_init__(self) -> None:
        self._check_types()
        self._check_shapes()
        self._check_numerics()

    def _check_types(self) -> None:
        """Each field holds its annotated type (ints widen to float); a field whose annotation
        is not a plain int/bool/float/str checks its own values in ``_check_numerics``."""
        for f in dataclasses.fields(self):
            want = _FIELD_TYPES.get(f.type)
            if want is None:
                continue
            value = getattr(self, f.name)
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise ConfigError(f"config key {f.name!r} must be {f.type}, got {value!r} "
                                  f"({type(value).__name__})")

    def _check_shapes(self) -> None:
        """The model's shapes: the one place they are validated (layers and TrainConfig rely on it)."""
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key {name!r} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    def _check_numerics(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.activation not in ("gelu", "gelu_tanh"):
            raise ConfigError(f"activation must be 'gelu' or 'gelu_tanh', got {self.activation!r}")
        if not self.layer_norm_epsilon > 0:
            raise ConfigError(f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")

    @property
    def np_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` of every parameter ``GPT(self)`` would allocate, in its order,
        computed without allocating (loads and training check sizes against it first).
        Linear weights are ``(in, out)``; the output head is tied to ``wte``."""
        C, bias = self.n_embd, self.bias
        shapes: dict[str, tuple[int, ...]] = {"wte.weight": (self.vocab_size, C),
                                              "wpe.weight": (self.block_size, C)}

        def add(name: str, weight: tuple[int, ...], width: int) -> None:
            shapes[name + ".weight"] = weight
            if bias:
                shapes[name + ".bias"] = (width,)

        for i in range(self.n_layer):
            add(f"h.{i}.ln_1", (C,), C)
            add(f"h.{i}.attn.c_attn", (C, 3 * C), 3 * C)
            add(f"h.{i}.attn.c_proj", (C, C), C)
            add(f"h.{i}.ln_2", (C,), C)
            add(f"h.{i}.mlp.c_fc", (C, 4 * C), 4 * C)
            add(f"h.{i}.mlp.c_proj", (4 * C, C), C)
        add("ln_f", (C,), C)
        return shapes

    def parameter_count(self) -> int:
        """Parameters ``GPT(self)`` holds (the tied head counted once), by arithmetic alone,
        so that absurd sizes (n_layer 100000) are counted without building 100000 layers."""
        C, L, bias = self.n_embd, self.n_layer, int(self.bias)
        per_layer = 12 * C * C + 2 * C + bias * 11 * C  # weights, LayerNorm gains, biases
        return (self.vocab_size + self.block_size) * C + L * per_layer + C + bias * C

    def parameter_bytes(self) -> int:
        """Memory the parameters take in this config's dtype."""
        return self.parameter_count() * np.dtype(self.np_dtype).itemsize

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


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
        self.wte = Embedding(c.vocab_size, c.n_embd, dt)
        self.wpe = Embedding(c.block_size, c.n_embd, dt)
        self.h = [Block(c.n_embd, c.n_head, c.bias, c.activation, c.dropout, c.layer_norm_epsilon, dt)
                  for _ in range(c.n_layer)]
        self.ln_f = LayerNorm(c.n_embd, c.bias, c.layer_norm_epsilon, dt)
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
        """Final LayerNorm then the tied head: (B, T, C) -> (B, T, V)."""
        return apply(ops.tied_head, self.ln_f(x), self.wte.weight)

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
            loss = apply(ops.cross_entropy, logits, targets=np.asarray(targets), ignore_index=-1)
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
        lengths = start + Tn
        Tk = int(lengths.max())
        keys = cache.k[layer, index, :, :Tk]  # (A, nh, Tk, hs)
        values = cache.v[layer, index, :, :Tk]
        if probe is not None:
            _report(probe, layer, q=q, k=k, v=v, cache_k=keys, cache_v=values)
        same = bool(np.all(lengths == Tk))
        y = ops.attention_inference(q, keys, values, key_lengths=None if same else lengths,
                                    block=self.h[layer].attn.attention_block)  # (A, nh, Tn, hs)
        return Tensor(ops.merge_heads(y))  # (A, Tn, C)

    def new_cache(self, slots: int = 1, max_len: int | None = None) -> KVCache:
        return KVCache.allocate(self.config, slots, max_len)
