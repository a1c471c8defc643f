"""The op library: every piece of GPT-2 math as a pure function of arrays.

Each op is ``f(*inputs, **consts) -> (out, backward)``. Positional arguments are the
differentiable inputs (``None`` for an optional input that is absent); keyword arguments
are constants (ids, targets, axes, epsilon, a random generator). ``backward(dout)``
returns a tuple with one gradient per positional input, each with exactly that input's
shape (``None`` for an absent optional input). The backward closures capture arrays
only, never graph nodes, so a dropped graph is freed by reference counting alone.

Shape legend used in docstrings and comments:
    B  batch size           T  sequence length (time)
    C  channels (n_embd)    nh number of heads
    hs head size (C // nh)  V  vocabulary size
    L  number of layers     N  flattened rows (B*T)

dtype: an op keeps the floating dtype of its inputs (float32 in normal use, float64 in the
verification gates). Mixed float dtypes are a ``DTypeError`` (a ``TypeError``); so are
integer arrays where floats are required. Constants are applied as Python floats so NumPy
never upcasts.

Attention has three entries, each named for its mode and chosen by its caller:
``attention_training`` (fused, with backward), ``attention_inference`` (KV cache, no
backward) and ``attention_reference`` (the unfused four-op chain the other two are checked
against). Every op has one entry in the op table ``numgpt/verify/op_cases.py``, which feeds
its gradient check, its PyTorch parity tests and its timing (``benchmarks/bench_ops.py``).

Derivations: each backward cites the identity it uses. ``dX`` is the gradient of a
scalar loss with respect to ``X``; ``*`` is elementwise, ``@`` is matrix product.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
from scipy.special import erf

from ..errors import DTypeError, InputError, ShapeError
from . import gemm

__all__ = [
    "add", "sub", "mul", "scale", "neg", "relu", "tanh", "exp", "log",
    "gelu", "gelu_tanh", "matmul", "linear", "sum", "mean", "reshape", "transpose",
    "slice", "softmax", "log_softmax", "cross_entropy", "layernorm", "embedding",
    "tied_head", "attention_scores", "causal_mask", "attention_output",
    "attention_training", "attention_inference", "attention_reference", "dropout", "unbroadcast",
]

Backward = Callable[[np.ndarray], tuple]

_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


# ----------------------------------------------------------------------------- checks

def _check_float(*arrays: np.ndarray | None) -> None:
    """All given arrays are floating point and of one dtype; otherwise DTypeError."""
    dtypes = {a.dtype for a in arrays if a is not None}
    for dt in dtypes:
        if dt.type not in _FLOAT_DTYPES:
            raise DTypeError(f"expected floating-point arrays, got dtype {dt}; cast with .astype(np.float32)")
    if len(dtypes) > 1:
        names = ", ".join(sorted(str(d) for d in dtypes))
        raise DTypeError(f"mixed dtypes ({names}): cast the inputs to one dtype first; "
                        "ops never upcast silently")


def _check_broadcast(a: np.ndarray, b: np.ndarray, op: str) -> tuple[int, ...]:
    try:
        return np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ShapeError(f"{op}: shapes {a.shape} and {b.shape} do not broadcast") from None


def unbroadcast(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``grad`` back down to ``shape`` over the axes NumPy broadcasting added/stretched.

    If ``y = f(broadcast(x))`` then ``dx = sum of dy over every broadcast copy of x``.
    """
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad


# ----------------------------------------------------------------------- elementwise

def add(a: np.ndarray, b: np.ndarray):
    """``a + b`` with broadcasting.  d/da = 1, d/db = 1 (then unbroadcast)."""
    _check_float(a, b)
    _check_broadcast(a, b, "add")
    out = a + b

    def backward(dout):
        return unbroadcast(dout, a.shape), unbroadcast(dout, b.shape)
    return out, backward


def sub(a: np.ndarray, b: np.ndarray):
    """``a - b`` with broadcasting.  d/da = 1, d/db = -1."""
    _check_float(a, b)
    _check_broadcast(a, b, "sub")
    out = a - b

    def backward(dout):
        return unbroadcast(dout, a.shape), unbroadcast(-dout, b.shape)
    return out, backward


def mul(a: np.ndarray, b: np.ndarray):
    """``a * b`` with broadcasting.  da = dout * b, db = dout * a."""
    _check_float(a, b)
    _check_broadcast(a, b, "mul")
    out = a * b

    def backward(dout):
        return unbroadcast(dout * b, a.shape), unbroadcast(dout * a, b.shape)
    return out, backward


def scale(x: np.ndarray, *, c: float):
    """``c * x`` for a constant scalar c.  dx = c * dout."""
    _check_float(x)
    c = float(c)
    out = x * c

    def backward(dout):
        return (dout * c,)
    return out, backward


def neg(x: np.ndarray):
    """``-x``.  dx = -dout."""
    _check_float(x)

    def backward(dout):
        return (-dout,)
    return -x, backward


def relu(x: np.ndarray):
    """``max(x, 0)``.  dx = dout * [x > 0]."""
    _check_float(x)
    positive = x > 0
    out = np.maximum(x, 0.0)  # not x * positive: -inf * 0 is nan

    def backward(dout):
        return (dout * positive,)
    return out, backward


