"""Layers against PyTorch in float64: forward and every gradient (input and parameters).

Rung 3 of the verification ladder. Each numgpt layer gets a PyTorch twin holding the same
weights (``torch weight = our W.T`` for a ``Linear``, since numgpt stores ``(in, out)``);
attention's twin is written by hand from torch ops (fused c_attn, split, heads, causal
softmax, c_proj). Both run the same float64 input and back-propagate the same random
upstream gradient. Gate: forward ``max|ours - torch| < 1e-5``; every gradient
``max|ours - torch| / max(max|torch|, tiny) < 1e-4``. The table goes to
``docs/results/layer_parity.md``. Negative controls (LayerNorm with the unbiased variance,
attention without the ``1/sqrt(hs)`` scale) must fail the same comparison.

Also: ``Module.parameters()`` names and order (against Hugging Face's GPT-2 names) and
the 124M parameter count (against the closed-form count).
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

from numgpt.core import ops
from numgpt.core.model import GPT, GPTConfig
from numgpt.core.nn import MLP, Block, CausalSelfAttention, Embedding, LayerNorm, Linear, Module
from numgpt.core.tensor import Tensor, apply

torch = pytest.importorskip("torch")
F = torch.nn.functional

import results_table  # noqa: E402  (tests/results_table.py)

RESULTS = results_table.results_dir() / "layer_parity.md"  # docs/results/ under --write-results
FORWARD_TOL = 1e-5  # max abs diff
GRAD_TOL = 1e-4  # max rel diff
TINY = np.finfo(np.float64).tiny
B, T, C = 2, 7, 16  # batch, time, channels of every case
V = 11  # embedding rows; fewer than B*T ids, so ids repeat


# ----------------------------------------------------------------------------- twins

@dataclass
class Twin:
    """A numgpt layer, its torch reference, and where each of our parameters lives in torch.

    ``params`` maps our parameter name to ``(torch tensor, transposed)``; ``transposed``
    means torch stores it as our array's ``.T`` (a Linear weight).
    """

    ours: Module
    ref: Callable  # torch input -> torch output
    params: dict[str, tuple[object, bool]]
    T: int = T  # sequence length of the input


def _randomize(module: Module, rng: np.random.Generator) -> None:
    """Non-trivial weights everywhere: LayerNorm gains near 1, everything else N(0, 0.3^2)."""
    for name, p in module.parameters().items():
        if name.endswith("weight") and p.data.ndim == 1:
            p.data[...] = 1.0 + 0.2 * rng.standard_normal(p.data.shape)
        else:
            p.data[...] = 0.3 * rng.standard_normal(p.data.shape)


def _torch_param(array: np.ndarray, transposed: bool):
    data = torch.from_numpy(np.ascontiguousarray(array.T if transposed else array))
    return torch.nn.Parameter(data.clone())


def _twin_params(module: Module, prefix: str = "") -> dict[str, tuple[object, bool]]:
    """Torch copies of every parameter; 2-D weights of ``Linear``s are stored transposed."""
    out = {}
    for name, p in module.parameters().items():
        transposed = p.data.ndim == 2 and not isinstance(module, Embedding)
        out[prefix + name] = (_torch_param(p.data, transposed), transposed)
    return out


def _weight_bias(params, name: str):
    """Torch weight and bias (None when absent) of the layer ``name`` ("" for the root)."""
    key = lambda p: f"{name}.{p}" if name else p  # noqa: E731
    return params[key("weight")][0], params.get(key("bias"), (None,))[0]


def _torch_linear(params, name: str, x):  # (..., in) -> (..., out)
    weight, bias = _weight_bias(params, name)  # weight in torch layout (out, in)
    return F.linear(x, weight, bias)


def _torch_layernorm(params, name: str, x, eps: float):
    weight, bias = _weight_bias(params, name)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _torch_mlp(params, prefix: str, x, approximate: str):  # (B, T, C) -> (B, T, C)
    h = F.gelu(_torch_linear(params, f"{prefix}c_fc", x), approximate=approximate)  # (B, T, 4C)
    return _torch_linear(params, f"{prefix}c_proj", h)


def _torch_attention(params, prefix: str, x, n_head: int):
    """GPT-2 attention from torch ops: (B, T, C) -> (B, T, C)."""
    Bx, Tx, Cx = x.shape
    hs = Cx // n_head
    q, k, v = _torch_linear(params, f"{prefix}c_attn", x).split(Cx, dim=2)  # each (B, T, C)
    q = q.view(Bx, Tx, n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
    k = k.view(Bx, Tx, n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
    v = v.view(Bx, Tx, n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, hs) @ (B, nh, hs, T) -> (B, nh, T, T)
    causal = torch.tril(torch.ones(Tx, Tx, dtype=torch.bool))  # (T, T), key j <= query i
    att = torch.softmax(att.masked_fill(~causal, float("-inf")), dim=-1)
    y = att @ v  # (B, nh, T, T) @ (B, nh, T, hs) -> (B, nh, T, hs)
    y = y.transpose(1, 2).contiguous().view(Bx, Tx, Cx)  # merge heads -> (B, T, C)
    return _torch_linear(params, f"{prefix}c_proj", y)


def _twin(ours: Module, ref_of_params: Callable, seed: int, T: int = T) -> Twin:
    _randomize(ours, np.random.default_rng(seed))
    params = _twin_params(ours)
    return Twin(ours, lambda x: ref_of_params(params, x), params, T)


def linear_twin(bias: bool) -> Twin:
    return _twin(Linear(C, 3 * C, bias=bias, dtype=np.float64),
                 lambda p, x: _torch_linear(p, "", x).contiguous(), seed=1)


def layernorm_twin(bias: bool) -> Twin:
    return _twin(LayerNorm(C, bias=bias, eps=1e-5, dtype=np.float64),
                 lambda p, x: _torch_layernorm(p, "", x, 1e-5), seed=2)


def embedding_twin() -> Twin:
    return _twin(Embedding(V, C, dtype=np.float64),
                 lambda p, ids: F.embedding(ids, p["weight"][0]), seed=3)


def mlp_twin(activation: str) -> Twin:
    approximate = {"gelu": "none", "gelu_tanh": "tanh"}[activation]
    return _twin(MLP(C, bias=True, activation=activation, dtype=np.float64),
                 lambda p, x: _torch_mlp(p, "", x, approximate), seed=4)


def attention_twin(n_head: int, layer: type = CausalSelfAttention, T: int = T) -> Twin:
    return _twin(layer(C, n_head, bias=True, dtype=np.float64),
                 lambda p, x: _torch_attention(p, "", x, n_head), seed=5, T=T)


def block_twin(layer_norm: type = LayerNorm) -> Twin:
    n_head = 4

    def ref(p, x):  # pre-LN, two residuals
        x = x + _torch_attention(p, "attn.", _torch_layernorm(p, "ln_1", x, 1e-5), n_head)
        return x + _torch_mlp(p, "mlp.", _torch_layernorm(p, "ln_2", x, 1e-5), "tanh")
    block = Block(C, n_head, bias=True, activation="gelu_tanh", eps=1e-5, dtype=np.float64)
    block.ln_1 = layer_norm(C, bias=True, eps=1e-5, dtype=np.float64)
    return _twin(block, ref, seed=6)


# ------------------------------------------------------------------------- comparison

@dataclass
class Row:
    layer: str
    quantity: str
    abs_diff: float
    rel_diff: float
    kind: str  # "forward" (abs gate) or "grad" (rel gate)

    @property
    def tol(self) -> float:
        return FORWARD_TOL if self.kind == "forward" else GRAD_TOL

    @property
    def passed(self) -> bool:
        return (self.abs_diff if self.kind == "forward" else self.rel_diff) < self.tol


def _diff(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """max|a - b| and max|a - b| / max(max|b|, tiny) (a relative error of the whole array)."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    d = float(np.max(np.abs(ours - ref)))
    return d, d / max(float(np.max(np.abs(ref))), TINY)


