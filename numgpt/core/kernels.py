"""The fast path: compiled kernels (numba) for every op that is not a large GEMM.

Each kernel fuses into one sweep what its reference op in ``ops.py`` does in several NumPy
passes, and each kernel's docstring names that op. The op-level functions at the bottom of
this file have the reference signatures, ``f(*arrays, **consts) -> (out, backward)``, so
``ops_for("fast")`` and ``ops_for("reference")`` are interchangeable namespaces that the
layers receive from the config (``GPTConfig.kernels``); nothing else picks a path.
``tests/test_kernels.py`` checks every kernel against its reference op in float32 and
float64, and the gradient gate runs on both namespaces.

How the kernels are written (the llm.c CPU kernels are the model):
* plain loops over C-contiguous arrays, shapes in the docstring; the wrappers reshape to
  (N, C) rows and allocate every output and scratch buffer, so no kernel allocates (the
  inference attention multiplies its small tiles with BLAS, ``np.dot`` into that scratch,
  as the reference multiplies its blocks);
* ``prange`` only on the outermost independent loop (rows, or (batch, head) pairs); the
  thread count is ``numba.set_num_threads`` (``set_threads`` here, from ``--threads``);
* sums are accumulated in float64 whatever the array dtype, so float32 results are at
  least as accurate as the reference's;
* no per-element libm call where speed matters: ``_exp`` is a Cody-Waite range reduction
  plus a degree-13 Taylor polynomial (float64-accurate, about 1 ulp) that the compiler turns
  into SIMD code; tanh is built on it. The exact GELU's normal CDF uses the same erfc fit as
  the reference float32 path (relative error < 1.2e-7) for float32, and libm ``erfc``
  (exact to float64) for float64, which only the verification gates use;
* ``fastmath`` only as ``reassoc`` + ``contract`` (reordered sums, fused multiply-adds),
  never the no-NaN/no-inf flags (masked scores are -inf); the parity tests bound the change;
* ``cache=True``: the first use compiles (see ``compile_all``) and later processes load
  the machine code from numba's on-disk cache.

Shape legend as in ``ops.py``: B, T, C, nh, hs, V, N (flattened rows).
"""

from __future__ import annotations

import math
import os
import types as types_module
import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from ..errors import ConfigError, ShapeError
from . import gemm, ops
from .threads import CACHE_ENV, kernel_cache_dir, let_openmp_threads_sleep

__all__ = ["PATHS", "FAST_OPS", "OpPath", "ops_for", "set_threads", "compile_all",
           "layernorm", "gelu", "gelu_tanh", "cross_entropy", "embedding",
           "attention_training", "attention_inference", "attention_blocked", "cached_attention",
           "adamw_update", "sum_of_squares", "argsort_stable", "tied_head_rows", "HEAD_ROWS_MAX"]

PATHS = ("fast", "reference")

# Reordered sums and fused multiply-adds only: not nnan/ninf (masked scores are -inf).
_FAST = {"reassoc", "contract"}

# numba's default "workqueue" layer may not be entered from two Python threads at once;
# the data-parallel training workers and the server's threads do exactly that. OpenMP may.
numba.config.THREADING_LAYER = "omp"
let_openmp_threads_sleep()  # before the pool starts: its spinning threads starve BLAS
# Where the compiled kernels are cached (core/threads.py chose it when numgpt was imported);
# numba read NUMBA_CACHE_DIR when it loaded, which was earlier if the user imported it first.
CACHE_DIR = kernel_cache_dir()
if os.environ.get(CACHE_ENV):
    numba.config.CACHE_DIR = os.environ[CACHE_ENV]


# Below this many elements in its largest array a kernel runs its serial build: waking the
# other threads costs more than the work (and on a busy machine a thread may wait a whole
# scheduler slice). Both builds compute every element with the same code in the same order,
# so the results are bit-identical; this picks threads, never the math or the path.
PARALLEL_MIN_ELEMENTS = 1 << 15


class _Kernel:
    """A kernel compiled twice from one Python function: ``parallel`` (its ``prange`` loop
    spread over numba's threads) and ``serial`` (the same loop on the calling thread)."""

    def __init__(self, fn, fastmath):
        # nogil: the data-parallel training workers and the server call kernels from several
        # Python threads at once, as they call NumPy (which releases the GIL too)
        # error_model="numpy" (a float division by zero gives inf or nan, as in NumPy, instead
        # of raising): numba compiles prange bodies that way already, and under the default
        # "python" model the check before every division kept the serial build's loops scalar:
        # the tanh GELU of 3072 float32 values took 30 us serial and 4.8 us in the same loop
        # without it (a 2-vCPU EPYC), with the same bits. Both builds now share it.
        options = dict(cache=True, nogil=True, fastmath=fastmath, error_model="numpy")
        self.parallel = njit(parallel=True, **options)(fn)
        # a distinct qualified name keeps the two builds apart in numba's on-disk cache
        twin = types_module.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                         fn.__defaults__, fn.__closure__)
        twin.__qualname__ = fn.__qualname__ + "_serial"
        self.serial = njit(**options)(twin)
        self.__name__, self.__doc__ = fn.__name__, fn.__doc__

    def __call__(self, *args):
        work = max((a.size for a in args if isinstance(a, np.ndarray)), default=0)
        return (self.parallel if work >= PARALLEL_MIN_ELEMENTS else self.serial)(*args)


def _kernel(fastmath=False):
    return lambda fn: _Kernel(fn, fastmath)


def set_threads(n: int) -> None:
    """Threads the kernels' ``prange`` loops use (``--threads``); at most numba's maximum."""
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


# ------------------------------------------------------------------- special functions

@intrinsic
def _float64_from_bits(typingctx, bits):
    """The float64 whose IEEE bit pattern is the int64 ``bits`` (a free SIMD bitcast)."""
    sig = types.float64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float64))
    return sig, codegen


_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # fdlibm's split of ln 2: n * LN2_HI is exact
_LN2_LO = 1.90821492927058770002e-10


@njit(cache=True, inline="always")
def _exp(x):
    """e^x for float64 x, about 1 ulp, no libm call (so loops around it vectorise).

    x = n ln2 + r with |r| <= ln2 / 2 (n ln2 in two parts, exact), e^r by Taylor to r^13
    (truncation < 4e-18 relative), and 2^n by writing n into the exponent bits.
    Below -708 the result is 0 (e^-708 is the smallest normal float64); above 709, inf.
    Branch-free (clamps and selects) so the compiler keeps it in SIMD registers.
    """
    xc = min(max(x, -708.0), 709.0)
    n = np.floor(xc * _LOG2E + 0.5)
    r = (xc - n * _LN2_HI) - n * _LN2_LO
    p = 1.0 / 6227020800.0  # 1/13!
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    y = p * _float64_from_bits(np.int64(n + 1023.0) << 52)
    y = 0.0 if x < -708.0 else y
    return np.inf if x > 709.0 else y


@njit(cache=True, inline="always")
def _tanh(u):
    """tanh(u) = sign(u) (1 - 2 / (e^{2|u|} + 1)); absolute error about 2e-16 (what GELU
    needs: it uses 1 + tanh and 1 - tanh^2), from ``_exp``; |u| > 20 is +-1 exactly."""
    a = min(abs(u), 20.0)
    t = 1.0 - 2.0 / (_exp(2.0 * a) + 1.0)
    return t if u >= 0 else -t