def tanh(x: np.ndarray):
    """``tanh(x)``.  dx = dout * (1 - tanh(x)^2)."""
    _check_float(x)
    out = np.tanh(x)

    def backward(dout):
        return (dout * (1.0 - out * out),)
    return out, backward


def exp(x: np.ndarray):
    """``e^x``.  dx = dout * e^x."""
    _check_float(x)
    out = np.exp(x)

    def backward(dout):
        return (dout * out,)
    return out, backward


def log(x: np.ndarray):
    """Natural log.  dx = dout / x."""
    _check_float(x)
    out = np.log(x)

    def backward(dout):
        return (dout / x,)
    return out, backward


_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


# Numerical Recipes' Chebyshev fit (``erfcc``): erfc(z) = t exp(-z^2 + P(t)), t = 1/(1 + z/2),
# z >= 0, relative error < 1.2e-7 everywhere. Coefficients of P, t^0 first.
_ERFC_FIT = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807,
             -1.13520398, 1.48851587, -0.82215223, 0.17087277)


def _normal_cdf_float32(x: np.ndarray) -> np.ndarray:
    """Phi(x) for float32 x in ~34 in-place array passes (scipy's scalar erf is ~5x slower).

    Phi(-|x|) = erfc(|x| / sqrt 2) / 2 from the fit above, then
    Phi(x) = Phi(-|x|) + [x > 0] (1 - 2 Phi(-|x|)), which keeps the left tail (the textbook
    0.5 (1 + erf) cancels to 0 there in float32). Error against float64: < 3e-7 absolute;
    relative < 1e-6 for |x| < 2, growing like 3e-8 x^2 (float32 rounding of the exp
    argument) to 1e-5 at |x| = 9.
    """
    z = np.abs(x)
    z *= _SQRT_HALF  # z = |x| / sqrt 2
    t = z * 0.5
    t += 1.0
    np.reciprocal(t, out=t)  # t = 1 / (1 + z / 2)
    e = t * _ERFC_FIT[9]  # Horner: P(t)
    for c in _ERFC_FIT[8:0:-1]:
        e += c
        e *= t
    e += _ERFC_FIT[0]
    np.multiply(z, z, out=z)
    e -= z
    np.exp(e, out=e)
    e *= t
    e *= 0.5  # Phi(-|x|)
    z = e * -2.0
    z += 1.0
    np.multiply(z, x > 0, out=z)
    e += z
    return e


def gelu(x: np.ndarray):
    """Exact GELU (nanoGPT): ``x * Phi(x)``, ``Phi(x) = (1 + erf(x / sqrt 2)) / 2``.

    d/dx = Phi(x) + x * phi(x), with phi the standard normal density e^(-x^2/2)/sqrt(2 pi).
    float64 uses scipy's erf; float32 uses ``_normal_cdf_float32`` (error of Phi < 3e-7,
    float32 rounding, and about 5x faster).
    """
    _check_float(x)
    if x.dtype == np.float32:
        cdf = _normal_cdf_float32(x)
    else:
        cdf = x * _SQRT_HALF
        erf(cdf, out=cdf)
        cdf += 1.0
        cdf *= 0.5
    out = x * cdf

    def backward(dout):
        g = x * x  # in place on one buffer: dout * (cdf + x * pdf)
        g *= -0.5
        np.exp(g, out=g)
        g *= x
        g *= _INV_SQRT_2PI
        g += cdf
        g *= dout
        return (g,)
    return out, backward


def gelu_tanh(x: np.ndarray):
    """GPT-2's GELU (``gelu_new``): ``0.5 x (1 + tanh(u))``, ``u = sqrt(2/pi)(x + 0.044715 x^3)``.

    d/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2).
    """
    _check_float(x)
    # in place on two buffers (t, out) instead of eight temporaries; same operations in the
    # same order as tanh(c * (x + 0.044715 * (x * x * x))) and 0.5 * x * (1 + t)
    t = x * x
    t *= x
    t *= 0.044715
    t += x
    t *= _SQRT_2_OVER_PI
    np.tanh(t, out=t)
    out = t + 1.0
    out *= x
    out *= 0.5  # exact: 0.5 * (x * (1 + t)) == (0.5 * x) * (1 + t)

    def backward(dout):
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * (x * x))
        return (dout * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du),)
    return out, backward


# ----------------------------------------------------------------------------- matmul

