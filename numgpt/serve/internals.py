"""What the model does with a short prompt: attention probabilities and residual-stream norms.

The playground page's "Inside the model" view (``POST /v1/internals``) shows, for a prompt
of at most ``MAX_TOKENS`` tokens, the attention probabilities of every head of one layer
and the norm of the residual stream at every position before the first block and after
each block. Nothing here is a second implementation of the model: one prompt pass goes
through ``GPT.forward_cached`` with a probe (the machinery ``numgpt trace`` records its
validation checkpoints with), and the probabilities come from the recorded queries and
cached keys through ``numgpt.verify.trace``'s own unfused attention (scores, causal mask,
softmax), so layer 0 here is exactly ``numgpt trace``'s checkpoint 4 (``step0/04_probs``).

Shapes: T prompt tokens, L layers, nh heads, hs head size, C embedding width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.tensor import no_grad
from ..errors import InputError
from ..verify import trace

__all__ = ["MAX_TOKENS", "Internals", "check_prompt", "inspect"]

MAX_TOKENS = 64  # a (T, T) map per head stays readable and the answer stays small


@dataclass(frozen=True)
class Internals:
    """One prompt pass, seen from inside.

    layer: the layer whose attention is given.
    attention: (nh, T, T) softmax probabilities of that layer; row i is query position i,
        column j key position j (0 for j > i, the future keys the mask hides).
    residual_norms: (L + 1, T) L2 norm over C of the residual stream at each position:
        row 0 the embeddings (token + position), row l + 1 the output of block l.
    """

    layer: int
    attention: np.ndarray
    residual_norms: np.ndarray


class _Probe:
    """Keeps one layer's queries and cached keys/values, and every block's output."""

    def __init__(self, layer: int):
        self.layer = layer
        self.attention: dict[str, np.ndarray] = {}  # q, cache_k, cache_v of ``layer``
        self.block_out: list[np.ndarray] = []  # (1, T, C) per layer

    def __call__(self, name: str, layer: int, array: np.ndarray) -> None:
        if layer == self.layer and name in ("q", "cache_k", "cache_v"):
            self.attention[name] = array.copy()  # the cache arrays are views; keep copies
        elif name == "block_out":
            self.block_out.append(array.copy())


def check_prompt(ids, block_size: int, max_tokens: int = MAX_TOKENS) -> list[int]:
    """The prompt ids if 1 <= T <= min(max_tokens, block_size), else InputError naming the limit."""
    limit = min(max_tokens, block_size)
    if not 1 <= len(ids) <= limit:
        raise InputError(f"the prompt has {len(ids)} tokens; the internals view takes 1 to "
                         f"{limit} tokens, so shorten the prompt")
    return [int(i) for i in ids]


def inspect(model, prompt_ids, layer: int = 0) -> Internals:
    """Run the prompt once and return ``layer``'s attention and the residual norms.

    model: a numgpt ``GPT`` (never modified: the pass uses a fresh one-slot cache, so it
    may run beside a serving engine on another thread); prompt_ids: 1-D ints.
    """
    c = model.config
    ids = check_prompt(prompt_ids, c.block_size)
    if not 0 <= layer < c.n_layer:
        raise InputError(f"layer {layer} does not exist; this model has layers 0 to {c.n_layer - 1}")
    idx = np.asarray([ids], dtype=np.int64)  # (1, T)
    probe = _Probe(layer)
    with no_grad():
        embeddings = model.embed(idx, np.arange(len(ids))).data  # (1, T, C): the stream entering block 0
        model.forward_cached(idx, model.new_cache(1, len(ids)), probe=probe)
    seen = probe.attention
    _, probs = trace._attention(seen["q"], seen["cache_k"], seen["cache_v"])  # (1, nh, T, T)
    stream = np.stack([embeddings] + probe.block_out)[:, 0]  # (L + 1, T, C)
    norms = np.linalg.norm(stream.astype(np.float64), axis=-1)  # (L + 1, T)
    return Internals(layer, probs[0], norms)
