"""Rung 3 of the ladder: every fast-path kernel equals the reference op it implements.

Each case runs the fast op (``numgpt.core.kernels``) and the reference op (``numgpt.core.ops``)
on the same inputs, in float32 and float64, and compares the output and every input
gradient (same upstream gradient). Bounds: float64 within 1e-13 relative to the output's
scale (reordered sums and a ~1 ulp exp differ from NumPy's only at rounding), float32
within 5e-6 (float32 rounding of the reference, which sums in float32; the kernels sum in
float64). Writes ``docs/results/kernel_parity.md`` from the run.

Negative controls: a layernorm kernel fed the wrong epsilon, a tanh GELU with the cubic
input scaled by 1.01, an attention backward without the row-sum term, and an AdamW step
without bias correction each fail the same comparison; so does the blocked inference
attention with its causal mask off by one.
"""

from __future__ import annotations


import platform
import re

import numpy as np
import pytest

from numgpt.core import kernels, ops

import results_table  # noqa: E402  (tests/results_table.py)

RESULTS = results_table.results_dir() / "kernel_parity.md"  # docs/results/ under --write-results
TOLERANCE = {np.float32: 5e-6, np.float64: 1e-13}
_ROWS: list[str] = []


def _rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| over the scale of want (its largest magnitude, at least 1e-30)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    return float(np.max(np.abs(got - want), initial=0.0) / max(np.max(np.abs(want), initial=0.0), 1e-30))


def _compare(name, fast_op, ref_op, inputs, consts, dtype, rng) -> float:
    """Worst relative error of the output and of every input gradient (fast vs reference)."""
    out, fast_backward = fast_op(*inputs, **consts)
    ref_out, ref_backward = ref_op(*inputs, **consts)
    assert out.dtype == ref_out.dtype == dtype and out.shape == ref_out.shape
    dout = rng.standard_normal(np.shape(out)).astype(dtype) if np.ndim(out) else np.asarray(1.3, dtype)
    errors = [_rel_error(out, ref_out)]
    for got, want in zip(fast_backward(dout), ref_backward(dout)):
        assert (got is None) == (want is None)
        if got is not None:
            assert got.dtype == dtype
            errors.append(_rel_error(got, want))
    return max(errors)