def matmul(a: np.ndarray, b: np.ndarray):
    """``a @ b`` for a (..., n, k), b (..., k, m) -> (..., n, m); leading axes broadcast.

    dA = dY @ B^T and dB = A^T @ dY, where ^T swaps the LAST two axes only (a plain
    ``.T`` would reverse the batch axes too), then summed over broadcast batch axes.
    """
    _check_float(a, b)
    if a.ndim < 2 or b.ndim < 2:
        raise ShapeError(f"matmul needs arrays of at least 2 dims, got {a.shape} and {b.shape}")
    if a.shape[-1] != b.shape[-2]:
        raise ShapeError(f"matmul: inner dims differ: {a.shape} @ {b.shape}")
    try:
        np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise ShapeError(f"matmul: batch dims of {a.shape} and {b.shape} do not broadcast") from None
    out = a @ b

    def backward(dout):
        da = dout @ np.swapaxes(b, -1, -2)  # (..., n, m) @ (..., m, k) -> (..., n, k)
        db = np.swapaxes(a, -1, -2) @ dout  # (..., k, n) @ (..., n, m) -> (..., k, m)
        return unbroadcast(da, a.shape), unbroadcast(db, b.shape)
    return out, backward


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None):
    """``x @ W + b``: x (..., in), W (in, out), b (out,) -> (..., out).

    Leading axes are flattened so each direction is one BLAS call:
    dX = dY @ W^T, dW = X^T @ dY (over all N rows), db = sum of dY over rows.
    """
    _check_float(x, w, b)
    if w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ShapeError(f"linear: input {x.shape} does not match weight {w.shape} (in, out)")
    if b is not None and b.shape != (w.shape[1],):
        raise ShapeError(f"linear: bias {b.shape} does not match weight {w.shape}; expected ({w.shape[1]},)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, w.shape[0])  # (N, in)
    out = gemm.mm(x2, w)  # (N, in) @ (in, out) -> (N, out)
    if b is not None:
        out += b
    out = out.reshape(*lead, w.shape[1])  # (..., out)

    def backward(dout):
        d2 = dout.reshape(-1, w.shape[1])  # (N, out)
        dx = gemm.mm(d2, w.T).reshape(x.shape)  # (N, out) @ (out, in) -> (..., in)
        dw = gemm.mm(x2.T, d2)  # (in, N) @ (N, out) -> (in, out)
        db = d2.sum(axis=0) if b is not None else None
        return dx, dw, db
    return out, backward


# -------------------------------------------------------------------------- reductions

def _norm_axes(axis, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for ax in axes:
        if not -ndim <= ax < ndim:
            raise ShapeError(f"axis {ax} is out of range for an array of {ndim} dims")
    return tuple(sorted(ax % ndim for ax in axes))


def sum(x: np.ndarray, *, axis=None, keepdims: bool = False):  # noqa: A001 - mirrors np.sum
    """Sum over ``axis`` (None = all).  dx = dout broadcast back over the summed axes."""
    _check_float(x)
    axes = _norm_axes(axis, x.ndim)
    out = np.sum(x, axis=axes, keepdims=keepdims)

    def backward(dout):
        d = dout if keepdims else np.expand_dims(dout, axes)
        return (np.broadcast_to(d, x.shape).copy(),)
    return out, backward


def mean(x: np.ndarray, *, axis=None, keepdims: bool = False):
    """Mean over ``axis``.  dx = dout / n broadcast back, n = number of averaged elements."""
    _check_float(x)
    axes = _norm_axes(axis, x.ndim)
    n = int(np.prod([x.shape[a] for a in axes]))
    out = np.mean(x, axis=axes, keepdims=keepdims)

    def backward(dout):
        d = dout if keepdims else np.expand_dims(dout, axes)
        return (np.broadcast_to(d * (1.0 / n), x.shape).copy(),)
    return out, backward


# ----------------------------------------------------------------------- shape moves

def reshape(x: np.ndarray, *, shape: tuple[int, ...]):
    """Reshape (same elements).  dx = dout reshaped back."""
    try:
        out = x.reshape(shape)
    except ValueError:
        raise ShapeError(f"cannot reshape {x.shape} ({x.size} elements) to {tuple(shape)}") from None

    def backward(dout):
        return (dout.reshape(x.shape),)
    return out, backward


def transpose(x: np.ndarray, *, axes: tuple[int, ...]):
    """Permute axes (e.g. the head split (B, T, nh, hs) -> (B, nh, T, hs) with (0, 2, 1, 3)).

    dx = dout permuted by the inverse permutation.
    """
    axes = tuple(axes)
    if sorted(a % x.ndim for a in axes) != list(range(x.ndim)) or len(axes) != x.ndim:
        raise ShapeError(f"transpose: {axes} is not a permutation of the axes of {x.shape}")
    out = np.transpose(x, axes)
    inverse = tuple(np.argsort([a % x.ndim for a in axes]))

    def backward(dout):
        return (np.transpose(dout, inverse),)
    return out, backward


def slice(x: np.ndarray, *, index):  # noqa: A001 - the natural name
    """``x[index]`` for basic slicing (e.g. Q, K, V out of the fused (B, T, 3C)).

    dx = zeros of x's shape with dout written back at ``index``.
    """
    out = x[index]

    def backward(dout):
        dx = np.zeros_like(x)
        dx[index] = dout
        return (dx,)
    return out, backward


# ----------------------------------------------------------------------- softmax & loss

def softmax(x: np.ndarray):
    """Softmax over the last axis, max-subtracted for stability.

    With p = softmax(x): dx = p * (dp - sum(dp * p, last axis)).
    """
    _check_float(x)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    p = e / e.sum(axis=-1, keepdims=True)

    def backward(dout):
        return (p * (dout - np.sum(dout * p, axis=-1, keepdims=True)),)
    return p, backward


def log_softmax(x: np.ndarray):
    """``x - logsumexp(x)`` over the last axis.  dx = dout - softmax(x) * sum(dout)."""
    _check_float(x)
    shifted = x - x.max(axis=-1, keepdims=True)
    out = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))

    def backward(dout):
        return (dout - np.exp(out) * dout.sum(axis=-1, keepdims=True),)
    return out, backward