def compare(layer: str, twin: Twin, seed: int = 0) -> list[Row]:
    """Forward and every gradient of ``twin.ours`` against ``twin.ref`` on one input."""
    rng = np.random.default_rng(seed)
    if isinstance(twin.ours, Embedding):
        ids = np.array([[1, 3, 1, 0, 10, 3, 3], [3, 3, 2, 1, 0, 0, 7]])  # (B, T), repeats
        out = twin.ours(ids)
        ref = twin.ref(torch.from_numpy(ids))
        x = xt = None
    else:
        x = Tensor(rng.standard_normal((B, twin.T, C)), requires_grad=True)  # (B, T, C)
        xt = torch.from_numpy(x.data.copy()).requires_grad_(True)
        out, ref = twin.ours(x), twin.ref(xt)
    g = rng.standard_normal(out.shape)  # upstream gradient, same for both
    out.backward(g)
    ref.backward(torch.from_numpy(g))
    rows = [Row(layer, "forward", *_diff(out.data, ref.detach().numpy()), "forward")]
    if x is not None:
        rows.append(Row(layer, "d input", *_diff(x.grad, xt.grad.numpy()), "grad"))
    for name, p in twin.ours.parameters().items():
        tp, transposed = twin.params[name]
        tg = tp.grad.numpy()
        rows.append(Row(layer, f"d {name}", *_diff(p.grad, tg.T if transposed else tg), "grad"))
    return rows