_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_E0, _E1, _E2, _E3, _E4, _E5, _E6, _E7, _E8, _E9 = ops._ERFC_FIT


@njit(cache=True, inline="always")
def _normal_cdf_fit(x):
    """Phi(x) from the reference's float32 erfc fit (``ops._normal_cdf_float32``), in float64
    arithmetic: Phi(-|x|) = t e^(-z^2 + P(t)) / 2, z = |x| / sqrt 2, t = 1 / (1 + z / 2)."""
    z = abs(x) * _SQRT_HALF
    t = 1.0 / (1.0 + 0.5 * z)
    p = ((((((((_E9 * t + _E8) * t + _E7) * t + _E6) * t + _E5) * t + _E4) * t + _E3) * t
          + _E2) * t + _E1) * t + _E0
    left = 0.5 * t * _exp(p - z * z)  # Phi(-|x|), accurate in the left tail
    return 1.0 - left if x > 0 else left


# --------------------------------------------------------------------------- layernorm

@_kernel(fastmath=_FAST)
def layernorm_forward(out, mean, rstd, x, gamma, beta, eps):
    """``ops.layernorm`` forward: x (N, C), gamma (C,), beta (C,) -> out (N, C), and the
    statistics backward needs, mean (N,) and rstd (N,) (float64). Each row is read from
    memory once; its three sweeps (sum, squared deviations, output) hit the cache."""
    N, C = x.shape
    for i in prange(N):
        s = 0.0
        for c in range(C):
            s += x[i, c]
        m = s / C
        v = 0.0
        for c in range(C):
            d = x[i, c] - m
            v += d * d
        r = 1.0 / math.sqrt(v / C + eps)
        for c in range(C):
            out[i, c] = (x[i, c] - m) * r * gamma[c] + beta[c]
        mean[i] = m
        rstd[i] = r


@_kernel(fastmath=_FAST)
def layernorm_backward(dx, dgamma_parts, dbeta_parts, dout, x, mean, rstd, gamma):
    """``ops.layernorm`` backward: dout, x (N, C), mean, rstd (N,), gamma (C,) -> dx (N, C)
    and per-chunk partial sums dgamma_parts, dbeta_parts (P, C) float64, zero on entry.

    With xhat = (x - mean) rstd and g = dout gamma:
    dx = rstd (g - mean(g) - xhat mean(g xhat)); dgamma = sum dout xhat; dbeta = sum dout.
    The rows are split into P fixed chunks (not one per thread), so the sums are the same
    whatever the thread count; the caller adds the P partials.
    """
    N, C = x.shape
    P = dgamma_parts.shape[0]
    for p in prange(P):
        for i in range(p * N // P, (p + 1) * N // P):
            m, r = mean[i], rstd[i]
            sg = 0.0
            sgx = 0.0
            for c in range(C):
                xh = (x[i, c] - m) * r
                g = dout[i, c] * gamma[c]
                sg += g
                sgx += g * xh
                dgamma_parts[p, c] += dout[i, c] * xh
                dbeta_parts[p, c] += dout[i, c]
            sg /= C
            sgx /= C
            for c in range(C):
                xh = (x[i, c] - m) * r
                dx[i, c] = r * (dout[i, c] * gamma[c] - sg - xh * sgx)


# ------------------------------------------------------------------------------- GELU

@_kernel(fastmath=_FAST)
def gelu_tanh_forward(out, x):
    """``ops.gelu_tanh`` forward, x (n,) -> out (n,): 0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3)))."""
    for i in prange(x.shape[0]):
        xi = np.float64(x[i])
        t = _tanh(_SQRT_2_OVER_PI * (xi + 0.044715 * xi * xi * xi))
        out[i] = 0.5 * xi * (1.0 + t)


@_kernel(fastmath=_FAST)
def gelu_tanh_backward(dx, dout, x):
    """``ops.gelu_tanh`` backward, recomputing tanh from x (nothing saved but x):
    dx = dout (0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2))."""
    for i in prange(x.shape[0]):
        xi = np.float64(x[i])
        t = _tanh(_SQRT_2_OVER_PI * (xi + 0.044715 * xi * xi * xi))
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * xi * xi)
        dx[i] = dout[i] * (0.5 * (1.0 + t) + 0.5 * xi * (1.0 - t * t) * du)


@_kernel(fastmath=_FAST)
def gelu_forward_fit(out, cdf, x):
    """``ops.gelu`` forward for float32, x (n,) -> out (n,) = x Phi(x) and cdf (n,) = Phi(x)
    (kept for backward, as the reference keeps it), Phi from the erfc fit."""
    for i in prange(x.shape[0]):
        xi = np.float64(x[i])
        c = _normal_cdf_fit(xi)
        cdf[i] = c
        out[i] = xi * c


@_kernel(fastmath=_FAST)
def gelu_backward_fit(dx, dout, x, cdf):
    """``ops.gelu`` backward for float32: dx = dout (Phi(x) + x phi(x)), phi = e^(-x^2/2)/sqrt(2 pi)."""
    for i in prange(x.shape[0]):
        xi = np.float64(x[i])
        dx[i] = dout[i] * (cdf[i] + xi * _INV_SQRT_2PI * _exp(-0.5 * xi * xi))


@_kernel(fastmath=_FAST)
def gelu_forward_exact(out, x):
    """``ops.gelu`` forward for float64 (the gates): Phi(x) = erfc(-x / sqrt 2) / 2 from libm,
    exact in both tails."""
    for i in prange(x.shape[0]):
        xi = x[i]
        out[i] = xi * 0.5 * math.erfc(-xi * _SQRT_HALF)


@_kernel(fastmath=_FAST)
def gelu_backward_exact(dx, dout, x):
    """``ops.gelu`` backward for float64: dx = dout (Phi(x) + x phi(x))."""
    for i in prange(x.shape[0]):
        xi = x[i]
        cdf = 0.5 * math.erfc(-xi * _SQRT_HALF)
        dx[i] = dout[i] * (cdf + xi * _INV_SQRT_2PI * _exp(-0.5 * xi * xi))


# ----------------------------------------------------------------------- cross-entropy

@_kernel(fastmath=_FAST)
def cross_entropy_forward(lse, inv_sum, nll, e, logits, targets, ignore_index):
    """``ops.cross_entropy`` forward: logits (N, V), targets (N,) -> e (N, V) = exp(z - max z)
    (kept for backward, as the reference keeps it), lse (N,) = logsumexp of each row,
    inv_sum (N,) = 1 / sum(e), nll (N,) = lse - logits[t] (0 for ignored rows). Each row is
    read twice while it is in cache (max, then exponentials and their sum)."""
    N, V = logits.shape
    for i in prange(N):
        mx = -np.inf
        for j in range(V):
            mx = max(mx, np.float64(logits[i, j]))
        s = 0.0
        for j in range(V):
            ej = _exp(logits[i, j] - mx)
            e[i, j] = ej
            s += ej
        lse[i] = mx + math.log(s)
        inv_sum[i] = 1.0 / s
        t = targets[i]
        nll[i] = 0.0 if t == ignore_index else lse[i] - logits[i, t]