def check_cross_entropy_inputs(logits: np.ndarray, targets: np.ndarray) -> None:
    """Float logits (..., V) and integer targets of shape (...): the rule both paths check."""
    _check_float(logits)
    if not np.issubdtype(np.asarray(targets).dtype, np.integer):
        raise DTypeError(f"cross_entropy targets must be integers, got dtype {np.asarray(targets).dtype}")
    if np.shape(targets) != logits.shape[:-1]:
        raise ShapeError(f"cross_entropy: targets {np.shape(targets)} do not match logits {logits.shape} "
                         f"(expected targets of shape {logits.shape[:-1]})")


def cross_entropy(logits: np.ndarray, *, targets: np.ndarray, ignore_index: int = -1):
    """Fused softmax cross-entropy, mean over the targets that are not ``ignore_index``.

    logits (..., V), targets (...) int -> scalar.  loss = mean_i(logsumexp(z_i) - z_i[t_i]).
    d loss / d z_i = (softmax(z_i) - onehot(t_i)) / n for counted rows, 0 for ignored ones.
    """
    check_cross_entropy_inputs(logits, targets)
    V = logits.shape[-1]
    z = logits.reshape(-1, V)  # (N, V)
    t = targets.reshape(-1)  # (N,)
    keep = t != ignore_index
    if np.any((t[keep] < 0) | (t[keep] >= V)):
        raise ShapeError(f"cross_entropy: target ids must lie in [0, {V}) or equal ignore_index {ignore_index}, "
                         f"got values in [{t[keep].min()}, {t[keep].max()}]")
    n = int(keep.sum())
    rows = np.nonzero(keep)[0]
    e = z - z.max(axis=-1, keepdims=True)  # shifted logits, (N, V)
    picked = e[rows, t[rows]]  # (n,)
    np.exp(e, out=e)  # kept: backward's softmax is e / sumexp, no second exp over (N, V)
    sumexp = e.sum(axis=-1)  # (N,)
    nll = np.log(sumexp[rows]) - picked
    out = np.asarray(nll.sum() / max(n, 1), dtype=logits.dtype)

    def backward(dout):
        c = float(dout) / max(n, 1)
        scale = c / sumexp  # (N,); 0 for ignored rows
        if n < len(t):
            scale[~keep] = 0.0
        g = e * scale[:, None]  # c * softmax, one pass over (N, V)
        g[rows, t[rows]] -= c
        return (g.reshape(logits.shape),)
    return out, backward


def layernorm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray | None = None, *, eps: float = 1e-5):
    """LayerNorm over the last axis: ``(x - mu) * rstd * gamma + beta``.

    Biased variance, ``rstd = 1 / sqrt(var + eps)`` (eps inside the root, as PyTorch).
    With xhat = (x - mu) * rstd and g = dout * gamma:
        dx = rstd * (g - mean(g) - xhat * mean(g * xhat))     (means over the last axis)
        dgamma = sum(dout * xhat), dbeta = sum(dout)          (sums over all other axes)
    Forward saves exactly what backward needs: xhat and rstd.
    """
    _check_float(x, gamma, beta)
    C = x.shape[-1]
    if gamma.shape != (C,) or (beta is not None and beta.shape != (C,)):
        raise ShapeError(f"layernorm: input {x.shape} needs gamma/beta of shape ({C},), "
                         f"got {gamma.shape} and {None if beta is None else beta.shape}")
    xhat = x - x.mean(axis=-1, keepdims=True)  # x - mu, normalised in place below
    sq = xhat * xhat
    rstd = sq.mean(axis=-1, keepdims=True)  # var, (..., 1)
    rstd += float(eps)
    np.sqrt(rstd, out=rstd)
    np.reciprocal(rstd, out=rstd)  # 1 / sqrt(var + eps)
    xhat *= rstd
    out = np.multiply(xhat, gamma, out=sq)
    if beta is not None:
        out += beta

    def backward(dout):
        rows = dout.reshape(-1, C)  # (N, C)
        xh = xhat.reshape(-1, C)  # (N, C)
        t = rows * xh  # dout * xhat
        dgamma = t.sum(axis=0)
        dbeta = rows.sum(axis=0) if beta is not None else None
        # row means of g = dout * gamma and of g * xhat, as (N, C) @ (C,) products
        mean_g = rows @ gamma  # (N,)
        mean_g *= 1.0 / C
        mean_gx = t @ gamma  # (N,)
        mean_gx *= 1.0 / C
        dx = rows * gamma
        dx -= mean_g[:, None]
        np.multiply(xh, mean_gx[:, None], out=t)
        dx -= t
        dx *= rstd.reshape(-1, 1)
        return dx.reshape(x.shape), dgamma, dbeta
    return out, backward


# ----------------------------------------------------------------------- embeddings

