"""The gradient-check gate: every op's hand-derived backward against central differences.

For an op ``y = f(x_1, ..., x_n)`` and a fixed random upstream gradient ``g`` (same shape
as y) the scalar ``L = sum(g * y)`` has ``dL/dx_i = backward(g)[i]``. The gate perturbs
each element of each input by +-eps (float64, eps 1e-6) and compares the central
difference ``(L(x+eps) - L(x-eps)) / 2 eps`` with the analytic value. An element passes
when ``|a - n| < 1e-7`` or ``|a - n| / max(|a|, |n|) < 1e-5``.

The op cases come from the one op table, ``numgpt.verify.op_cases`` (its ``gate=True``
cases), which also feeds the PyTorch parity tests and the per-op benchmark.

Composites (multi-head attention, a pre-LN block, a tiny weight-tied GPT) are checked the
same way through the ``Tensor`` engine, one check per parameter tensor.

A negative control, an embedding whose backward writes ``dW[ids] += dY`` (dropping all but
one update of a repeated id), must FAIL the gate by an order-one error; if it passes, the
gate is not able to see wrong math and the whole run fails.

The gate runs on one op path (``path``): "reference", the NumPy ops, or "fast", where each op
with a compiled kernel (``numgpt.core.kernels``) is that kernel and the composites are built
with ``kernels="fast"``. The fast path has its own negative control: the compiled LayerNorm
backward handed 1/var where it needs the saved 1/std.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..core import kernels, ops
from ..io.files import atomic_write, make_folder
from . import op_cases as op_table

__all__ = ["CheckResult", "check_function", "check_op", "op_cases", "run_gate", "write_table",
           "wrong_embedding", "wrong_fast_layernorm", "ABS_TOL", "REL_TOL", "EPS", "PATHS"]

PATHS = kernels.PATHS

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


def wrong_fast_layernorm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray | None = None, *,
                         eps: float = 1e-5):
    """NEGATIVE CONTROL (fast path): the compiled LayerNorm whose backward kernel is handed
    1 / (var + eps) where it needs the saved 1 / sqrt(var + eps) (a wrong saved statistic)."""
    out, right = kernels.layernorm(x, gamma, beta, eps=eps)
    cells = dict(zip(right.__code__.co_freevars, (c.cell_contents for c in right.__closure__)))
    x2, mean, rstd = cells["x2"], cells["mean"], cells["rstd"]

    def backward(dout):
        dx = np.empty_like(x2)
        parts = np.zeros((1, x.shape[-1])), np.zeros((1, x.shape[-1]))
        kernels.layernorm_backward(dx, *parts, dout.reshape(x2.shape), x2, mean, rstd * rstd, gamma)
        return dx.reshape(x.shape), parts[0].sum(axis=0), None if beta is None else parts[1].sum(axis=0)
    return out, backward


def op_cases(rng: np.random.Generator, path: str = "reference") -> list[tuple]:
    """(name, op, inputs, consts, input names) for every gate case of the op table
    (``numgpt.verify.op_cases``), float64 inputs drawn from ``rng`` in table order; ``op`` is
    the op of that name on ``path`` (a kernel on the fast path where one exists)."""
    namespace = kernels.ops_for(path)
    return [(c.name, getattr(namespace, c.op.__name__), c.inputs(rng), c.consts(), c.input_names)
            for c in op_table.gate_cases()]


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


def composite_checks(rng: np.random.Generator, path: str = "reference") -> list[CheckResult]:
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
    attn = CausalSelfAttention(8, 2, dtype=np.float64, kernels=path)
    randomize(attn)
    results += _module_checks("composite: multi-head attention (B=2 T=4 C=8 nh=2)", attn,
                              lambda: attn(x), rng)
    block = Block(8, 2, activation="gelu_tanh", dtype=np.float64, kernels=path)
    randomize(block)
    results += _module_checks("composite: pre-LN block", block, lambda: block(x), rng)
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, dtype="float64",
                       kernels=path)
    gpt = GPT(config, seed=None)
    randomize(gpt)
    idx, targets = rng.integers(0, 11, (2, 6)), rng.integers(0, 11, (2, 6))
    results += _module_checks("composite: tiny weight-tied GPT loss", gpt,
                              lambda: gpt(idx, targets)[1], rng)
    return results


def run_gate(include_composites: bool = True, seed: int = 0, path: str = "reference") -> list[CheckResult]:
    """Every op check, the composites, and the negative control, on op path ``path``
    ("reference" or "fast"); float64 throughout."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {list(PATHS)}, got {path!r}")
    rng = np.random.default_rng(seed)
    results: list[CheckResult] = []
    for name, op, inputs, consts, names in op_cases(rng, path):
        results += check_op(name, op, inputs, consts, rng, input_names=names)
    if include_composites:
        results += composite_checks(rng, path)
    if path == "reference":
        w, ids = rng.standard_normal((5, 3)), np.array([[1, 3, 1, 0], [3, 3, 2, 1]])
        results += check_op("NEGATIVE CONTROL: embedding with dW[ids] += dY", wrong_embedding, [w],
                            {"ids": ids}, rng, expect_fail=True, input_names=["W"])
    else:
        x, gamma = 3.0 * rng.standard_normal((3, 8)) + 1.0, 1.0 + 0.1 * rng.standard_normal(8)

        def control(x, *, eps):  # dx only: the input whose gradient uses 1/std
            out, backward = wrong_fast_layernorm(x, gamma, eps=eps)
            return out, lambda dout: backward(dout)[:1]
        results += check_op("NEGATIVE CONTROL: fast layernorm backward given 1/var for 1/std",
                            control, [x], {"eps": 1e-5}, rng, expect_fail=True, input_names=["x"])
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


def write_table(results: Sequence[CheckResult], path: str | Path, op_path: str = "reference") -> None:
    n_ok = sum(1 for r in results if r.passed and not r.expect_fail)
    n_checks = sum(1 for r in results if not r.expect_fail)
    header = (f"# Gradient check gate, {op_path} path\n\nWritten by `numgpt gradcheck --path {op_path}` / "
              f"`tests/test_gradcheck.py`. "
              f"Central differences in float64, eps {EPS:g}, element passes when abs err < {ABS_TOL:g} "
              f"or rel err < {REL_TOL:g}.\n\n{n_ok} of {n_checks} checks pass; the negative control "
              f"{'fails as it must' if all(not r.passed for r in results if r.expect_fail) else 'PASSED (gate broken)'}"
              ".\n\n")
    path = Path(path)
    make_folder(path.parent, "the gradient-check table")
    atomic_write(path, header + format_table(results) + "\n")