@_kernel(fastmath=_FAST)
def cross_entropy_backward(dlogits, e, inv_sum, targets, ignore_index, c):
    """``ops.cross_entropy`` backward: dlogits (N, V) = c (softmax(z_i) - onehot(t_i)) with
    softmax = e * inv_sum, 0 for ignored rows; c = dloss / n. One sweep over e."""
    N, V = e.shape
    for i in prange(N):
        t = targets[i]
        scale = 0.0 if t == ignore_index else c * inv_sum[i]
        for j in range(V):
            dlogits[i, j] = e[i, j] * scale
        if t != ignore_index:
            dlogits[i, t] -= c


# --------------------------------------------------------------------------- embedding

@_kernel()
def embedding_backward(dw, ids, dout):
    """``ops.embedding`` backward: dw (V, C) zero on entry += dout (N, C) rows at ids (N,).

    Repeated ids accumulate. Threads split the C columns, not the rows, so no two threads
    write one element and each element sums its rows in row order (deterministic)."""
    N, C = dout.shape
    P = min(C, 64)
    for p in prange(P):
        c0, c1 = p * C // P, (p + 1) * C // P
        for n in range(N):
            row = ids[n]
            for c in range(c0, c1):
                dw[row, c] += dout[n, c]


# --------------------------------------------------------------------------- attention

# Layout: each (row, head) first copies its keys transposed, kT (hs, n), and its values,
# (n, hs), into contiguous scratch; then the scores of one query are sum_e q_e kT[e, :],
# a sweep along contiguous keys, and P V is sum_j p_j V[j, :], a sweep along the head
# dimension: both vectorise. Reading keys as rows would need one horizontal sum per key.

@njit(cache=True, fastmath=_FAST, error_model="numpy")  # as _Kernel's builds
def _scores(s, q, kT, n, scale):
    """s[:n] = (q . kT[:, j]) * scale for j < n: q (hs,), kT (hs, >= n)."""
    for j in range(n):
        s[j] = 0.0
    for e in range(q.shape[0]):
        qe = q[e] * scale
        for j in range(n):
            s[j] += qe * kT[e, j]


@njit(cache=True, fastmath=_FAST, error_model="numpy")  # as _Kernel's builds
def _softmax_times_v(y, s, n, values):
    """Softmax of s[:n] in place (as probabilities), y (hs,) = P V over values (>= n, hs);
    returns log(sum of exponentials) + max, the row's log-sum-exp."""
    mx = -np.inf
    for j in range(n):
        mx = max(mx, s[j])
    total = 0.0
    for j in range(n):
        s[j] = _exp(s[j] - mx)
        total += s[j]
    inv = 1.0 / total
    for e in range(y.shape[0]):
        y[e] = 0.0
    for j in range(n):
        p = s[j] * inv
        s[j] = p
        for e in range(y.shape[0]):
            y[e] += p * values[j, e]
    return mx + math.log(total)


@_kernel(fastmath=_FAST)
def attention_forward(out, lse, qkv, n_head, kT, vals, scores, y):
    """``ops.attention_training`` forward, causal: qkv (B, T, 3C) -> out (B, T, C) heads
    merged, and lse (B, nh, T) = each query's log-sum-exp of scores, which is all backward
    needs to rebuild P. Scratch per (b, h): kT (B * nh, hs, T), vals (B * nh, T, hs),
    scores (B * nh, T), y (B * nh, hs).

    Query i sees keys j <= i: the masked upper triangle is never computed. Heads are read
    straight out of qkv (q at column h hs, k at C + h hs, v at 2C + h hs).
    """
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    scale = 1.0 / math.sqrt(hs)
    for bh in prange(B * n_head):
        b, h = bh // n_head, bh % n_head
        qo, ko, vo = h * hs, C + h * hs, 2 * C + h * hs
        for j in range(T):
            for e in range(hs):
                kT[bh, e, j] = qkv[b, j, ko + e]
                vals[bh, j, e] = qkv[b, j, vo + e]
        for i in range(T):
            _scores(scores[bh], qkv[b, i, qo:qo + hs], kT[bh], i + 1, scale)
            lse[b, h, i] = _softmax_times_v(y[bh], scores[bh], i + 1, vals[bh])
            for e in range(hs):
                out[b, i, qo + e] = y[bh, e]


@_kernel(fastmath=_FAST)
def attention_backward(dqkv, dout, qkv, out, lse, n_head, kT, vT, dkT, dvT, p, dp):
    """``ops.attention_training`` backward: dout, out (B, T, C), qkv (B, T, 3C), lse (B, nh, T)
    -> dqkv (B, T, 3C). Scratch per (b, h): kT, vT, dkT, dvT (B * nh, hs, T), p, dp (B * nh, T).

    P_ij = exp(q_i.k_j s - lse_i) is rebuilt per query (s = 1/sqrt hs). With
    dP_ij = dout_i.v_j and D_i = sum_j P_ij dP_ij = dout_i.out_i:
    dS = P (dP - D); dq_i = s sum_j dS_ij k_j; dk_j = s sum_i dS_ij q_i; dv_j = sum_i P_ij dout_i.
    """
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    scale = 1.0 / math.sqrt(hs)
    for bh in prange(B * n_head):
        b, h = bh // n_head, bh % n_head
        qo, ko, vo = h * hs, C + h * hs, 2 * C + h * hs
        for j in range(T):
            for e in range(hs):
                kT[bh, e, j] = qkv[b, j, ko + e]
                vT[bh, e, j] = qkv[b, j, vo + e]
                dkT[bh, e, j] = 0.0
                dvT[bh, e, j] = 0.0
        pb, dpb = p[bh], dp[bh]
        for i in range(T):
            n = i + 1
            D = 0.0
            for e in range(hs):
                D += dout[b, i, qo + e] * out[b, i, qo + e]
            _scores(pb, qkv[b, i, qo:qo + hs], kT[bh], n, scale)
            _scores(dpb, dout[b, i, qo:qo + hs], vT[bh], n, 1.0)
            li = lse[b, h, i]
            for j in range(n):
                pj = _exp(pb[j] - li)
                pb[j] = pj
                dpb[j] = pj * (dpb[j] - D) * scale  # dS
            for e in range(hs):
                qe, de = qkv[b, i, qo + e], dout[b, i, qo + e]
                acc = 0.0
                for j in range(n):
                    acc += dpb[j] * kT[bh, e, j]
                    dkT[bh, e, j] += dpb[j] * qe
                    dvT[bh, e, j] += pb[j] * de
                dqkv[b, i, qo + e] = acc
        for j in range(T):
            for e in range(hs):
                dqkv[b, j, ko + e] = dkT[bh, e, j]
                dqkv[b, j, vo + e] = dvT[bh, e, j]


@njit(cache=True, fastmath=_FAST, error_model="numpy")  # as _Kernel's builds
def _scores_from_rows(s, q, keys, n, scale):
    """s[:n] = (q . keys[j]) * scale for j < n: q (hs,), keys (>= n, hs) read row by row (one
    query reads each key once, so transposing the keys first would only add a pass)."""
    for j in range(n):
        d = 0.0
        for e in range(q.shape[0]):
            d += q[e] * keys[j, e]
        s[j] = d * scale