def embedding(w: np.ndarray, *, ids: np.ndarray):
    """Row lookup ``W[ids]``: W (V, C), ids (...) int -> (..., C).

    dW = scatter-add of dout rows into the looked-up rows, summing repeated ids (a plain
    ``dW[ids] += dout`` would keep only the last write of each repeat).
    """
    _check_float(w)
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise DTypeError(f"embedding ids must be integers, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= w.shape[0]):
        raise ShapeError(f"embedding: ids must lie in [0, {w.shape[0]}), "
                         f"got values in [{ids.min()}, {ids.max()}]")
    out = w[ids]

    def backward(dout):
        # sort the ids so each distinct id's rows are one run, sum each run with reduceat
        # (np.add.at does the same scatter-add one row at a time, many times slower)
        flat = ids.reshape(-1)  # (N,)
        order = np.argsort(flat, kind="stable")
        sorted_ids = flat[order]
        starts = np.flatnonzero(np.concatenate(([True], sorted_ids[1:] != sorted_ids[:-1])))
        dw = np.zeros_like(w)
        if flat.size:
            rows = dout.reshape(-1, w.shape[1])[order]  # (N, C), grouped by id
            dw[sorted_ids[starts]] = np.add.reduceat(rows, starts, axis=0)
        return (dw,)
    return out, backward


def tied_head(x: np.ndarray, w_e: np.ndarray):
    """Output head tied to the token embedding: ``x @ W_e^T``: x (..., C), W_e (V, C) -> (..., V).

    dX = dY @ W_e; dW_e = dY^T @ X over all rows (N, V)^T @ (N, C) -> (V, C).
    """
    _check_float(x, w_e)
    if w_e.ndim != 2 or x.shape[-1] != w_e.shape[1]:
        raise ShapeError(f"tied_head: input {x.shape} does not match embedding {w_e.shape} (V, C)")
    x2 = x.reshape(-1, w_e.shape[1])  # (N, C)
    out = gemm.mm(x2, w_e.T).reshape(*x.shape[:-1], w_e.shape[0])  # (N, C) @ (C, V) -> (..., V)

    def backward(dout):
        d2 = dout.reshape(-1, w_e.shape[0])  # (N, V)
        dx = gemm.mm(d2, w_e).reshape(x.shape)  # (N, V) @ (V, C) -> (..., C)
        dw = gemm.mm(d2.T, x2)  # (V, N) @ (N, C) -> (V, C)
        return dx, dw
    return out, backward


# ----------------------------------------------------------------------- attention

def _check_qkv(q, k, v=None):
    if q.ndim < 2 or k.shape[-1] != q.shape[-1] or k.shape[:-2] != q.shape[:-2]:
        raise ShapeError(f"attention: q {q.shape} and k {k.shape} must be (..., T, hs) with equal leading dims")
    if v is not None and (v.shape[:-1] != k.shape[:-1]):
        raise ShapeError(f"attention: v {v.shape} must match k {k.shape} on every axis but the last")


def attention_scores(q: np.ndarray, k: np.ndarray):
    """``S = Q K^T / sqrt(hs)``: q (B, nh, Tq, hs), k (B, nh, Tk, hs) -> (B, nh, Tq, Tk).

    dQ = dS @ K / sqrt(hs); dK = dS^T @ Q / sqrt(hs).
    """
    _check_float(q, k)
    _check_qkv(q, k)
    s = 1.0 / math.sqrt(q.shape[-1])
    out = (q @ np.swapaxes(k, -1, -2)) * s  # (.., Tq, hs) @ (.., hs, Tk) -> (.., Tq, Tk)

    def backward(dout):
        dq = (dout @ k) * s  # (.., Tq, Tk) @ (.., Tk, hs)
        dk = (np.swapaxes(dout, -1, -2) @ q) * s  # (.., Tk, Tq) @ (.., Tq, hs)
        return dq, dk
    return out, backward


def causal_mask(scores: np.ndarray, *, key_lengths: np.ndarray | None = None, fill: float = -np.inf):
    """Set scores of future keys to ``fill`` (query i sees keys j <= i + Tk - Tq).

    scores (..., Tq, Tk). With Tq < Tk (a cache), query i sits at position Tk - Tq + i;
    with ``key_lengths`` (B,) row b holds only that many keys (scores (B, nh, Tq, Tk)).
    dscores = dout where visible, 0 where masked.
    """
    _check_float(scores)
    Tq, Tk = scores.shape[-2:]
    visible = _visible_keys(Tq, Tk, key_lengths)
    future = np.zeros((Tq, Tk), dtype=bool) if visible is None else ~visible  # (Tq, Tk) or (B, 1, Tq, Tk)
    out = np.where(future, scores.dtype.type(fill), scores)

    def backward(dout):
        return (np.where(future, 0.0, dout).astype(scores.dtype, copy=False),)
    return out, backward


def attention_output(p: np.ndarray, v: np.ndarray):
    """``Y = P V``: p (B, nh, Tq, Tk), v (B, nh, Tk, hs) -> (B, nh, Tq, hs).

    dP = dY @ V^T; dV = P^T @ dY.
    """
    return matmul(p, v)


def _visible_keys(Tq: int, Tk: int, key_lengths: np.ndarray | None) -> np.ndarray | None:
    """Boolean mask of keys each query may see, or None when every key is visible.

    Query i is at position ``length - Tq + i`` (the queries are the newest tokens) and sees
    keys ``j <= position``. Without ``key_lengths`` every row has ``length = Tk``:
    (Tq, Tk). With per-row lengths (B,), for a cache whose rows hold different numbers of
    tokens: (B, 1, Tq, Tk).
    """
    if key_lengths is None:
        if Tq == 1:
            return None
        return ~np.triu(np.ones((Tq, Tk), dtype=bool), k=Tk - Tq + 1)
    lengths = np.asarray(key_lengths).reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
    position = lengths - Tq + np.arange(Tq).reshape(1, 1, Tq, 1)  # (B, 1, Tq, 1)
    return np.arange(Tk).reshape(1, 1, 1, Tk) <= position  # (B, 1, Tq, Tk)


# The three attention entries. Which one runs is chosen at the call site, never here:
#   attention_training(qkv)         training: fused, keeps P, hand-derived backward
#   attention_inference(q, k, v)    inference over a KV cache: no backward, per-row lengths
#   attention_reference(q, k, v)    REFERENCE: the unfused four-op chain the other two are
#                                   checked against (tests/test_ops.py, the gradient gate)
# ``block`` (query rows per block) bounds memory inside an entry; every block size runs the
# same math, only the summation order (round-off) differs.

def _check_attention_inputs(q, k, v, key_lengths) -> float:
    """Check the shapes of an attention call; return the score scale 1 / sqrt(hs)."""
    _check_float(q, k, v)
    _check_qkv(q, k, v)
    Tq, Tk = q.shape[-2], k.shape[-2]
    if Tq > Tk:
        raise ShapeError(f"attention: more queries ({Tq}) than keys ({Tk})")
    if key_lengths is not None:
        if np.shape(key_lengths) != (q.shape[0],):
            raise ShapeError(f"attention: key_lengths {np.shape(key_lengths)} must be ({q.shape[0]},)")
        if np.any(key_lengths < Tq) or np.any(key_lengths > Tk):
            raise ShapeError(f"attention: key_lengths must lie in [Tq, Tk] = [{Tq}, {Tk}] so every "
                             f"query sees at least itself, got {np.asarray(key_lengths).tolist()}")
    return 1.0 / math.sqrt(q.shape[-1])


def _check_block(block) -> int:
    if not (isinstance(block, (int, np.integer)) and not isinstance(block, bool) and block >= 1):
        raise InputError(f"attention: block must be an int >= 1 (query rows per block), got {block!r}")
    return int(block)


def _softmax_blocked(q, k, s: float, key_lengths, block: int, p: np.ndarray) -> None:
    """Write P = softmax(mask(Q K^T s)) into the zeroed p (.., Tq, Tk), ``block`` queries at a time.

    Query i of row b sits at position ``off_b + i`` (``off_b = length_b - Tq``) and sees keys
    ``j <= off_b + i``, so a block of queries [r0, r1) needs only keys [0, off_b + r1): the
    scores above the diagonal are never computed (about half of them for a prompt) and each
    (block, Tk) slab stays in cache. Masked entries stay 0.
    """
    lead, Tq, Tk = q.shape[:-2], q.shape[-2], k.shape[-2]
    qs = q * s  # scale the (Tq, hs) queries, not the (Tq, Tk) scores
    m_max = min(block, Tq)  # queries in the largest block
    above = np.triu(np.ones((m_max, m_max), dtype=bool), k=1)  # above[a, c]: key c is after query a
    for ix in np.ndindex(*lead):
        off = (Tk if key_lengths is None else int(key_lengths[ix[0]])) - Tq
        for r0 in range(0, Tq, block):
            r1 = min(r0 + block, Tq)
            n, m = off + r1, r1 - r0  # keys visible to the block's last query; queries in block
            slab = p[ix][r0:r1, :n]  # (m, n)
            np.matmul(qs[ix][r0:r1], k[ix][:n].T, out=slab)  # (m, hs) @ (hs, n) -> (m, n)
            np.copyto(slab[:, n - m:], -np.inf, where=above[:m, :m])  # the diagonal block's future
            slab -= slab.max(axis=-1, keepdims=True)
            np.exp(slab, out=slab)
            slab /= slab.sum(axis=-1, keepdims=True)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, block: int = 128):
    """The fused causal kernel inside ``attention_training`` (not an entry of its own; kept
    addressable as ``ops.attention`` so model-level negative controls can swap it).

    q, k, v (B, nh, T, hs) -> (B, nh, T, hs): softmax(mask(Q K^T / sqrt hs)) V, with P
    computed ``block`` query rows at a time (``_softmax_blocked``) and saved for backward.
    With S the scaled scores:
        dV = P^T dY;  dP = dY V^T;  dS = P * (dP - rowsum(dP * P));
        dQ = dS K / sqrt(hs);  dK = dS^T Q / sqrt(hs).
    """
    s = _check_attention_inputs(q, k, v, None)
    block = _check_block(block)
    p = np.zeros((*q.shape[:-1], k.shape[-2]), dtype=q.dtype)  # (.., Tq, Tk); masked entries stay 0
    _softmax_blocked(q, k, s, None, block, p)
    out = p @ v  # (.., Tq, Tk) @ (.., Tk, hs) -> (.., Tq, hs)

    def backward(dout):
        dv = np.swapaxes(p, -1, -2) @ dout  # (.., Tk, Tq) @ (.., Tq, hs)
        dp = dout @ np.swapaxes(v, -1, -2)  # (.., Tq, hs) @ (.., hs, Tk)
        ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
        ds *= s
        dq = ds @ k  # (.., Tq, Tk) @ (.., Tk, hs)
        dk = np.swapaxes(ds, -1, -2) @ q  # (.., Tk, Tq) @ (.., Tq, hs)
        return dq, dk, dv
    return out, backward


