"""The gradient-check gate: every op's hand-derived backward against central differences.

For an op ``y = f(x_1, ..., x_n)`` and a fixed random upstream gradient ``g`` (same shape
as y) the scalar ``L = sum(g * y)`` has ``dL/dx_i = backward(g)[i]``. The gate perturbs
each element of each input by +-eps (float64, eps 1e-6) and compares the central
difference ``(L(x+eps) - L(x-eps)) / 2 eps`` with the analytic value. An element passes
when ``|a - n| < 1e-7`` or ``|a - n| / max(|a|, |n|) < 1e-5``.

Composites (multi-head attention, a pre-LN block, a tiny weight-tied GPT) are checked the
same way through the ``Tensor`` engine, one check per parameter tensor.

A negative control, an embedding whose backward writes ``dW[ids] += dY`` (dropping all but
one update of a repeated id), must FAIL the gate by an order-one error; if it passes, the
gate is not able to see wrong math and the whole run fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..core import ops

__all__ = ["CheckResult", "check_function", "check_op", "op_cases", "run_gate", "write_table",
           "wrong_embedding", "ABS_TOL", "REL_TOL", "EPS"]

EPS = 1e-6
ABS_TOL = 1e-7
REL_TOL = 1e-5


@dataclass
class CheckResult:
    name: str
    input: str
    shape: tuple[int, ...]
    max_abs_err: float
    max_rel_err: float
    passed: bool
    expect_fail: bool = False

    @property
    def ok(self) -> bool:
        """A check is as expected: passed, or (negative control) failed."""
        return self.passed != self.expect_fail


def _elementwise_pass(analytic: np.ndarray, numeric: np.ndarray) -> tuple[float, float, bool]:
    abs_err = np.abs(analytic - numeric)
    denom = np.maximum(np.abs(analytic), np.abs(numeric))
    rel_err = np.where(denom > 0, abs_err / np.where(denom > 0, denom, 1.0), 0.0)
    ok = (abs_err < ABS_TOL) | (rel_err < REL_TOL)
    return float(abs_err.max(initial=0.0)), float(rel_err.max(initial=0.0)), bool(ok.all())


def _weighted_sum(out: np.ndarray, upstream: np.ndarray) -> float:
    """sum(g * y), skipping entries a mask set to -inf (their gradient is 0 by definition)."""
    finite = np.isfinite(out)
    return float(np.sum(np.where(finite, out, 0.0) * upstream))


def check_function(name: str, loss: Callable[[], float], analytic: Sequence[np.ndarray],
                   inputs: Sequence[np.ndarray], input_names: Sequence[str],
                   expect_fail: bool = False) -> list[CheckResult]:
    """Compare ``analytic[i]`` with the central difference of ``loss()`` in ``inputs[i]``.

    ``inputs`` are perturbed in place (and restored); ``loss`` must read them.
    """
    results = []
    for x, grad, label in zip(inputs, analytic, input_names):
        numeric = np.zeros_like(x)
        flat, nflat = x.reshape(-1), numeric.reshape(-1)
        assert flat.base is x or flat is x or np.shares_memory(flat, x)
        for j in range(flat.size):
            orig = flat[j]
            flat[j] = orig + EPS
            up = loss()
            flat[j] = orig - EPS
            down = loss()
            flat[j] = orig
            nflat[j] = (up - down) / (2 * EPS)
        max_abs, max_rel, ok = _elementwise_pass(grad, numeric)
        results.append(CheckResult(name, label, x.shape, max_abs, max_rel, ok, expect_fail))
    return results


def check_op(name: str, op: Callable, inputs: Sequence[np.ndarray | None], consts: dict | None = None,
             rng: np.random.Generator | None = None, expect_fail: bool = False,
             input_names: Sequence[str] | None = None) -> list[CheckResult]:
    """Gradient-check every non-None input of ``op(*inputs, **consts)``."""
    consts = consts or {}
    rng = rng or np.random.default_rng(0)
    out, backward = op(*inputs, **consts)
    upstream = rng.standard_normal(np.shape(out))
    upstream = np.where(np.isfinite(out), upstream, 0.0)
    grads = backward(np.asarray(upstream, dtype=np.float64))
    names = input_names or [f"x{i}" for i in range(len(inputs))]
    present = [i for i, x in enumerate(inputs) if x is not None]
    for i in present:
        if grads[i].shape != inputs[i].shape:
            raise AssertionError(f"{name}: gradient of {names[i]} has shape {grads[i].shape}, "
                                 f"input has {inputs[i].shape}")

    def loss() -> float:
        return _weighted_sum(op(*inputs, **consts)[0], upstream)

    return check_function(name, loss, [grads[i] for i in present], [inputs[i] for i in present],
                          [names[i] for i in present], expect_fail)


def wrong_embedding(w: np.ndarray, *, ids: np.ndarray):
    """NEGATIVE CONTROL: embedding whose backward loses repeated-id updates (``dW[ids] += dY``)."""
    out, _ = ops.embedding(w, ids=ids)

    def backward(dout):
        dw = np.zeros_like(w)
        dw[ids.reshape(-1)] += dout.reshape(-1, w.shape[1])  # buffered: last repeat wins
        return (dw,)
    return out, backward


def op_cases(rng: np.random.Generator) -> list[tuple]:
    """(name, op, inputs, consts, input names) for every op, with shapes that hit the real paths."""
    r = lambda *s: rng.standard_normal(s)  # noqa: E731
    B, nh, T, hs = 2, 2, 4, 8
    ids = np.array([[1, 3, 1, 0], [3, 3, 2, 1]])  # repeated ids on purpose
    targets = np.array([[1, 4, 0], [2, 2, 3]])
    ignored = np.array([[1, -1, 0], [-1, 2, 3]])
    return [
        ("add", ops.add, [r(3, 4), r(3, 4)], {}, ["a", "b"]),
        ("add (broadcast row)", ops.add, [r(2, 3, 4), r(4)], {}, ["a", "b"]),
        ("add (broadcast both)", ops.add, [r(2, 1, 4), r(3, 1)], {}, ["a", "b"]),
        ("sub", ops.sub, [r(3, 4), r(3, 4)], {}, ["a", "b"]),
        ("sub (broadcast)", ops.sub, [r(2, 3, 4), r(1, 3, 1)], {}, ["a", "b"]),
        ("mul", ops.mul, [r(3, 4), r(3, 4)], {}, ["a", "b"]),
        ("mul (broadcast)", ops.mul, [r(2, 3, 4), r(3, 1)], {}, ["a", "b"]),
        ("scale", ops.scale, [r(3, 4)], {"c": -1.7}, ["x"]),
        ("neg", ops.neg, [r(3, 4)], {}, ["x"]),
        ("relu", ops.relu, [r(3, 4) + 0.05], {}, ["x"]),
        ("tanh", ops.tanh, [r(3, 4)], {}, ["x"]),
        ("exp", ops.exp, [r(3, 4)], {}, ["x"]),
        ("log", ops.log, [np.abs(r(3, 4)) + 0.5], {}, ["x"]),
        ("gelu (erf)", ops.gelu, [2 * r(3, 5)], {}, ["x"]),
        ("gelu_tanh", ops.gelu_tanh, [2 * r(3, 5)], {}, ["x"]),
        ("matmul 2-D", ops.matmul, [r(3, 4), r(4, 5)], {}, ["a", "b"]),
        ("matmul 3-D batched", ops.matmul, [r(2, 3, 4), r(2, 4, 5)], {}, ["a", "b"]),
        ("matmul 3-D @ 2-D", ops.matmul, [r(2, 3, 4), r(4, 5)], {}, ["a", "b"]),
        ("matmul 4-D broadcast", ops.matmul, [r(2, 1, 3, 4), r(1, 2, 4, 2)], {}, ["a", "b"]),
        ("linear", ops.linear, [r(5, 4), r(4, 3), r(3)], {}, ["x", "W", "b"]),
        ("linear (no bias)", ops.linear, [r(5, 4), r(4, 3), None], {}, ["x", "W", "b"]),
        ("linear 3-D input", ops.linear, [r(2, 3, 4), r(4, 6), r(6)], {}, ["x", "W", "b"]),
        ("sum (all)", ops.sum, [r(2, 3, 4)], {}, ["x"]),
        ("sum (axis 1, keepdims)", ops.sum, [r(2, 3, 4)], {"axis": 1, "keepdims": True}, ["x"]),
        ("sum (axes 0,2)", ops.sum, [r(2, 3, 4)], {"axis": (0, 2)}, ["x"]),
        ("mean (all)", ops.mean, [r(2, 3, 4)], {}, ["x"]),
        ("mean (axis -1)", ops.mean, [r(2, 3, 4)], {"axis": -1}, ["x"]),
        ("mean (axis 0, keepdims)", ops.mean, [r(2, 3, 4)], {"axis": 0, "keepdims": True}, ["x"]),
        ("reshape", ops.reshape, [r(2, 3, 4)], {"shape": (6, 4)}, ["x"]),
        ("transpose (head split)", ops.transpose, [r(B, T, nh, hs)], {"axes": (0, 2, 1, 3)}, ["x"]),
        ("transpose (permute 3-D)", ops.transpose, [r(2, 3, 4)], {"axes": (2, 0, 1)}, ["x"]),
        ("slice q", ops.slice, [r(B, T, 3 * 4)], {"index": (Ellipsis, np.s_[0:4])}, ["qkv"]),
        ("slice k", ops.slice, [r(B, T, 3 * 4)], {"index": (Ellipsis, np.s_[4:8])}, ["qkv"]),
        ("slice v", ops.slice, [r(B, T, 3 * 4)], {"index": (Ellipsis, np.s_[8:12])}, ["qkv"]),
        ("softmax", ops.softmax, [r(2, 3, 5)], {}, ["x"]),
        ("log_softmax", ops.log_softmax, [r(2, 3, 5)], {}, ["x"]),
        ("cross_entropy", ops.cross_entropy, [r(2, 3, 5)], {"targets": targets}, ["logits"]),
        ("cross_entropy (ignore_index)", ops.cross_entropy, [r(2, 3, 5)], {"targets": ignored}, ["logits"]),
        ("layernorm", ops.layernorm, [r(2, 3, 6), 1 + 0.1 * r(6), r(6)], {"eps": 1e-5}, ["x", "gamma", "beta"]),
        ("layernorm (no beta)", ops.layernorm, [r(2, 3, 6), 1 + 0.1 * r(6), None], {"eps": 1e-5},
         ["x", "gamma", "beta"]),
        ("embedding (repeated ids)", ops.embedding, [r(5, 3)], {"ids": ids}, ["W"]),
        ("tied_head", ops.tied_head, [r(2, 3, 4), r(7, 4)], {}, ["x", "W_e"]),
        ("attention_scores", ops.attention_scores, [r(B, nh, T, hs), r(B, nh, T, hs)], {}, ["q", "k"]),
        ("causal_mask", ops.causal_mask, [r(B, nh, T, T)], {}, ["scores"]),
        ("attention_output", ops.attention_output, [ops.softmax(r(B, nh, T, T))[0], r(B, nh, T, hs)], {},
         ["p", "v"]),
        ("attention (fused causal)", ops.attention, [r(B, nh, T, hs), r(B, nh, T, hs), r(B, nh, T, hs)], {},
         ["q", "k", "v"]),
        ("attention (fused, 2 queries on 5 cached keys)", ops.attention,
         [r(B, nh, 2, hs), r(B, nh, 5, hs), r(B, nh, 5, hs)], {}, ["q", "k", "v"]),
        ("attention (fused, per-row cache lengths 3 and 5)", ops.attention,
         [r(B, nh, 2, hs), r(B, nh, 5, hs), r(B, nh, 5, hs)], {"key_lengths": np.array([3, 5])},
         ["q", "k", "v"]),
        ("self_attention (fused split, heads merged)", ops.self_attention, [r(B, T, 3 * nh * hs)],
         {"n_head": nh}, ["qkv"]),
        ("dropout (p=0.3, fixed mask)", ops.dropout, [r(3, 4)],
         {"p": 0.3, "rng": _FixedGenerator(np.random.default_rng(7))}, ["x"]),
    ]


class _FixedGenerator:
    """Hands out the same random stream on every call, so repeated forwards share one mask."""

    def __init__(self, rng: np.random.Generator):
        self._state = rng.bit_generator.state

    def random(self, shape, dtype=np.float64):
        g = np.random.default_rng()
        g.bit_generator.state = self._state
        return g.random(shape, dtype=dtype)


def _module_checks(name: str, module, forward: Callable[[], "object"],
                   rng: np.random.Generator) -> list[CheckResult]:
    """Gradient-check every parameter of ``module`` for the scalar sum(g * forward())."""
    from ..core.tensor import no_grad
    module.zero_grad()
    out = forward()
    upstream = rng.standard_normal(out.shape)
    out.backward(upstream)
    params = module.parameters()
    analytic = [p.grad for p in params.values()]

    def loss() -> float:
        with no_grad():
            return _weighted_sum(forward().data, upstream)

    return check_function(name, loss, analytic, [p.data for p in params.values()], list(params))


def composite_checks(rng: np.random.Generator) -> list[CheckResult]:
    """Whole modules through the Tensor engine: multi-head attention, a pre-LN block with
    both residuals, and a tiny weight-tied GPT with its cross-entropy loss."""
    from ..core.model import GPT, GPTConfig
    from ..core.nn import Block, CausalSelfAttention
    from ..core.tensor import Tensor

    def randomize(module) -> None:
        for p in module.parameters().values():
            p.data[...] = rng.normal(0.0, 0.5, p.data.shape)

    results: list[CheckResult] = []
    x = Tensor(rng.standard_normal((2, 4, 8)))
    attn = CausalSelfAttention(8, 2, dtype=np.float64)
    randomize(attn)
    results += _module_checks("composite: multi-head attention (B=2 T=4 C=8 nh=2)", attn,
                              lambda: attn(x), rng)
    block = Block(8, 2, activation="gelu_tanh", dtype=np.float64)
    randomize(block)
    results += _module_checks("composite: pre-LN block", block, lambda: block(x), rng)
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, dtype="float64")
    gpt = GPT(config, seed=None)
    randomize(gpt)
    idx, targets = rng.integers(0, 11, (2, 6)), rng.integers(0, 11, (2, 6))
    results += _module_checks("composite: tiny weight-tied GPT loss", gpt,
                              lambda: gpt(idx, targets)[1], rng)
    return results


def run_gate(include_composites: bool = True, seed: int = 0) -> list[CheckResult]:
    """Every op check, the composites, and the negative control; float64 throughout."""
    rng = np.random.default_rng(seed)
    results: list[CheckResult] = []
    for name, op, inputs, consts, names in op_cases(rng):
        results += check_op(name, op, inputs, consts, rng, input_names=names)
    if include_composites:
        results += composite_checks(rng)
    w, ids = rng.standard_normal((5, 3)), np.array([[1, 3, 1, 0], [3, 3, 2, 1]])
    results += check_op("NEGATIVE CONTROL: embedding with dW[ids] += dY", wrong_embedding, [w],
                        {"ids": ids}, rng, expect_fail=True, input_names=["W"])
    return results


def format_table(results: Sequence[CheckResult]) -> str:
    """Markdown table: op, input, shape, max abs error, max relative error, pass."""
    lines = ["| op | input | shape | max abs err | max rel err | pass |", "|---|---|---|---|---|---|"]
    for r in results:
        verdict = "PASS" if r.passed else "FAIL"
        if r.expect_fail:
            verdict += " (expected FAIL)" if not r.passed else " (UNEXPECTED: control passed)"
        lines.append(f"| {r.name} | {r.input} | {tuple(r.shape)} | {r.max_abs_err:.2e} | "
                     f"{r.max_rel_err:.2e} | {verdict} |")
    return "\n".join(lines)


def write_table(results: Sequence[CheckResult], path: str | Path) -> None:
    n_ok = sum(1 for r in results if r.passed and not r.expect_fail)
    n_checks = sum(1 for r in results if not r.expect_fail)
    header = (f"# Gradient check gate\n\nWritten by `numgpt gradcheck` / `tests/test_gradcheck.py`. "
              f"Central differences in float64, eps {EPS:g}, element passes when abs err < {ABS_TOL:g} "
              f"or rel err < {REL_TOL:g}.\n\n{n_ok} of {n_checks} checks pass; the negative control "
              f"{'fails as it must' if all(not r.passed for r in results if r.expect_fail) else 'PASSED (gate broken)'}"
              ".\n\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + format_table(results) + "\n")