@_kernel(fastmath=_FAST)
def cached_attention_kernel(out, qkv, cache_k, cache_v, layer, rows, start, n_head, kT, scores, y):
    """``ops.attention_inference`` over a KV cache: qkv (A, Tn, 3C) holds the new tokens
    (their keys and values already written to the cache), cache_k, cache_v
    (L, slots, nh, max_len, hs), rows (A,) the slots, start (A,) each slot's length before
    the new tokens -> out (A, Tn, C) heads merged. Scratch: kT (A * nh, hs, max_len),
    scores (A * nh, max_len), y (A * nh, hs).

    New token i of row a sits at position start[a] + i and reads keys 0..start[a] + i of its
    own slot only: each slot's used length, never the padding up to the longest slot, and
    never a gathered copy of the cache.
    """
    A, Tn, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    scale = 1.0 / math.sqrt(hs)
    for ah in prange(A * n_head):
        a, h = ah // n_head, ah % n_head
        keys = cache_k[layer, rows[a], h]  # (max_len, hs)
        n_all = start[a] + Tn
        if Tn > 1:  # several queries share each key: transpose once (see _scores)
            for j in range(n_all):
                for e in range(hs):
                    kT[ah, e, j] = keys[j, e]
        for i in range(Tn):
            n = start[a] + i + 1
            if Tn > 1:
                _scores(scores[ah], qkv[a, i, h * hs:(h + 1) * hs], kT[ah], n, scale)
            else:
                _scores_from_rows(scores[ah], qkv[a, i, h * hs:(h + 1) * hs], keys, n, scale)
            _softmax_times_v(y[ah], scores[ah], n, cache_v[layer, rows[a], h])
            for e in range(hs):
                out[a, i, h * hs + e] = y[ah, e]


@_kernel(fastmath=_FAST)
def attention_inference_kernel(out, q, k, v, lengths, kT, scores, y):
    """``ops.attention_inference``: q (B, nh, Tq, hs), k, v (B, nh, Tk, hs) (any strides, so
    head-split views need no copy), lengths (B,) the real keys of each row -> out
    (B, nh, Tq, hs). Query i of row b sits at position lengths[b] - Tq + i and reads keys up
    to it only. Scratch: kT (B * nh, hs, Tk), scores (B * nh, Tk), y (B * nh, hs)."""
    B, nh, Tq, hs = q.shape
    scale = 1.0 / math.sqrt(hs)
    for bh in prange(B * nh):
        b, h = bh // nh, bh % nh
        for j in range(lengths[b]):
            for e in range(hs):
                kT[bh, e, j] = k[b, h, j, e]
        for i in range(Tq):
            n = lengths[b] - Tq + i + 1
            _scores(scores[bh], q[b, h, i], kT[bh], n, scale)
            _softmax_times_v(y[bh], scores[bh], n, v[b, h])
            for e in range(hs):
                out[b, h, i, e] = y[bh, e]


@_kernel(fastmath=_FAST)
def attention_blocked_kernel(out, q, keys, values, kv_rows, lengths, block, qt, kt, vv, st, pv,
                             acc, row_max, row_sum):
    """``ops.attention_inference`` (equal to ``ops.attention_reference``) for many queries,
    blocked, with an online softmax: nothing (Tq, Tk) is ever held.

    q (B, nh, Tq, hs); keys, values (S, nh, Tk, hs) (any strides: head-split views of qkv,
    or one layer of the KV cache); kv_rows (B,) the row of keys each query row reads;
    lengths (B,) its real keys: query i of row b sits at position lengths[b] - Tq + i and
    sees keys up to it -> out (B, nh, Tq, hs) (any strides: a view of the heads-merged array).

    Work item (b, h, query block of ``block`` rows) walks the key blocks its last query sees;
    per key block: S = (Q / sqrt(hs)) K^T into a (block, block) tile, then per query row, up
    to its causal cut, with running max M and sum L: M' = max(M, max_j S_j), c = e^(M - M'),
    P_j = e^(S_j - M') (0 past the cut), L' = c L + sum_j P_j, A' = c A + P V (A (block, hs),
    float64); finally out = A / L. The two tile products are BLAS calls in the arrays' dtype
    (``np.dot`` into scratch), as the reference's products are; the softmax arithmetic is
    float64. The items are dealt round-robin to P slots of scratch (P = qt.shape[0], one per
    thread): qt, kt, vv (P, block, hs) the scaled queries, keys and values of the tiles;
    st (P, block * block) the scores, then P; pv (P, block * hs) the tile's P V (all in the
    arrays' dtype); acc (P, block, hs), row_max, row_sum (P, block) float64. Each item's
    arithmetic is the same whatever P.
    """
    B, nh, Tq, hs = q.shape
    P = qt.shape[0]
    scale = 1.0 / math.sqrt(hs)
    n_qb = (Tq + block - 1) // block
    n_items = B * nh * n_qb
    for t in prange(P):
        a, mx, sm = acc[t], row_max[t], row_sum[t]
        for item in range(t, n_items, P):
            b, h, r0 = item // (nh * n_qb), (item // n_qb) % nh, (item % n_qb) * block
            m = min(block, Tq - r0)
            first = lengths[b] - Tq + r0  # position of the block's first query
            kv = kv_rows[b]
            for i in range(m):
                mx[i] = -np.inf
                sm[i] = 0.0
                for e in range(hs):
                    qt[t, i, e] = q[b, h, r0 + i, e] * scale
                    a[i, e] = 0.0
            for c0 in range(0, first + m, block):  # key blocks up to the last query's position
                w = min(block, first + m - c0)
                for j in range(w):
                    for e in range(hs):
                        kt[t, j, e] = keys[kv, h, c0 + j, e]
                        vv[t, j, e] = values[kv, h, c0 + j, e]
                s = st[t, :m * w].reshape(m, w)
                np.dot(qt[t, :m], kt[t, :w].T, s)  # (m, hs) @ (hs, w) -> (m, w)
                for i in range(m):
                    n = max(0, min(w, first + i + 1 - c0))  # keys of this block query i sees
                    new = mx[i]
                    for j in range(n):
                        new = max(new, np.float64(s[i, j]))
                    c = _exp(mx[i] - new)  # 0 on the row's first block (M = -inf)
                    total = 0.0
                    for j in range(n):
                        p = _exp(s[i, j] - new)
                        s[i, j] = p
                        total += s[i, j]  # the rounded P that multiplies V
                    for j in range(n, w):
                        s[i, j] = 0.0  # past the causal cut
                    if n > 0:
                        sm[i] = sm[i] * c + total
                        mx[i] = new
                        for e in range(hs):
                            a[i, e] *= c
                y = pv[t, :m * hs].reshape(m, hs)
                np.dot(s, vv[t, :w], y)  # (m, w) @ (w, hs) -> (m, hs)
                for i in range(m):
                    for e in range(hs):
                        a[i, e] += y[i, e]
            for i in range(m):
                inv = 1.0 / sm[i]
                for e in range(hs):
                    out[b, h, r0 + i, e] = a[i, e] * inv


# ---------------------------------------------------------------------- stable argsort

_DIGIT_BITS = 11  # 2048 buckets: three passes over a 32-bit key, six over a 64-bit one