CASES: dict[str, Callable[[], Twin]] = {
    "Linear (bias)": lambda: linear_twin(True),
    "Linear (no bias)": lambda: linear_twin(False),
    "LayerNorm (bias)": lambda: layernorm_twin(True),
    "LayerNorm (no bias)": lambda: layernorm_twin(False),
    "Embedding (repeated ids)": embedding_twin,
    "MLP (gelu, exact erf)": lambda: mlp_twin("gelu"),
    "MLP (gelu_tanh)": lambda: mlp_twin("gelu_tanh"),
    "CausalSelfAttention (1 head)": lambda: attention_twin(1),
    "CausalSelfAttention (4 heads)": lambda: attention_twin(4),
    # longer than the default block (128 query rows): the training entry runs two blocks
    "CausalSelfAttention (4 heads, T=161, blocked)": lambda: attention_twin(4, T=161),
    "Block (pre-LN, 4 heads)": block_twin,
}


def _write_table(rows: list[Row]) -> None:
    lines = ["# Layer parity: numgpt vs PyTorch (float64)", "",
             "Generated by `tests/test_nn.py`; do not edit by hand. Each layer and its PyTorch "
             "twin (same weights; a `Linear` weight is our `W.T` in torch; attention written by "
             "hand from torch ops) run the same input "
             f"(B={B}, T={T} unless the layer says otherwise, C={C}) and back-propagate the same random upstream gradient. "
             f"Gates: forward max abs diff < {FORWARD_TOL:g}; every gradient max rel diff "
             f"< {GRAD_TOL:g}, where rel = max|ours - torch| / max(max|torch|, tiny).", "",
             "| layer | quantity | max abs diff | max rel diff | tolerance | pass |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        tol = f"abs < {r.tol:g}" if r.kind == "forward" else f"rel < {r.tol:g}"
        lines.append(f"| {r.layer} | {r.quantity} | {r.abs_diff:.3e} | {r.rel_diff:.3e} | {tol} | "
                     f"{'yes' if r.passed else 'NO'} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=RESULTS.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, RESULTS)


@pytest.fixture(scope="module")
def parity() -> dict[str, list[Row]]:
    """Every case compared once; writes docs/results/layer_parity.md."""
    results = {layer: compare(layer, make()) for layer, make in CASES.items()}
    _write_table([r for rows in results.values() for r in rows])
    return results


@pytest.mark.parametrize("layer", list(CASES))
def test_layer_matches_torch_forward_and_every_gradient(parity, layer):
    rows = parity[layer]
    n_params = len(CASES[layer]().ours.parameters())
    has_input = not layer.startswith("Embedding")
    assert len(rows) == 1 + has_input + n_params  # forward, d input, one per parameter
    failed = [(r.quantity, r.abs_diff, r.rel_diff) for r in rows if not r.passed]
    assert not failed, f"{layer}: {failed}"


def test_float64_parity_is_at_round_off(parity):
    # the gates are loose on purpose; in float64 the two libraries should agree to ~1e-12
    worst = max(r.rel_diff for rows in parity.values() for r in rows)
    assert worst < 1e-11, worst


# ------------------------------------------------------------------- negative controls

class UnbiasedLayerNorm(LayerNorm):
    """WRONG on purpose: normalises by the unbiased variance (divide by C - 1, not C).

    (x - mu) / sqrt(var * C/(C-1) + eps) = sqrt((C-1)/C) * (x - mu) / sqrt(var + eps (C-1)/C),
    so it is the right op with a shrunk gain and epsilon.
    """

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[-1]
        shrink = Tensor(np.asarray(math.sqrt((n - 1) / n), dtype=x.dtype))
        return apply(ops.layernorm, x, self.weight * shrink, self.bias, eps=self.eps * (n - 1) / n)


class UnscaledAttention(CausalSelfAttention):
    """WRONG on purpose: scores Q K^T without the 1/sqrt(hs) (q pre-multiplied by sqrt(hs))."""

    def forward(self, x: Tensor, rng=None) -> Tensor:
        Bx, Tx, Cx = x.shape
        nh, hs = self.n_head, Cx // self.n_head
        heads = self.c_attn(x).reshape(Bx, Tx, 3, nh, hs).transpose(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        q, k, v = heads[0], heads[1], heads[2]
        q = apply(ops.scale, q, c=math.sqrt(hs))
        y = apply(ops.attention_reference, q, k, v).transpose(0, 2, 1, 3).reshape(Bx, Tx, Cx)  # (B, T, C)
        return self.c_proj(y)


@pytest.mark.parametrize("layer, make", [
    ("LayerNorm with unbiased variance", lambda: _twin(UnbiasedLayerNorm(C, True, 1e-5, np.float64),
        lambda p, x: _torch_layernorm(p, "", x, 1e-5), seed=2)),
    ("attention without 1/sqrt(hs)", lambda: attention_twin(4, UnscaledAttention)),
    ("block with unbiased ln_1", lambda: block_twin(UnbiasedLayerNorm)),
])
def test_negative_control_wrong_layer_fails_parity(layer, make):
    rows = {r.quantity: r for r in compare(layer, make())}
    assert not rows["forward"].passed, f"{layer}: forward diff {rows['forward'].abs_diff:.3e} passed"
    assert not rows["d input"].passed, f"{layer}: input gradient diff {rows['d input'].rel_diff:.3e} passed"


def test_comparison_catches_a_transposed_weight():
    # the layout convention itself: torch given our W (not W.T) must fail
    twin = linear_twin(True)
    square = Linear(C, C, bias=True, dtype=np.float64)
    _randomize(square, np.random.default_rng(9))
    params = _twin_params(square)
    params["weight"] = (_torch_param(square.weight.data, transposed=False), True)
    bad = Twin(square, lambda x: F.linear(x, params["weight"][0], params["bias"][0]), params)
    assert not compare("Linear with W not W.T", bad)[0].passed
    assert compare("Linear", twin)[0].passed


# ------------------------------------------------- the attention entries vs torch

def _torch_masked_attention(q, k, v, key_lengths):
    """softmax(Q K^T / sqrt(hs) masked) V in torch; query i of row b sees keys
    j <= key_lengths[b] - Tq + i."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    position = torch.as_tensor(key_lengths).view(-1, 1, 1, 1) - Tq + torch.arange(Tq).view(1, 1, Tq, 1)
    visible = torch.arange(Tk).view(1, 1, 1, Tk) <= position  # (B, 1, Tq, Tk)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, nh, Tq, Tk)
    return torch.softmax(att.masked_fill(~visible, float("-inf")), dim=-1) @ v  # (B, nh, Tq, hs)


def _attention_vs_torch(block, torch_lengths, Tq=37, Tk=45) -> tuple[float, float]:
    """Max abs forward diff and max rel gradient diff of the training kernel
    ``ops.attention(q, k, v, block)`` (inside ``ops.attention_training``) vs torch."""
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((3, 2, T_, 8)) for T_ in (Tq, Tk, Tk))  # (B, nh, T, hs)
    out, backward = ops.attention(q, k, v, block)
    g = rng.standard_normal(out.shape)
    tq, tk, tv = (torch.from_numpy(a.copy()).requires_grad_(True) for a in (q, k, v))
    ref = _torch_masked_attention(tq, tk, tv, torch_lengths)
    ref.backward(torch.from_numpy(g))
    rel = max(_diff(ours, t.grad.numpy())[1] for ours, t in zip(backward(g), (tq, tk, tv)))
    return _diff(out, ref.detach().numpy())[0], rel


@pytest.mark.parametrize("block", [1, 5, 16, 37, 64])  # 37 and 64: one block for all queries
def test_training_attention_matches_torch_with_any_block_size(block):
    fwd, rel = _attention_vs_torch(block, np.array([45, 45, 45]))
    assert fwd < 1e-12 and rel < 1e-12, (fwd, rel)


@pytest.mark.parametrize("block", [1, 5, 16, 37, 64])
@pytest.mark.parametrize("key_lengths", [None, [45, 37, 40]], ids=["cache full", "rows at 45/37/40 keys"])
def test_inference_attention_matches_torch_with_any_block_size(block, key_lengths):
    lengths = np.array([45, 45, 45]) if key_lengths is None else np.array(key_lengths)
    rng = np.random.default_rng(12)
    q, k, v = (rng.standard_normal((3, 2, T_, 8)) for T_ in (37, 45, 45))  # (B, nh, T, hs)
    out = ops.attention_inference(q, k, v, key_lengths=None if key_lengths is None else lengths, block=block)
    with torch.no_grad():
        ref = _torch_masked_attention(*(torch.from_numpy(a) for a in (q, k, v)), lengths).numpy()
    assert _diff(out, ref)[0] < 1e-12
    off_by_one = np.where(lengths > 37, lengths - 1, lengths + 1)  # the negative control
    shifted = ops.attention_inference(q, k, v, key_lengths=off_by_one, block=block)
    assert _diff(shifted, ref)[0] > FORWARD_TOL


def test_negative_control_training_attention_one_key_off_fails():
    # the same comparison with torch's mask one position on (each row sees one key more)
    fwd, rel = _attention_vs_torch(16, np.array([46, 46, 46]))
    assert fwd > FORWARD_TOL and rel > GRAD_TOL, (fwd, rel)


def test_block_is_an_explicit_argument_and_never_changes_the_result():
    """Blocking bounds memory inside an entry; every block size gives the one-block result
    (float32 in, float32 out, to float32 round-off) and a bad block size is refused."""
    rng = np.random.default_rng(3)
    qkv = rng.standard_normal((2, 40, 3 * 16)).astype(np.float32)  # (B, T, 3C), nh = 2
    whole, whole_bw = ops.attention_training(qkv, n_head=2, block=40)
    g = rng.standard_normal(whole.shape).astype(np.float32)
    q, k, v = ops.split_heads(qkv, 2)
    one_block = ops.attention_inference(q, k, v, block=40)
    for block in (1, 7, 16):
        blocked, blocked_bw = ops.attention_training(qkv, n_head=2, block=block)
        assert blocked.dtype == np.float32 and blocked_bw(g)[0].dtype == np.float32
        assert np.max(np.abs(blocked - whole)) < 1e-6
        assert np.max(np.abs(blocked_bw(g)[0] - whole_bw(g)[0])) < 1e-5
        inference = ops.attention_inference(q, k, v, block=block)
        assert inference.dtype == np.float32 and np.max(np.abs(inference - one_block)) < 1e-6
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="block"):
            ops.attention_training(qkv, n_head=2, block=bad)
        with pytest.raises(ValueError, match="block"):
            ops.attention_inference(q, k, v, block=bad)


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_layer_forward_calls_the_training_entry_with_a_graph_and_the_inference_entry_without(monkeypatch, path):
    from numgpt.core import kernels
    from numgpt.core.tensor import no_grad

    layer = CausalSelfAttention(C, 4, dtype=np.float64, kernels=path)
    _randomize(layer, np.random.default_rng(4))
    x = Tensor(np.random.default_rng(5).standard_normal((2, 9, C)), requires_grad=True)
    graph = layer(x)
    assert graph.requires_grad
    used = []
    for name in ("attention_training", "attention_inference", "attention_reference"):
        # where the path's entry lives: the kernel when the fast path has one, else the op
        module = kernels if path == "fast" and name in kernels.FAST_OPS else ops
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=real, _n=name, **kw: used.append(_n) or _f(*a, **kw))
    with no_grad():
        plain = layer(x)
    assert not plain.requires_grad and plain.parents == ()
    # no graph, no backward: the inference entry, which keeps nothing (B, nh, T, T)
    assert used == ["attention_inference"]
    assert np.max(np.abs(plain.data - graph.data)) < 1e-12  # same math, other summation order