def _cases(dtype, rng):
    """(name, fast op, reference op, inputs, consts) for every kernel, on shapes that hit the
    real paths (odd sizes, several rows, repeated ids, ignored targets, T above 1)."""
    def r(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(dtype)
    ids = rng.integers(0, 6, (3, 7))
    targets = rng.integers(0, 37, (3, 5))
    targets[0, 1] = -1
    return [
        ("layernorm", kernels.layernorm, ops.layernorm, [r(3, 5, 40, scale=3.0) + 2, r(40), r(40)], {"eps": 1e-5}),
        ("layernorm (no bias)", kernels.layernorm, ops.layernorm, [r(6, 33), r(33), None], {"eps": 1e-5}),
        ("gelu_tanh", kernels.gelu_tanh, ops.gelu_tanh, [r(4, 301, scale=4.0)], {}),
        ("gelu", kernels.gelu, ops.gelu, [r(4, 301, scale=4.0)], {}),
        ("cross_entropy", kernels.cross_entropy, ops.cross_entropy, [r(3, 5, 37, scale=3.0)],
         {"targets": targets, "ignore_index": -1}),
        ("embedding", kernels.embedding, ops.embedding, [r(9, 70)], {"ids": ids}),
        ("tied_head (one row: tied_head_rows)", kernels.tied_head, ops.tied_head, [r(1, 24), r(301, 24)], {}),
        ("tied_head (few rows)", kernels.tied_head, ops.tied_head, [r(4, 24), r(301, 24)], {}),
        ("tied_head (8 rows: BLAS order)", kernels.tied_head, ops.tied_head, [r(2, 4, 24), r(301, 24)], {}),
        ("tied_head (many rows)", kernels.tied_head, ops.tied_head, [r(5, 20, 24), r(301, 24)], {}),
        ("attention_training", kernels.attention_training, ops.attention_training, [r(2, 13, 3 * 24)], {"n_head": 3}),
        ("attention_training (T=1)", kernels.attention_training, ops.attention_training, [r(3, 1, 3 * 8)], {"n_head": 2}),
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_every_kernel_equals_its_reference_op(dtype):
    rng = np.random.default_rng(0)
    failing = []
    for name, fast, ref, inputs, consts in _cases(dtype, rng):
        err = _compare(name, fast, ref, inputs, consts, dtype, rng)
        _ROWS.append(f"| {name} | {np.dtype(dtype).name} | {err:.2e} | {TOLERANCE[dtype]:.0e} |")
        if not err < TOLERANCE[dtype]:
            failing.append(f"{name}: {err:.2e}")
    assert not failing, failing


def test_attention_training_parity_at_a_long_sequence_float32():
    """T = 160 crosses the reference's 128-row softmax blocks."""
    rng = np.random.default_rng(1)
    qkv = rng.standard_normal((1, 160, 3 * 64)).astype(np.float32)
    err = _compare("attention_training T=160", kernels.attention_training, ops.attention_training, [qkv],
                   {"n_head": 2}, np.float32, rng)
    _ROWS.append(f"| attention_training (T=160) | float32 | {err:.2e} | {TOLERANCE[np.float32]:.0e} |")
    assert err < TOLERANCE[np.float32]


# ------------------------------------------------------------------ special functions

def test_exp_is_accurate_to_about_one_ulp_and_exact_at_the_ends():
    x = np.linspace(-708, 709, 40_001)
    got = np.array([_scalar_exp(v) for v in x])
    rel = np.abs(got - np.exp(x)) / np.exp(x)
    assert rel.max() < 5e-16
    assert [_scalar_exp(v) for v in (-np.inf, -800.0, -708.5, 0.0, 710.0, np.inf)] == \
        [0.0, 0.0, 0.0, 1.0, np.inf, np.inf]


def _scalar_exp(v: float) -> float:
    from numba import njit
    global _exp_probe
    if "_exp_probe" not in globals():
        _exp_probe = njit(lambda x: kernels._exp(x))
    return _exp_probe(float(v))


def test_tanh_gelu_on_a_wide_grid_matches_numpy_tanh_form():
    x = np.linspace(-30, 30, 200_001)
    out, _ = kernels.gelu_tanh(x)
    ref, _ = ops.gelu_tanh(x)
    assert np.max(np.abs(out - ref)) < 1e-14 * 30


def test_exact_gelu_float32_keeps_the_left_tail():
    x = np.linspace(-9, -4, 5001).astype(np.float32)
    out, _ = kernels.gelu(x)
    from scipy.special import ndtr
    ref = x.astype(np.float64) * ndtr(x.astype(np.float64))
    assert np.max(np.abs(out - ref) / np.abs(ref)) < 1e-5


# ------------------------------------------------------------------ KV-cache attention

def _cache_case(rng, dtype, lengths, Tn=1, nh=2, hs=8, max_len=12, slots=5, L=2, layer=1):
    """A cache with slots of different lengths and new tokens already written into it."""
    C = nh * hs
    ck = rng.standard_normal((L, slots, nh, max_len, hs)).astype(dtype)
    cv = rng.standard_normal((L, slots, nh, max_len, hs)).astype(dtype)
    rows = np.array([3, 0, 4])[: len(lengths)]
    start = np.asarray(lengths)
    qkv = rng.standard_normal((len(rows), Tn, 3 * C)).astype(dtype)
    q, k, v = ops.split_heads(qkv, nh)  # (A, nh, Tn, hs)
    for a, row in enumerate(rows):
        ck[layer, row, :, start[a]:start[a] + Tn] = k[a]
        cv[layer, row, :, start[a]:start[a] + Tn] = v[a]
    return qkv, ck, cv, rows, start, layer, nh


def _reference_cached(qkv, ck, cv, rows, start, layer, nh):
    return ops.cached_attention(qkv, ck, cv, layer=layer, rows=rows, start=start, n_head=nh)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("Tn", [1, 3])
def test_cached_attention_reads_each_slot_to_its_own_length(dtype, Tn):
    rng = np.random.default_rng(Tn)
    qkv, ck, cv, rows, start, layer, nh = _cache_case(rng, dtype, [2, 7, 0], Tn=Tn)
    got = kernels.cached_attention(qkv, ck, cv, layer=layer, rows=rows, start=start, n_head=nh)
    want = _reference_cached(qkv, ck, cv, rows, start, layer, nh)
    err = _rel_error(got, want)
    _ROWS.append(f"| cached_attention (Tn={Tn}) | {np.dtype(dtype).name} | {err:.2e} | {TOLERANCE[dtype]:.0e} |")
    assert got.dtype == dtype and err < TOLERANCE[dtype]
    # positions past a slot's length are never read: poisoning them changes nothing
    poisoned_k, poisoned_v = ck.copy(), cv.copy()
    for a, row in enumerate(rows):
        poisoned_k[layer, row, :, start[a] + Tn:] = np.nan
        poisoned_v[layer, row, :, start[a] + Tn:] = np.nan
    again = kernels.cached_attention(qkv, poisoned_k, poisoned_v, layer=layer, rows=rows, start=start, n_head=nh)
    assert np.array_equal(again, got)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("Tq", [1, 4])
def test_attention_inference_equals_the_reference_entry_with_per_row_lengths(dtype, Tq):
    rng = np.random.default_rng(10 + Tq)
    q = rng.standard_normal((3, 2, Tq, 8)).astype(dtype)
    k, v = (rng.standard_normal((3, 2, 9, 8)).astype(dtype) for _ in range(2))
    for lengths in (None, np.array([9, Tq, 6])):
        got = kernels.attention_inference(q, k, v, key_lengths=lengths)
        want = ops.attention_inference(q, k, v, key_lengths=lengths)
        err = _rel_error(got, want)
        _ROWS.append(f"| attention_inference (Tq={Tq}, lengths={'per row' if lengths is not None else 'all'}) "
                     f"| {np.dtype(dtype).name} | {err:.2e} | {TOLERANCE[dtype]:.0e} |")
        assert got.dtype == dtype and err < TOLERANCE[dtype]


# ------------------------------------------------------------------------- AdamW

def test_flat_adamw_kernel_equals_the_reference_update_in_float64():
    from numgpt.train.optim import AdamW

    rng = np.random.default_rng(3)

    class P:
        def __init__(self, a):
            self.data, self.grad = a, None

    def params():
        r = np.random.default_rng(4)
        return {"w": P(r.standard_normal((30, 20))), "b": P(r.standard_normal(20)),
                "idle": P(r.standard_normal(7))}

    ref, fast = params(), params()
    opt_ref = AdamW(ref, lr=0.01, weight_decay=0.1)
    opt_fast = AdamW(fast, lr=0.01, weight_decay=0.1, kernels="fast")
    for step in range(4):
        for name in ("w", "b"):
            g = rng.standard_normal(ref[name].data.shape)
            ref[name].grad, fast[name].grad = g.copy(), g.copy()
        opt_ref.step()
        opt_fast.step()
    for name in ref:
        err = _rel_error(fast[name].data, ref[name].data)
        assert err < 1e-14, (name, err)
    assert opt_fast.steps == opt_ref.steps == {"w": 4, "b": 4, "idle": 0}


# -------------------------------------------------------------------- negative controls

def _wrong_eps_layernorm(x, g, b=None, *, eps):
    return kernels.layernorm(x, g, b, eps=eps + 0.05)


def _wrong_gelu_tanh(x):
    out, backward = kernels.gelu_tanh(x * 1.01)
    return out, backward


def _attention_without_rowsum(qkv, *, n_head):
    """The fast kernels with D = rowsum(dP * P) dropped from dS (they read D as dout.out,
    so a zero ``out`` in backward drops it)."""
    out, right = kernels.attention_training(qkv, n_head=n_head)
    lse = right.__closure__ and _closure_value(right, "lse")
    return out, kernels._attention_training_backward(qkv, np.zeros_like(out), lse, n_head)


def _closure_value(fn, name):
    return fn.__closure__[fn.__code__.co_freevars.index(name)].cell_contents


@pytest.mark.parametrize("wrong,ref,make", [
    (_wrong_eps_layernorm, ops.layernorm, lambda r: ([r(4, 16), r(16), r(16)], {"eps": 1e-5})),
    (_wrong_gelu_tanh, ops.gelu_tanh, lambda r: ([r(100)], {})),
    (_attention_without_rowsum, ops.attention_training, lambda r: ([r(2, 5, 24)], {"n_head": 2})),
], ids=["layernorm-eps", "gelu_tanh-coefficient", "attention-backward"])
def test_parity_check_fails_for_a_wrong_kernel(wrong, ref, make):
    rng = np.random.default_rng(5)
    inputs, consts = make(lambda *s: rng.standard_normal(s).astype(np.float32))
    err = _compare("wrong", wrong, ref, inputs, consts, np.float32, rng)
    assert err > 100 * TOLERANCE[np.float32]


# ------------------------------------------------- inference attention: online softmax

def _blocked_case(rng, dtype, B, nh, Tq, Tk, hs):
    q = rng.standard_normal((B, nh, Tq, hs)).astype(dtype)
    k, v = ((rng.standard_normal((B, nh, Tk, hs)) * 2).astype(dtype) for _ in range(2))
    return q, k, v


# (B, nh, Tq, Tk, hs, block, key_lengths): T not a multiple of the block, T = 1, queries
# offset into a longer cache (per row), several heads and rows, a block above T, and a
# GPT-2 head size over several 128-key blocks
_BLOCKED_CASES = [
    (2, 3, 13, 13, 8, 4, None),
    (3, 2, 1, 1, 8, 4, None),
    (2, 2, 5, 17, 8, 4, [17, 9]),
    (3, 2, 6, 11, 16, 3, [11, 6, 8]),
    (2, 1, 7, 7, 8, 128, None),
    (1, 2, 300, 300, 64, 128, None),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_blocked_online_softmax_attention_equals_the_reference_chain(dtype):
    """``kernels.attention_blocked`` (the no-gradient forward's and the prefill's attention on
    the fast path) against ``ops.attention_reference``, the unfused four-op chain. Keys past a
    row's length are NaN, so reading one would show."""
    rng = np.random.default_rng(21)
    for B, nh, Tq, Tk, hs, block, lengths in _BLOCKED_CASES:
        q, k, v = _blocked_case(rng, dtype, B, nh, Tq, Tk, hs)
        lengths = None if lengths is None else np.array(lengths)
        want, _ = ops.attention_reference(q, k, v, key_lengths=lengths)
        if lengths is not None:  # (the reference multiplies them by 0: NaN)
            for b, n in enumerate(lengths):
                k[b, :, n:], v[b, :, n:] = np.nan, np.nan
        got = kernels.attention_blocked(q, k, v, key_lengths=lengths, block=block)
        err = _rel_error(got, want)
        _ROWS.append(f"| attention_blocked (Tq={Tq}, Tk={Tk}, block={block}) | {np.dtype(dtype).name} "
                     f"| {err:.2e} | {TOLERANCE[dtype]:.0e} |")
        assert got.dtype == dtype and got.shape == q.shape
        assert err < TOLERANCE[dtype], (B, nh, Tq, Tk, hs, block, err)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_prefill_over_the_cache_runs_the_blocked_kernel_in_place(dtype):
    """A prompt of 7 tokens into slots already holding 2, 7 and 0 tokens, in tiles of 3:
    ``kernels.cached_attention`` (Tn > 1: the blocked kernel reading the slots in place)
    equals the reference, which gathers the slots and runs ``ops.attention_inference``."""
    rng = np.random.default_rng(22)
    qkv, ck, cv, rows, start, layer, nh = _cache_case(rng, dtype, [2, 7, 0], Tn=7, max_len=16)
    got = kernels.cached_attention(qkv, ck, cv, layer=layer, rows=rows, start=start, n_head=nh, block=3)
    want = _reference_cached(qkv, ck, cv, rows, start, layer, nh)
    err = _rel_error(got, want)
    _ROWS.append(f"| cached_attention (Tn=7, block=3) | {np.dtype(dtype).name} | {err:.2e} | {TOLERANCE[dtype]:.0e} |")
    assert got.dtype == dtype and err < TOLERANCE[dtype]


def test_blocked_attention_with_an_off_by_one_causal_mask_fails_the_gate():
    """Negative control: the same kernel told each row holds one key more (queries shifted
    one position on, so each sees its next token) fails the comparison by far."""
    rng = np.random.default_rng(23)
    q, k, v = _blocked_case(rng, np.float32, 2, 2, 9, 10, 8)
    right = np.full(2, 9, np.int64)
    want, _ = ops.attention_reference(q, k[:, :, :9], v[:, :, :9])
    for lengths, fails in ((right, False), (right + 1, True)):
        out = np.empty_like(q)
        kernels._attention_blocked(out, q, k, v, np.arange(2, dtype=np.int64), lengths, 4)
        err = _rel_error(out, want)
        assert (err > 100 * TOLERANCE[np.float32]) == fails, (lengths, err)


@pytest.mark.parametrize("path", ["fast", "reference"])
def test_attention_without_a_graph_holds_no_t_by_t_buffer(path):
    """The layer's forward under ``no_grad`` runs the inference entry: its peak allocation
    (tracemalloc, which sees NumPy's buffers) stays far below one (B, nh, T, T) float32
    array, 32 MiB here; with a graph, the training entry keeps P for backward and the same
    measure sees at least that much (the measure can tell)."""
    import tracemalloc

    from numgpt.core.nn import CausalSelfAttention
    from numgpt.core.tensor import Tensor, no_grad

    B, T, C, nh = 1, 1024, 128, 8
    layer = CausalSelfAttention(C, nh, kernels=path)
    rng = np.random.default_rng(24)
    for p in (layer.c_attn.weight, layer.c_proj.weight):
        p.data[...] = rng.normal(0, 0.05, p.data.shape)
    x = Tensor(rng.standard_normal((B, T, C)).astype(np.float32), requires_grad=True)
    full = B * nh * T * T * 4  # one (B, nh, T, T) float32 array

    def peak(fn) -> int:
        fn()  # warm: kernels loaded, BLAS buffers made
        tracemalloc.start()
        try:
            fn()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    def inference():
        with no_grad():
            layer(x)
    assert peak(inference) < full / 4
    assert peak(lambda: layer(x)) >= full


def test_write_results_table():
    """Last in this file: the table of every parity row measured above."""
    assert len(_ROWS) >= 20
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        "# Fast-path kernels against the reference ops\n\n"
        "Written by `tests/test_kernels.py`: the worst error of the output and every input "
        "gradient, relative to the reference's largest magnitude.\n\n"
        "| kernel | dtype | worst relative error | bound |\n|---|---|---|---|\n"
        + "\n".join(_ROWS) + "\n")


def test_compile_all_runs_both_builds_of_every_kernel():
    """The warm-up users (and benchmarks) call to compile or load every kernel up front."""
    assert kernels.compile_all() > 0
    assert kernels.PARALLEL_MIN_ELEMENTS == 1 << 15  # restored after forcing each build


def test_the_openmp_pool_sleeps_between_kernels_unless_the_user_says_otherwise():
    """GNU OpenMP's spinning pool threads starved OpenBLAS (2-core decode: 9.5 vs 44.6 tok/s):
    importing the kernels sets GOMP_SPINCOUNT=0 before the pool starts; a user's value wins."""
    import os
    import subprocess
    import sys

    probe = "import os, numgpt.core.kernels; print(os.environ.get('GOMP_SPINCOUNT'))"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    run = lambda e: subprocess.run([sys.executable, "-c", probe], env=e, capture_output=True,  # noqa: E731
                                   text=True, check=True).stdout.strip()
    assert run(env) == "0"
    assert run({**env, "GOMP_SPINCOUNT": "1000"}) == "1000"


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_decode_attention_runs_serial_below_the_work_threshold_and_both_builds_agree(dtype, monkeypatch):
    """One token per row picks its build by the keys it reads (DECODE_PARALLEL_MIN_KEYS),
    not by the size of the whole cache; both builds give the same bits, so the choice never
    changes the math. Negative control: the gate sees a build that differs."""
    rng = np.random.default_rng(5)
    qkv, ck, cv, rows, start, layer, nh = _cache_case(rng, dtype, [2, 7, 0], Tn=1)
    args = dict(layer=layer, rows=rows, start=start, n_head=nh)
    used = []
    for build in ("serial", "parallel"):
        real = getattr(kernels.cached_attention_kernel, build)
        monkeypatch.setattr(kernels.cached_attention_kernel, build,
                            lambda *a, _real=real, _b=build: (used.append(_b), _real(*a))[1])
    small = kernels.cached_attention(qkv, ck, cv, **args)
    monkeypatch.setattr(kernels, "DECODE_PARALLEL_MIN_KEYS", 0)
    large = kernels.cached_attention(qkv, ck, cv, **args)
    assert used == ["serial", "parallel"] and np.array_equal(small, large)
    assert _rel_error(small, _reference_cached(qkv, ck, cv, rows, start, layer, nh)) < TOLERANCE[dtype]
    broken = kernels.cached_attention(qkv[:, :, ::-1].copy(), ck, cv, **args)  # another query
    assert not np.array_equal(broken, large)


# ------------------------------------------------------------------ the sampler's stable argsort

def _hard_rows(dtype):
    """Rows a sort can get wrong: ties, -0.0 beside +0.0, infinities, NaNs of both signs,
    a row that is mostly -inf (after a top-k filter), and plain random logits."""
    rng = np.random.default_rng(8)
    z = (rng.standard_normal((4, 5003)) * 3).astype(dtype)
    z[0, ::3] = np.round(z[0, ::3])  # many ties
    z[1, :7], z[1, 7:14] = -0.0, 0.0
    z[1, 20:23], z[1, 30] = np.nan, -np.nan
    z[1, 40:42], z[1, 50:52] = np.inf, -np.inf
    z[2, 40:] = -np.inf
    return z


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_argsort_stable_gives_numpys_stable_order_index_for_index(dtype):
    z = _hard_rows(dtype)
    want = np.argsort(z, axis=-1, kind="stable")
    assert np.array_equal(kernels.argsort_stable(z), want)
    assert np.array_equal(kernels.argsort_stable(z[2]), want[2])  # one row, (V,), mostly -inf
    sparse = np.full((2, 5003), -np.inf, dtype)  # mostly -inf with ties, zeros of both signs, NaNs
    sparse[:, 10:20], sparse[:, 30:33], sparse[:, 40:45], sparse[0, 50] = 1.5, -0.0, 0.0, np.nan
    sparse[1, 60:70] = z[3, :10]
    assert np.array_equal(kernels.argsort_stable(sparse), np.argsort(sparse, axis=-1, kind="stable"))
    assert np.array_equal(kernels.argsort_stable(z[:, :1]), np.zeros((4, 1), np.int64))


def test_argsort_stable_check_catches_an_unstable_order_and_a_wrong_zero_key(monkeypatch):
    """Negative controls: an order that breaks ties otherwise, and keys that put -0.0 below
    +0.0 (the raw IEEE order), both fail the index-for-index check."""
    z = _hard_rows(np.float32)
    want = np.argsort(z, axis=-1, kind="stable")
    V = z.shape[-1]
    later_first = V - 1 - np.argsort(z[:, ::-1], axis=-1, kind="stable")  # ties: higher id first
    assert np.array_equal(np.take_along_axis(z, later_first, -1), np.take_along_axis(z, want, -1),
                          equal_nan=True)  # the same sorted values: only the ties differ
    assert not np.array_equal(later_first, want)

    def raw_ieee_keys(x):
        b = np.ascontiguousarray(x).view(np.uint32)
        return np.where(b >> np.uint32(31) == 1, ~b, b | np.uint32(1 << 31)).astype(np.uint64)
    monkeypatch.setattr(kernels, "_sort_keys", raw_ieee_keys)
    assert not np.array_equal(kernels.argsort_stable(z), want)


# ------------------------------------------------------------------ vector code in the serial builds

def test_every_kernel_build_compiles_with_numpys_error_model():
    """Both builds of every kernel divide as NumPy does (inf/nan, no ZeroDivisionError check),
    which numba's prange bodies do already: the serial build had the "python" model, whose
    zero check kept its loops scalar (tanh GELU 30 us vs 4.8 us for 3072 float32 values)."""
    builds = [b for obj in vars(kernels).values() if isinstance(obj, kernels._Kernel)
              for b in (obj.parallel, obj.serial)]
    assert len(builds) >= 20
    assert all(b.targetoptions.get("error_model") == "numpy" for b in builds)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="reads x86 vector registers")
def test_the_serial_gelu_loop_is_vector_code_and_the_python_error_model_is_not():
    """The serial tanh GELU, compiled afresh with its build's own options (cached code cannot
    be inspected), holds packed AVX arithmetic on ymm/zmm registers; the same loop under the
    "python" error model (the negative control, what the serial build was) holds few."""
    from numba import njit

    x = np.ones(8, np.float32)
    fn, options = kernels.gelu_tanh_forward.serial.py_func, kernels.gelu_tanh_forward.serial.targetoptions
    packed = re.compile(r"^\s*v\w+p[sd]\s.*%[yz]mm", re.M)
    counts = {}
    for model in ("numpy", "python"):
        f = njit(fastmath=options["fastmath"], error_model=model)(fn)
        f(x.copy(), x)
        counts[model] = len(packed.findall(f.inspect_asm(f.signatures[0])))
    assert options["error_model"] == "numpy"
    assert counts["numpy"] >= 16 and counts["python"] < counts["numpy"] // 4, counts


def test_the_head_runs_tied_head_rows_up_to_its_row_limit_and_a_swapped_row_fails():
    """Up to HEAD_ROWS_MAX rows the fast tied head is the streaming kernel (counted), above
    it the BLAS-ordered product; both within float32 rounding of the float64 product. The
    check is not blind: the kernel handed x with two rows swapped is outside it."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((517, 96)).astype(np.float32)
    calls = []
    real = kernels.tied_head_rows
    try:
        kernels.tied_head_rows = lambda out, x, w_: calls.append(len(x)) or real(out, x, w_)
        for n in range(1, kernels.HEAD_ROWS_MAX + 3):
            x = rng.standard_normal((n, 96)).astype(np.float32)
            got, _ = kernels.tied_head(x, w)
            exact = x.astype(np.float64) @ w.astype(np.float64).T
            bound = 96 * np.finfo(np.float32).eps * (np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T)
            assert np.all(np.abs(got - exact) <= bound + 1e-30), n
            assert calls[-1:] == ([n] if n <= kernels.HEAD_ROWS_MAX else calls[-1:]) and \
                (len(calls) == min(n, kernels.HEAD_ROWS_MAX)), (n, calls)
    finally:
        kernels.tied_head_rows = real
    x = rng.standard_normal((2, 96)).astype(np.float32)
    swapped = np.empty((2, 517), np.float32)
    real(swapped, np.ascontiguousarray(x[::-1]), w)
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    assert np.max(np.abs(swapped - exact)) > 1.0