@_kernel()
def radix_argsort_rows(order, keys, tmp, counts, passes):
    """``np.argsort(x, axis=-1, kind="stable")`` of each row, given keys (N, V) uint64 that
    order like the row's values (``_sort_keys``) -> order (N, V) int64. Scratch: tmp (N, V)
    int64, counts (N, 2048) int64.

    Least-significant-digit radix sort: ``passes`` stable counting sorts, one per 11-bit
    digit from the lowest; each keeps the order of equal digits, so equal keys stay in index
    order, as the stable sort keeps them. A pass whose digit is the same for the whole row
    is skipped (a row that is mostly -inf after a top-k filter)."""
    N, V = keys.shape
    mask = np.uint64((1 << _DIGIT_BITS) - 1)
    for i in prange(N):
        o, t, c = order[i], tmp[i], counts[i]
        for j in range(V):
            o[j] = j
        for p in range(passes):
            shift = np.uint64(_DIGIT_BITS * p)
            for d in range(c.shape[0]):
                c[d] = 0
            for j in range(V):
                c[(keys[i, j] >> shift) & mask] += 1
            if c[(keys[i, 0] >> shift) & mask] == V:
                continue  # one digit for the whole row: this pass would change nothing
            total = 0
            for d in range(c.shape[0]):
                n = c[d]
                c[d] = total
                total += n
            for j in range(V):
                k = o[j]
                d = (keys[i, k] >> shift) & mask
                t[c[d]] = k
                c[d] += 1
            for j in range(V):
                o[j] = t[j]


# ------------------------------------------------------------------------------ AdamW

@_kernel(fastmath=_FAST)
def sum_of_squares(grad, piece_start, piece_end, partial):
    """sum g^2 of flat grad (n,) over each piece [piece_start[k], piece_end[k]) -> partial (K,)
    float64; the caller adds the K partials in order (same total for any thread count)."""
    for k in prange(piece_start.shape[0]):
        s = 0.0
        for i in range(piece_start[k], piece_end[k]):
            s += np.float64(grad[i]) * grad[i]
        partial[k] = s


@_kernel()
def adamw_update(param, grad, exp_avg, exp_avg_sq, piece_start, piece_end, piece_owner,
                 keep, step_size, bc2_sqrt, active, one_minus_b1, beta2, one_minus_b2, eps,
                 grad_scale):
    """``optim.AdamW`` (reference: one NumPy pass per operation per parameter) in one sweep
    over the flat buffers param, grad, exp_avg, exp_avg_sq (n,), with the clipping factor
    ``grad_scale`` applied on the fly. Pieces (K,) of at most a few thousand elements cut
    the buffer for the threads; piece k belongs to parameter piece_owner[k], whose
    keep = 1 - lr wd, lr / (1 - b1^t), sqrt(1 - b2^t) and active flag (it had a gradient) are
    indexed by it. Every scalar comes in the buffers' dtype, so float32 runs in float32 SIMD
    like the reference. torch's order of operations:
        p <- p keep; m <- m + (1 - b1)(g - m); v <- v b2 + (1 - b2) g g;
        p <- p - step_size m / (sqrt(v) / bc2_sqrt + eps)
    """
    for k in prange(piece_start.shape[0]):
        o = piece_owner[k]
        if not active[o]:
            continue
        kp, ss, bc = keep[o], step_size[o], bc2_sqrt[o]
        for i in range(piece_start[k], piece_end[k]):
            g = grad[i] * grad_scale
            m = exp_avg[i] + one_minus_b1 * (g - exp_avg[i])
            v = exp_avg_sq[i] * beta2 + one_minus_b2 * (g * g)
            exp_avg[i] = m
            exp_avg_sq[i] = v
            param[i] = param[i] * kp - ss * (m / (np.sqrt(v) / bc + eps))


# ---------------------------------------------------------------- op-level functions
# Same signatures and checks as the reference ops; each returns (out, backward).

def _rows(a: np.ndarray) -> np.ndarray:
    """a (..., C) as a C-contiguous (N, C) array (a view when it already is one)."""
    return np.ascontiguousarray(a).reshape(-1, a.shape[-1])


def _flat(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1)


_REDUCTION_CHUNKS = 32  # fixed row chunks of the layernorm parameter gradients


def layernorm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray | None = None, *, eps: float = 1e-5):
    """``ops.layernorm`` on the fast path: one forward kernel saving mean and rstd (N,), one
    backward kernel. x (..., C), gamma, beta (C,) -> (..., C)."""
    ops._check_float(x, gamma, beta)
    C = x.shape[-1]
    if gamma.shape != (C,) or (beta is not None and beta.shape != (C,)):
        raise ShapeError(f"layernorm: input {x.shape} needs gamma/beta of shape ({C},), "
                         f"got {gamma.shape} and {None if beta is None else beta.shape}")
    x2 = _rows(x)  # (N, C)
    N = x2.shape[0]
    shift = np.zeros(C, x.dtype) if beta is None else beta
    out = np.empty_like(x2)
    mean, rstd = np.empty(N), np.empty(N)
    layernorm_forward(out, mean, rstd, x2, gamma, shift, float(eps))

    def backward(dout):
        P = max(1, min(_REDUCTION_CHUNKS, N))
        dx = np.empty_like(x2)
        dgamma, dbeta = np.zeros((P, C)), np.zeros((P, C))
        layernorm_backward(dx, dgamma, dbeta, _rows(dout), x2, mean, rstd, gamma)
        db = dbeta.sum(axis=0).astype(x.dtype) if beta is not None else None
        return dx.reshape(x.shape), dgamma.sum(axis=0).astype(x.dtype), db
    return out.reshape(x.shape), backward


def _elementwise(x: np.ndarray, forward_kernel, backward_kernel):
    """An elementwise op from a forward and a backward kernel over the flat x."""
    ops._check_float(x)
    xf = _flat(x)
    out = np.empty_like(xf)
    forward_kernel(out, xf)

    def backward(dout):
        dx = np.empty_like(xf)
        backward_kernel(dx, _flat(dout), xf)
        return (dx.reshape(x.shape),)
    return out.reshape(x.shape), backward


def gelu_tanh(x: np.ndarray):
    """``ops.gelu_tanh`` on the fast path (one sweep forward, one backward, tanh recomputed)."""
    return _elementwise(x, gelu_tanh_forward, gelu_tanh_backward)


def gelu(x: np.ndarray):
    """``ops.gelu`` on the fast path: float32 uses the reference's float32 erfc fit
    (vectorised), float64 libm's erfc (exact; the verification gates run in float64)."""
    if x.dtype != np.float32:
        return _elementwise(x, gelu_forward_exact, gelu_backward_exact)
    ops._check_float(x)
    xf = _flat(x)
    out, cdf = np.empty_like(xf), np.empty_like(xf)
    gelu_forward_fit(out, cdf, xf)

    def backward(dout):
        dx = np.empty_like(xf)
        gelu_backward_fit(dx, _flat(dout), xf, cdf)
        return (dx.reshape(x.shape),)
    return out.reshape(x.shape), backward