def split_heads(qkv: np.ndarray, n_head: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views q, k, v, each (B, nh, T, hs), of the fused projection qkv (B, T, 3C)."""
    B, T, C3 = qkv.shape
    heads = qkv.reshape(B, T, 3, n_head, C3 // (3 * n_head)).transpose(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
    return heads[0], heads[1], heads[2]


def merge_heads(y: np.ndarray) -> np.ndarray:
    """Heads side by side again: y (B, nh, T, hs) -> (B, T, nh * hs)."""
    B, nh, T, hs = y.shape
    return y.transpose(0, 2, 1, 3).reshape(B, T, nh * hs)  # (B, T, nh, hs) -> (B, T, C)


def attention_training(qkv: np.ndarray, *, n_head: int, block: int = 128):
    """TRAINING entry: causal multi-head self-attention straight from the fused projection,
    heads merged: qkv (B, T, 3C) -> (B, T, C), with a hand-derived backward.

    Equal to ``attention_reference`` on the split heads (tests/test_ops.py), but one graph
    node instead of eight: the split is a view, and backward writes dq, dk, dv straight into
    one (B, T, 3C) gradient. Backward is the kernel's (``attention``), moved through the same
    (inverse) reshapes. ``block``: query rows per softmax block (memory only, same math).
    """
    _check_float(qkv)
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * n_head):
        raise ShapeError(f"attention_training: qkv {qkv.shape} must be (B, T, 3C) with C divisible "
                         f"by n_head={n_head}")
    B, T, C3 = qkv.shape
    hs = C3 // (3 * n_head)
    y, attention_backward = attention(*split_heads(qkv, n_head), block)  # (B, nh, T, hs)
    out = merge_heads(y)  # (B, T, C)

    def backward(dout):
        dy = dout.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)  # (B, nh, T, hs) view
        dqkv = np.empty((B, T, 3, n_head, hs), dtype=qkv.dtype)
        for i, d in enumerate(attention_backward(dy)):  # dq, dk, dv: (B, nh, T, hs)
            dqkv[:, :, i] = d.transpose(0, 2, 1, 3)  # (B, T, nh, hs)
        return (dqkv.reshape(B, T, C3),)
    return out, backward


def attention_inference(q: np.ndarray, k: np.ndarray, v: np.ndarray, *,
                        key_lengths: np.ndarray | None = None, block: int = 128) -> np.ndarray:
    """INFERENCE entry over a KV cache: causal attention with no backward -> (B, nh, Tq, hs).

    q (B, nh, Tq, hs) are the newest Tq positions; k, v (B, nh, Tk, hs) the cache, Tq <= Tk.
    ``key_lengths`` (B,): how many keys of each row (cache slot) are real; query i of row b
    sits at position ``key_lengths[b] - Tq + i`` and sees keys up to it. None: every row
    holds Tk.

    Nothing is kept for a backward pass, so the normalisation moves after the product:
    ``softmax(S) V = (E V) / rowsum(E)`` with ``E = exp(S - max)``. Queries are processed
    ``block`` rows at a time: with Tq <= block (decoding, short prompts) one batched block
    over every row and head; longer prompts one (row, head) and block at a time, reusing one
    (block, Tk) slab, where a column of ones after V makes one BLAS call return both E V and
    rowsum(E). Same math either way; equal to ``attention_reference`` up to round-off.
    """
    s = _check_attention_inputs(q, k, v, key_lengths)
    block = _check_block(block)
    Tq, Tk = q.shape[-2], k.shape[-2]
    if Tq <= block:
        e = q @ np.swapaxes(k, -1, -2)  # (.., Tq, hs) @ (.., hs, Tk) -> (.., Tq, Tk)
        e *= s
        visible = _visible_keys(Tq, Tk, key_lengths)
        if visible is not None:
            np.copyto(e, -np.inf, where=~visible)
        e -= e.max(axis=-1, keepdims=True)
        np.exp(e, out=e)  # E
        out = e @ v  # (.., Tq, Tk) @ (.., Tk, hs) -> (.., Tq, hs)
        out /= e.sum(axis=-1, keepdims=True)
        return out
    lead, hs = q.shape[:-2], q.shape[-1]
    out = np.empty(q.shape, dtype=q.dtype)  # (.., Tq, hs)
    scratch = np.empty((block, Tk), dtype=q.dtype)  # (block, Tk)
    v1 = np.ones((Tk, hs + 1), dtype=q.dtype)  # [V | 1] of one (row, head)
    ev1 = np.empty((block, hs + 1), dtype=q.dtype)  # [E V | rowsum E]
    qs = q * s
    above = np.triu(np.ones((block, block), dtype=bool), k=1)  # above[a, c]: key c is after query a
    for ix in np.ndindex(*lead):
        off = (Tk if key_lengths is None else int(key_lengths[ix[0]])) - Tq
        v1[:, :hs] = v[ix]
        for r0 in range(0, Tq, block):
            r1 = min(r0 + block, Tq)
            n, m = off + r1, r1 - r0  # keys visible to the block's last query; queries in block
            slab = scratch[:m, :n]
            np.matmul(qs[ix][r0:r1], k[ix][:n].T, out=slab)  # (m, hs) @ (hs, n) -> (m, n)
            np.copyto(slab[:, n - m:], -np.inf, where=above[:m, :m])
            slab -= slab.max(axis=-1, keepdims=True)
            np.exp(slab, out=slab)  # E
            np.matmul(slab, v1[:n], out=ev1[:m])  # (m, n) @ (n, hs + 1) -> (m, hs + 1)
            np.divide(ev1[:m, :hs], ev1[:m, hs:], out=out[ix][r0:r1])  # (E V) / rowsum(E)
    return out


def cached_attention(qkv: np.ndarray, cache_k: np.ndarray, cache_v: np.ndarray, *, layer: int,
                     rows: np.ndarray, start: np.ndarray, n_head: int, block: int = 128) -> np.ndarray:
    """``attention_inference`` for new tokens whose keys and values are already written into
    a KV cache (no backward). qkv (A, Tn, 3C): the new tokens' projections; cache_k, cache_v
    (L, slots, nh, max_len, hs); token i of row a (cache slot rows[a]) sits at position
    start[a] + i -> (A, Tn, C), heads merged.

    Reads each row's cache up to the longest row's length (a view when the rows are one
    ascending run of slots, else a gathered copy) and masks the rest with key_lengths.
    ``kernels.cached_attention`` is the fast path's, reading each slot to its own length.
    """
    A, Tn, _ = qkv.shape
    rows = np.asarray(rows)
    run = len(rows) and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows)))
    index = np.s_[int(rows[0]):int(rows[0]) + len(rows)] if run else rows  # (ops.slice shadows slice)
    lengths = np.asarray(start) + Tn  # (A,)
    Tk = int(lengths.max())
    q, _, _ = split_heads(qkv, n_head)  # (A, nh, Tn, hs)
    keys = cache_k[layer, index, :, :Tk]  # (A, nh, Tk, hs)
    values = cache_v[layer, index, :, :Tk]
    same = bool(np.all(lengths == Tk))
    y = attention_inference(q, keys, values, key_lengths=None if same else lengths, block=block)
    return merge_heads(y)  # (A, Tn, C)


class ReferenceAttention(NamedTuple):
    """Every intermediate of the reference chain, for recorders that store them (trace)."""
    scores: np.ndarray  # S = Q K^T / sqrt(hs), (B, nh, Tq, Tk)
    masked: np.ndarray  # S with future (and unfilled cache) keys set to -inf
    probs: np.ndarray  # P = softmax(masked)
    out: np.ndarray  # P V, (B, nh, Tq, hs)
    backward: Backward  # dout -> (dq, dk, dv)


def attention_reference_steps(q: np.ndarray, k: np.ndarray, v: np.ndarray, *,
                              key_lengths: np.ndarray | None = None) -> ReferenceAttention:
    """``attention_reference`` with its intermediates kept (same chain, same arrays)."""
    _check_attention_inputs(q, k, v, key_lengths)
    scores, b_scores = attention_scores(q, k)  # (B, nh, Tq, Tk)
    masked, b_mask = causal_mask(scores, key_lengths=key_lengths)
    probs, b_softmax = softmax(masked)
    out, b_out = attention_output(probs, v)  # (B, nh, Tq, hs)

    def backward(dout):
        dp, dv = b_out(dout)
        dq, dk = b_scores(*b_mask(*b_softmax(dp)))
        return dq, dk, dv
    return ReferenceAttention(scores, masked, probs, out, backward)


def attention_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, *,
                        key_lengths: np.ndarray | None = None):
    """REFERENCE path: the unfused four-op chain, each op with its own derived backward:
    ``attention_scores`` (S = Q K^T / sqrt hs), ``causal_mask``, ``softmax``,
    ``attention_output`` (P V). q (B, nh, Tq, hs), k, v (B, nh, Tk, hs) -> (B, nh, Tq, hs);
    ``key_lengths`` as in ``attention_inference``. Slow and O(T^2) in memory; it is what
    ``attention_training`` and ``attention_inference`` are checked against.
    """
    ref = attention_reference_steps(q, k, v, key_lengths=key_lengths)
    return ref.out, ref.backward


# ------------------------------------------------------------------------- dropout

def dropout(x: np.ndarray, *, p: float, rng: np.random.Generator | None):
    """Inverted dropout: zero each element with probability p, scale survivors by 1/(1-p).

    dx = dout * mask / (1 - p). p == 0 or rng None is the identity (evaluation).
    """
    _check_float(x)
    if not 0.0 <= p < 1.0:
        raise InputError(f"dropout probability must be in [0, 1), got {p}")
    if p == 0.0 or rng is None:
        return x, lambda dout: (dout,)
    keep = (rng.random(x.shape, dtype=np.float32 if x.dtype == np.float32 else np.float64) >= p)
    mask = keep.astype(x.dtype) * (1.0 / (1.0 - p))
    out = x * mask

    def backward(dout):
        return (dout * mask,)
    return out, backward
