"""Layers: ``Module`` and the GPT-2 building blocks, each a thin composition of ops.

Parameter names follow GPT-2 / Hugging Face so a checkpoint maps by name:
``wte.weight``, ``h.0.ln_1.weight``, ``h.0.attn.c_attn.weight``, ``h.0.mlp.c_proj.bias`` ...
A ``Linear`` weight is stored ``(in, out)`` and computes ``x @ W + b``.

Every ``forward`` takes and returns ``Tensor``s, so the same code trains (graph built)
and infers (inside ``no_grad``). Dropout is active only when a ``numpy.random.Generator``
is passed in; there is no hidden train/eval flag.

The layers with a fast-path kernel (LayerNorm, Embedding, the MLP's GELU, attention) take
``kernels``: ``"fast"`` (compiled kernels, ``core/kernels.py``) or ``"reference"`` (the
NumPy ops of ``core/ops.py``), held as ``self.ops``, the op namespace they call.
``GPTConfig.kernels`` passes it down; nothing else picks it.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from . import ops
from ..errors import ConfigError
from .kernels import _check_qkv, ops_for
from .tensor import Tensor, apply

__all__ = ["Parameter", "Module", "Linear", "LayerNorm", "Embedding", "MLP",
           "CausalSelfAttention", "Block", "dropout"]


class Parameter(Tensor):
    """A leaf tensor that requires a gradient; what ``Module.parameters()`` collects."""

    def __init__(self, data: np.ndarray):
        super().__init__(data, requires_grad=True)


class Module:
    """Base class: parameters and sub-modules are found from attributes, in definition order."""

    def named_children(self) -> Iterator[tuple[str, object]]:
        for name, value in vars(self).items():
            if isinstance(value, (Parameter, Module)):
                yield name, value
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, (Parameter, Module)):
                        yield f"{name}.{i}", item

    def modules(self) -> Iterator["Module"]:
        """This module and every sub-module, depth first."""
        yield self
        for _, child in self.named_children():
            if isinstance(child, Module):
                yield from child.modules()

    def parameters(self, prefix: str = "") -> dict[str, Parameter]:
        """Flat, namespaced ``{name: Parameter}``, e.g. ``h.0.attn.c_attn.weight``."""
        params: dict[str, Parameter] = {}
        for name, child in self.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, Parameter):
                params[full] = child
            else:
                params.update(child.parameters(prefix=f"{full}."))
        return params

    def zero_grad(self) -> None:
        for p in self.parameters().values():
            p.grad = None

    def num_parameters(self) -> int:
        return sum(p.data.size for p in self.parameters().values())

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError


def dropout(x: Tensor, p: float, rng: np.random.Generator | None) -> Tensor:
    """Inverted dropout when training (rng given and p > 0); the identity otherwise."""
    if p == 0.0 or rng is None:
        return x
    return apply(ops.dropout, x, p=p, rng=rng)


class Linear(Module):
    """``y = x @ W + b``: W (in, out), b (out,) or no bias."""

    def __init__(self, n_in: int, n_out: int, bias: bool = True, dtype=np.float32):
        self.weight = Parameter(np.zeros((n_in, n_out), dtype=dtype))
        self.bias = Parameter(np.zeros((n_out,), dtype=dtype)) if bias else None

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        return apply(ops.linear, x, self.weight, self.bias)


class LayerNorm(Module):
    """LayerNorm over the last axis with a learned gain and an optional bias."""

    def __init__(self, n: int, bias: bool = True, eps: float = 1e-5, dtype=np.float32,
                 kernels: str = "fast"):
        self.weight = Parameter(np.ones((n,), dtype=dtype))
        self.bias = Parameter(np.zeros((n,), dtype=dtype)) if bias else None
        self.eps = eps
        self.ops = ops_for(kernels)

    def forward(self, x: Tensor) -> Tensor:  # (..., C) -> (..., C)
        return apply(self.ops.layernorm, x, self.weight, self.bias, eps=self.eps)


class Embedding(Module):
    """Rows of a (num, dim) table looked up by integer ids."""

    def __init__(self, num: int, dim: int, dtype=np.float32, kernels: str = "fast"):
        self.weight = Parameter(np.zeros((num, dim), dtype=dtype))
        self.ops = ops_for(kernels)

    def forward(self, ids: np.ndarray) -> Tensor:  # (...) int -> (..., dim)
        return apply(self.ops.embedding, self.weight, ids=ids)


_ACTIVATIONS = ("gelu", "gelu_tanh")  # names of ops: the exact and the tanh GELU


class MLP(Module):
    """``c_proj(act(c_fc(x)))`` with a 4x hidden width; act is exact or tanh GELU."""

    def __init__(self, n_embd: int, bias: bool = True, activation: str = "gelu_tanh",
                 dropout: float = 0.0, dtype=np.float32, kernels: str = "fast"):
        if activation not in _ACTIVATIONS:
            raise ConfigError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.c_fc = Linear(n_embd, 4 * n_embd, bias, dtype)
        self.c_proj = Linear(4 * n_embd, n_embd, bias, dtype)
        self.activation = activation
        self.dropout = dropout
        self.ops = ops_for(kernels)

    def forward(self, x: Tensor, rng: np.random.Generator | None = None) -> Tensor:  # (B, T, C)
        h = apply(getattr(self.ops, self.activation), self.c_fc(x))  # (B, T, 4C)
        return dropout(self.c_proj(h), self.dropout, rng)  # (B, T, C)


class CausalSelfAttention(Module):
    """Multi-head causal self-attention with one fused QKV projection; heads batched, no loop.

    ``forward`` runs the training entry ``attention_training`` of its path when a graph is
    built, and the inference entry ``attention_inference`` when none is (under ``no_grad``:
    it keeps no (B, nh, T, T) probabilities for a backward that never comes; on the fast path
    a blocked online-softmax kernel that holds one (block, block) tile per thread). The
    KV-cache path (``GPT.forward_cached``) runs the inference entry itself.
    ``attention_block``: query rows per softmax block inside either entry (memory only;
    every block size computes the same math).
    """

    def __init__(self, n_embd: int, n_head: int, bias: bool = True, dropout: float = 0.0,
                 dtype=np.float32, attention_block: int = 128, kernels: str = "fast"):
        # shapes are validated once, by GPTConfig; a layer built by hand with n_embd not
        # divisible by n_head is refused (ShapeError) on forward, by either entry
        self.c_attn = Linear(n_embd, 3 * n_embd, bias, dtype)
        self.c_proj = Linear(n_embd, n_embd, bias, dtype)
        self.n_head = n_head
        self.dropout = dropout
        self.attention_block = attention_block
        self.ops = ops_for(kernels)

    def forward(self, x: Tensor, rng: np.random.Generator | None = None) -> Tensor:  # (B, T, C)
        qkv = self.c_attn(x)  # (B, T, 3C)
        if not qkv.requires_grad:  # no graph: no backward, so nothing (T, T) to keep
            _check_qkv(qkv.data, self.n_head, "attention")
            q, k, v = ops.split_heads(qkv.data, self.n_head)  # views, (B, nh, T, hs)
            y = Tensor(ops.merge_heads(self.ops.attention_inference(
                q, k, v, block=self.attention_block)))  # (B, nh, T, hs) -> (B, T, C)
        else:
            y = apply(self.ops.attention_training, qkv, n_head=self.n_head,
                      block=self.attention_block)  # (B, T, C)
        return dropout(self.c_proj(y), self.dropout, rng)


class Block(Module):
    """Pre-LN transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, n_embd: int, n_head: int, bias: bool = True, activation: str = "gelu_tanh",
                 dropout: float = 0.0, eps: float = 1e-5, dtype=np.float32, kernels: str = "fast"):
        self.ln_1 = LayerNorm(n_embd, bias, eps, dtype, kernels)
        self.attn = CausalSelfAttention(n_embd, n_head, bias, dropout, dtype, kernels=kernels)
        self.ln_2 = LayerNorm(n_embd, bias, eps, dtype, kernels)
        self.mlp = MLP(n_embd, bias, activation, dropout, dtype, kernels)

    def forward(self, x: Tensor, rng: np.random.Generator | None = None) -> Tensor:  # (B, T, C)
        x = x + self.attn(self.ln_1(x), rng)
        return x + self.mlp(self.ln_2(x), rng)