def cross_entropy(logits: np.ndarray, *, targets: np.ndarray, ignore_index: int = -1):
    """``ops.cross_entropy`` on the fast path: one forward kernel (max, exponentials, their sum,
    the loss) and one backward sweep (softmax times dloss / n, minus it at the targets)."""
    targets = np.asarray(targets)
    ops.check_cross_entropy_inputs(logits, targets)
    V = logits.shape[-1]
    z = _rows(logits)  # (N, V)
    t = np.ascontiguousarray(targets.reshape(-1), dtype=np.int64)  # (N,)
    keep = t != ignore_index
    if np.any((t[keep] < 0) | (t[keep] >= V)):
        raise ShapeError(f"cross_entropy: target ids must lie in [0, {V}) or equal ignore_index {ignore_index}, "
                         f"got values in [{t[keep].min()}, {t[keep].max()}]")
    n = int(keep.sum())
    lse, inv_sum, nll = np.empty(len(t)), np.empty(len(t)), np.empty(len(t))
    e = np.empty_like(z)  # (N, V) exponentials, as the reference keeps them
    cross_entropy_forward(lse, inv_sum, nll, e, z, t, int(ignore_index))
    out = np.asarray(nll.sum() / max(n, 1), dtype=logits.dtype)

    def backward(dout):
        g = np.empty_like(z)
        cross_entropy_backward(g, e, inv_sum, t, int(ignore_index), float(dout) / max(n, 1))
        return (g.reshape(logits.shape),)
    return out, backward


def embedding(w: np.ndarray, *, ids: np.ndarray):
    """``ops.embedding`` on the fast path: the lookup is NumPy's; backward is one kernel."""
    out, _ = ops.embedding(w, ids=ids)  # the checks and the lookup
    flat_ids = np.ascontiguousarray(np.asarray(ids).reshape(-1), dtype=np.int64)  # (N,)

    def backward(dout):
        dw = np.zeros_like(w)
        embedding_backward(dw, flat_ids, _rows(dout).reshape(-1, w.shape[1]))
        return (dw,)
    return out, backward


# Rows up to which the tied head multiplies the embedding from the left (see tied_head).
FEW_ROWS = 64
# Rows up to which the tied head is ``tied_head_rows`` (one streaming pass over W_e): the
# 50257 x 768 head of 124M, float32, best of 30, W_e from memory, 2-vCPU AMD EPYC, ms per call
# BLAS -> this kernel: 1 thread 1 row 9.9 -> 4.7, 2 rows 21.4 -> 8.7, 4 rows 24.0 -> 17.3,
# 8 rows 28.5 -> 41.9; 2 threads 1 row 5.5 -> 3.9, 2 rows 13.8 -> 4.4, 4 rows 14.5 -> 8.9,
# 8 rows 17.0 -> 21.2. OpenBLAS's GEMV reads W_e at about half the bandwidth one thread can
# stream, and its few-row GEMM is slower still; from 8 rows the product is bound by its
# arithmetic (float64 sums here) and BLAS wins. The same holds for any BLAS that does not
# reach the read bandwidth on a matrix-vector product; the kernel's loop is plain FMA code.
HEAD_ROWS_MAX = 4


@_kernel(fastmath=_FAST)
def tied_head_rows(out, x, w):
    """``ops.tied_head`` forward for a few rows: out (M, V) = x (M, C) @ w (V, C)^T, one dot
    product per (row of w, row of x), summed in float64. prange over runs of 256 rows of w, so
    each thread streams its part of the table once (as stored) for all M rows."""
    M, C = x.shape
    V = w.shape[0]
    for c in prange((V + 255) // 256):
        for v in range(c * 256, min(V, c * 256 + 256)):
            wv = w[v]
            for m in range(M):
                xm = x[m]
                acc = 0.0
                for k in range(C):
                    acc += np.float64(wv[k]) * np.float64(xm[k])
                out[m, v] = acc


def tied_head(x: np.ndarray, w_e: np.ndarray):
    """``ops.tied_head`` on the fast path: x (..., C), W_e (V, C) -> (..., V) = x W_e^T.

    Up to ``HEAD_ROWS_MAX`` rows (batch-1 decode, a server step with few slots) the compiled
    ``tied_head_rows`` streams W_e once (measured 1.4-2.5x BLAS, see HEAD_ROWS_MAX). Above
    that, not a compiled kernel but the same product ordered for BLAS: for a few rows
    (decode: one row per cache slot) OpenBLAS repacks the large (C, V) operand on every call of
    ``x @ W_e.T``, and ``(W_e @ x^T)^T`` streams W_e as it is stored instead (measured 1.3x
    faster at 4 to 16 rows, equal at 1 and 256). Up to ``FEW_ROWS`` rows it takes that order
    (and copies the small (N, V) result to C order); more rows run the reference op. Both
    run on the selected GEMM library (``gemm.mm``). The backward is the reference's.
    tests/test_kernels.py checks both against ``ops.tied_head``.
    """
    N = int(np.prod(x.shape[:-1]))
    if N > FEW_ROWS or w_e.ndim != 2 or x.shape[-1] != w_e.shape[-1]:
        return ops.tied_head(x, w_e)  # (its checks name a shape mismatch)
    ops._check_float(x, w_e)
    x2 = x.reshape(N, w_e.shape[1])  # (N, C)
    if N <= HEAD_ROWS_MAX and x.dtype == w_e.dtype and w_e.flags.c_contiguous:
        out = np.empty((N, w_e.shape[0]), x.dtype)
        tied_head_rows(out, np.ascontiguousarray(x2), w_e)  # (N, C) . (V, C) -> (N, V)
    else:
        out = np.ascontiguousarray(gemm.mm(w_e, x2.T).T)  # (V, C) @ (C, N) -> (V, N) -> (N, V)

    def backward(dout):  # as ops.tied_head
        d2 = dout.reshape(-1, w_e.shape[0])  # (N, V)
        dx = gemm.mm(d2, w_e).reshape(x.shape)  # (N, V) @ (V, C) -> (..., C)
        dw = gemm.mm(d2.T, x2)  # (V, N) @ (N, C) -> (V, C)
        return dx, dw
    return out.reshape(*x.shape[:-1], w_e.shape[0]), backward


def _check_qkv(qkv: np.ndarray, n_head: int, name: str) -> None:
    ops._check_float(qkv)
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * n_head):
        raise ShapeError(f"{name}: qkv {qkv.shape} must be (B, T, 3C) with C divisible "
                         f"by n_head={n_head}")


def attention_training(qkv: np.ndarray, *, n_head: int, block: int = 128):
    """``ops.attention_training`` on the fast path: qkv (B, T, 3C) -> (B, T, C), causal.

    Saves only the (B, nh, T) log-sum-exp, not the (B, nh, T, T) probabilities; ``block``
    is checked as the reference's but unused (the kernel holds one query row at a time)."""
    _check_qkv(qkv, n_head, "attention_training")
    ops._check_block(block)
    qkv = np.ascontiguousarray(qkv)
    B, T, C3 = qkv.shape
    out = np.empty((B, T, C3 // 3), dtype=qkv.dtype)
    lse = np.empty((B, n_head, T))
    hs = C3 // (3 * n_head)
    BH = B * n_head
    attention_forward(out, lse, qkv, n_head, np.empty((BH, hs, T), qkv.dtype),
                      np.empty((BH, T, hs), qkv.dtype), np.empty((BH, T)), np.empty((BH, hs)))
    return out, _attention_training_backward(qkv, out, lse, n_head)


def _attention_training_backward(qkv, out, lse, n_head):
    """The backward closure of ``attention_training`` (from what forward saved)."""
    B, T, C3 = qkv.shape
    hs, BH = C3 // (3 * n_head), B * n_head

    def backward(dout):
        dqkv = np.empty_like(qkv)
        attention_backward(dqkv, np.ascontiguousarray(dout), qkv, out, lse, n_head,
                           *(np.empty((BH, hs, T), qkv.dtype) for _ in range(2)),
                           *(np.empty((BH, hs, T)) for _ in range(2)),
                           np.empty((BH, T)), np.empty((BH, T)))
        return (dqkv,)
    return backward


# The inference attention's tiles are at most this many queries by this many keys. At 64 x 64
# x hs 64 each tile product stays under OpenBLAS's threading threshold, so the kernel's own
# threads do not each start BLAS threads: 12 heads, T 1024, 2 threads on a 2-vCPU EPYC took
# 45 ms in tiles of 64 and 175 ms in tiles of 128 (one thread: 40 and 39 ms).
ATTENTION_TILE = 64


def _attention_blocked(out, q, keys, values, kv_rows, lengths, block: int) -> None:
    """Run ``attention_blocked_kernel`` in tiles of min(block, ATTENTION_TILE) with its
    per-thread scratch: one score tile per thread (fewer rows or columns when Tq or Tk is
    smaller), never (Tq, Tk)."""
    block = min(block, ATTENTION_TILE)
    B, nh, Tq, hs = q.shape
    tq, tk = min(block, Tq), min(block, keys.shape[2])
    P = max(1, min(numba.get_num_threads(), B * nh * -(-Tq // block)))  # scratch slots
    dt = q.dtype
    attention_blocked_kernel(out, q, keys, values, kv_rows, lengths, block,
                             np.empty((P, tq, hs), dt), np.empty((P, tk, hs), dt),
                             np.empty((P, tk, hs), dt), np.empty((P, tq * tk), dt),
                             np.empty((P, tq * hs), dt), np.empty((P, tq, hs)), np.empty((P, tq)),
                             np.empty((P, tq)))


def attention_blocked(q: np.ndarray, k: np.ndarray, v: np.ndarray, *,
                      key_lengths: np.ndarray | None = None, block: int = 128) -> np.ndarray:
    """``ops.attention_inference`` by the blocked online-softmax kernel, whatever Tq (the
    fast path's entry for Tq > 1): q (B, nh, Tq, hs), k, v (B, nh, Tk, hs) -> (B, nh, Tq, hs).
    ``block``: query rows and keys per tile (at most ``ATTENTION_TILE``), so each thread
    holds one (block, block) tile."""
    ops._check_attention_inputs(q, k, v, key_lengths)
    block = ops._check_block(block)
    B = q.shape[0]
    lengths = np.full(B, k.shape[-2], np.int64) if key_lengths is None else \
        np.ascontiguousarray(key_lengths, dtype=np.int64)
    out = np.empty(q.shape, dtype=q.dtype)
    _attention_blocked(out, q, k, v, np.arange(B, dtype=np.int64), lengths, block)
    return out


def attention_inference(q: np.ndarray, k: np.ndarray, v: np.ndarray, *,
                        key_lengths: np.ndarray | None = None, block: int = 128) -> np.ndarray:
    """``ops.attention_inference`` on the fast path (same arguments, no backward):
    q (B, nh, Tq, hs), k, v (B, nh, Tk, hs) -> (B, nh, Tq, hs); each row reads only its
    ``key_lengths`` keys. Several queries (a prompt, the no-gradient forward) go to the
    blocked kernel (``attention_blocked``, tiles of ``block``); one query per row (decoding)
    to ``attention_inference_kernel``, which reads each key once and needs no tile."""
    if q.ndim == 4 and q.shape[-2] > 1:
        return attention_blocked(q, k, v, key_lengths=key_lengths, block=block)
    ops._check_attention_inputs(q, k, v, key_lengths)
    ops._check_block(block)
    B, nh, Tq, hs = q.shape
    lengths = np.full(B, k.shape[-2], np.int64) if key_lengths is None else \
        np.ascontiguousarray(key_lengths, dtype=np.int64)
    out = np.empty(q.shape, dtype=q.dtype)
    Tk = k.shape[-2]
    attention_inference_kernel(out, q, k, v, lengths, np.empty((B * nh, hs, Tk), q.dtype),
                               np.empty((B * nh, Tk)), np.empty((B * nh, hs)))
    return out


# One new token per row (decoding) reads A * nh * (position + 1) * hs key elements; below
# this many it runs the serial build, not by the size of the whole cache (which sent every
# decode step to the threads). Waking the OpenMP pool costs more than a row of keys: on a
# shared 2-vCPU AMD EPYC, 2 threads, 12 heads of 64, one row, serial 18 us vs parallel 25 us
# at 64 keys and 251 vs 263 us at 1023 (the sweep is bound by reading the cache, which one
# core already does near the memory rate; a wake is a futex call on either vendor). So one
# sequence of GPT-2 never wakes the pool, and a server batch of 16 at 171 positions does.
DECODE_PARALLEL_MIN_KEYS = 1 << 21


def cached_attention(qkv: np.ndarray, cache_k: np.ndarray, cache_v: np.ndarray, *, layer: int,
                     rows: np.ndarray, start: np.ndarray, n_head: int, block: int = 128) -> np.ndarray:
    """Attention of new tokens over a KV cache whose slots hold different lengths (no
    backward: inference only). qkv (A, Tn, 3C) are the new tokens' projections, whose keys
    and values are already written to cache_k, cache_v (L, slots, nh, max_len, hs) at
    positions start[a]..start[a] + Tn of slot rows[a] -> (A, Tn, C), heads merged.

    The reference, ``ops.cached_attention``, gathers the rows' caches up to the longest
    length and calls ``ops.attention_inference`` with key_lengths. A prompt (Tn > 1) runs
    the blocked online-softmax kernel on the slots in place (tiles of ``block``); one new
    token per row (decoding) runs ``cached_attention_kernel``.
    """
    _check_qkv(qkv, n_head, "cached_attention")
    qkv = np.ascontiguousarray(qkv)
    A, Tn, C3 = qkv.shape
    hs = C3 // (3 * n_head)
    out = np.empty((A, Tn, C3 // 3), dtype=qkv.dtype)
    rows, start = np.ascontiguousarray(rows, dtype=np.int64), np.ascontiguousarray(start, dtype=np.int64)
    if Tn > 1:
        q = ops.split_heads(qkv, n_head)[0]  # (A, nh, Tn, hs), a view
        heads = out.reshape(A, Tn, n_head, hs).transpose(0, 2, 1, 3)  # (A, nh, Tn, hs) view of out
        _attention_blocked(heads, q, cache_k[int(layer)], cache_v[int(layer)], rows, start + Tn,
                           ops._check_block(block))
        return out
    AH, n = A * n_head, int(start.max()) + 1 if A else 1  # n: the most keys a row reads
    kernel = cached_attention_kernel.parallel if AH * n * hs >= DECODE_PARALLEL_MIN_KEYS \
        else cached_attention_kernel.serial
    # scratch as large as this call reads, not the cache's max_len (kT is unused for Tn = 1)
    kernel(out, qkv, cache_k, cache_v, int(layer), rows, start, n_head,
           np.empty((AH, hs, 0), qkv.dtype), np.empty((AH, n)), np.empty((AH, hs)))
    return out


def _sort_keys(x: np.ndarray) -> np.ndarray:
    """x (N, V) float32 or float64 -> (N, V) uint64 keys whose unsigned order is the order
    NumPy sorts the values in: the IEEE bits with the sign bit set for x >= 0 and every bit
    flipped for x < 0; -0.0 keyed as +0.0 (they compare equal) and NaN above +inf (NumPy
    sorts NaNs last)."""
    bits = 8 * x.dtype.itemsize
    u = np.uint32 if bits == 32 else np.uint64
    b = np.ascontiguousarray(np.where(x == 0, x.dtype.type(0), x)).view(u)  # -0.0 -> +0.0
    negative = (b >> u(bits - 1)) == 1
    key = np.where(negative, ~b, b | u(1 << (bits - 1))).astype(np.uint64)
    key[np.isnan(x)] = np.iinfo(np.uint64).max
    return key


def argsort_stable(x: np.ndarray) -> np.ndarray:
    """``np.argsort(x, axis=-1, kind="stable")`` (the same indices) for float32 or float64
    x (..., V), by ``radix_argsort_rows``: the sampler's top-p filter sorts the whole
    vocabulary once per token, and NumPy's stable sort of 50257 float32 logits took about
    4.5 ms on a 2-vCPU EPYC (a radix sort reads each row a fixed number of times, whatever
    the CPU). A row that is mostly -inf (what a top-k filter leaves) sorts only the rest, with
    NumPy. tests/test_kernels.py checks both ways index for index against NumPy."""
    if x.dtype not in (np.float32, np.float64) or x.ndim == 0 or x.shape[-1] == 0:
        return np.argsort(x, axis=-1, kind="stable")  # not a float row: NumPy's sort
    rows = x.reshape(-1, x.shape[-1])  # (N, V)
    N, V = rows.shape
    order = np.empty((N, V), np.int64)
    live = rows != -np.inf  # (N, V)
    if live.sum(axis=1).max() <= V // 4:  # after a top-k filter: sort the few that are left
        for i in range(N):  # -inf is below every other value (NaN included): first, in id order
            kept = np.flatnonzero(live[i])
            order[i, :V - len(kept)] = np.flatnonzero(~live[i])
            order[i, V - len(kept):] = kept[np.argsort(rows[i, kept], kind="stable")]
        return order.reshape(x.shape)
    passes = -(-8 * x.dtype.itemsize // _DIGIT_BITS)
    kernel = radix_argsort_rows.parallel if N > 1 and N * V >= PARALLEL_MIN_ELEMENTS \
        else radix_argsort_rows.serial  # one row: no threads to wake
    kernel(order, _sort_keys(rows), np.empty((N, V), np.int64),
           np.empty((N, 1 << _DIGIT_BITS), np.int64), passes)
    return order.reshape(x.shape)


# ---------------------------------------------------------------------- the two paths

# The reference ops each kernel stands in for on the fast path; every other op is shared.
# attention_training is not among them: its kernel (below) equals the reference on every gate
# but, one query row at a time, it measured slower on the training shapes (T 64, hs 32) than
# the reference's blocked BLAS products, so the fast path keeps ops.attention_training.
FAST_OPS = ("layernorm", "gelu", "gelu_tanh", "cross_entropy", "embedding", "tied_head",
            "attention_inference", "cached_attention")


class OpPath:
    """The op namespace of one path: ``OpPath("fast").layernorm`` is this module's kernel,
    ``OpPath("reference").layernorm`` is ``ops.layernorm``; an op without a kernel
    (``linear``, ``tied_head``, ...) is the reference op on both. Names are looked up at
    call time, so a test that swaps ``ops.<name>`` (or ``kernels.<name>``) for a broken one
    reaches every layer that uses that path."""

    __slots__ = ("path",)

    def __init__(self, path: str):
        if path not in PATHS:
            raise ConfigError(f"kernels must be one of {list(PATHS)}, got {path!r}; "
                              f"'fast' runs the compiled kernels, 'reference' the NumPy ops")
        self.path = path

    def __getattr__(self, name: str):
        if self.path == "fast" and name in FAST_OPS:
            return globals()[name]
        return getattr(ops, name)

    def __reduce__(self):
        # copy and pickle rebuild through __init__: without it a copy has no ``path`` yet and
        # __getattr__("path") recursed forever (copy.deepcopy(model) never returned)
        return OpPath, (self.path,)

    def __repr__(self) -> str:
        return f"OpPath({self.path!r})"


def ops_for(path: str) -> OpPath:
    """The op namespace of ``path`` ("fast" or "reference"); see ``OpPath``."""
    return OpPath(path)


def compile_all() -> float:
    """Run both builds (threaded and serial) of every kernel once on small float32 and float64
    inputs, compiling each or loading it from numba's disk cache; returns the seconds taken."""
    import time
    global PARALLEL_MIN_ELEMENTS
    start, saved = time.perf_counter(), PARALLEL_MIN_ELEMENTS
    try:
        for PARALLEL_MIN_ELEMENTS in (0, 1 << 62):  # every call threaded, then every call serial
            _exercise_every_kernel()
    finally:
        PARALLEL_MIN_ELEMENTS = saved
    return time.perf_counter() - start


def compiled_kernels() -> dict[str, int]:
    """Every compiled function of this module (both builds of each kernel, and the helpers
    they call) -> how many type signatures it holds now: what ``compile_all`` compiled."""
    from numba.core.dispatcher import Dispatcher

    found = {}
    for name, obj in sorted(globals().items()):
        builds = [obj.parallel, obj.serial] if isinstance(obj, _Kernel) else [obj]
        for d in builds:
            if isinstance(d, Dispatcher):
                found[d.py_func.__name__] = len(d.signatures)
    return found


def _exercise_every_kernel() -> None:
    rng = np.random.default_rng(0)
    for dt in (np.float32, np.float64):
        x = rng.standard_normal((2, 3, 8)).astype(dt)
        g = np.ones(8, dt)
        for op in (gelu, gelu_tanh):
            op(x)[1](x)
        layernorm(x, g, g)[1](x)
        cross_entropy(x, targets=np.zeros((2, 3), np.int64))[1](np.asarray(1.0, dt))
        embedding(x[0], ids=np.array([[0, 1]]))[1](x[0, :2][None])
        qkv = rng.standard_normal((2, 3, 12)).astype(dt)
        y, bw = attention_training(qkv, n_head=2)
        bw(y)
        q, k, v = ops.split_heads(qkv, 2)
        attention_inference(q[:, :, -1:], k, v, key_lengths=np.array([3, 2]))
        attention_inference(q[:, :, 1:], k, v, key_lengths=np.array([3, 2]))  # the blocked kernel
        cache = np.zeros((1, 2, 2, 4, 2), dt)
        for new in (qkv, qkv[:, :1]):  # a prompt (the blocked kernel) and one token
            cached_attention(new, cache, cache, layer=0, rows=np.arange(2),
                             start=np.zeros(2, np.int64), n_head=2)
        argsort_stable(x)
        tied_head(x[0, :1], x[0])  # one row: tied_head_rows
        flat = np.zeros(4, dt)
        piece = np.array([0]), np.array([4])
        sum_of_squares(flat, *piece, np.zeros(1))
        one = dt(1.0)
        adamw_update(flat, flat, flat.copy(), flat.copy(), *piece, np.zeros(1, np.int64),
                     np.ones(1, dt), np.ones(1, dt), np.ones(1, dt), np.ones(1, np.bool_),
                     one, one, one, one, one)
