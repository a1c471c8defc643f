"""The float32 fast paths the training loop runs, against float64 references.

The gradient gate (``test_gradcheck.py``) checks every op in float64, where ``ops.gelu``
uses scipy's erf. In float32 it evaluates Phi with a Chebyshev fit of erfc instead
(``ops._normal_cdf_float32``), so that path gets its own check here: Phi within 3e-7
absolute and 1e-5 relative (1e-6 for |x| < 2) of scipy's float64 ``ndtr`` on [-9, 9], GELU
and its gradient within float32 rounding of the float64 op. Negative control: GPT-2's tanh GELU, a
different function, fails the same GELU check.
"""

import numpy as np
import pytest
from scipy.special import ndtr

from numgpt.core import ops


def _grid() -> np.ndarray:
    return np.linspace(-9.0, 9.0, 180_001).astype(np.float32)


def test_float32_normal_cdf_has_float32_relative_accuracy():
    x = _grid()
    got = ops._normal_cdf_float32(x).astype(np.float64)
    ref = ndtr(x.astype(np.float64))
    assert got.dtype == np.float64 and ops._normal_cdf_float32(x).dtype == np.float32
    rel = np.abs(got - ref) / ref
    # the fit is good to 1.2e-7; float32 rounding of the exp argument (about x^2 / 2) adds
    # ~6e-8 * x^2 / 2 relative, so the bound widens in the tails
    assert rel[np.abs(x) < 2].max() < 1e-6
    assert rel.max() < 1e-5
    assert np.abs(got - ref).max() < 3e-7  # a few float32 ulps of values near 1
    # the textbook float32 form 0.5 * (1 + erf) loses the left tail entirely
    from scipy.special import erf
    naive = (0.5 * (1 + erf(x / np.float32(np.sqrt(2))))).astype(np.float64)
    assert (np.abs(naive - ref) / ref).max() > 0.5


def _gelu_error(op) -> tuple[float, float]:
    x = _grid()
    out, backward = op(x)
    ref_out, ref_backward = ops.gelu(x.astype(np.float64))
    dout = np.cos(x).astype(np.float32)
    (dx,), (ref_dx,) = backward(dout), ref_backward(dout.astype(np.float64))
    scale = np.maximum(np.abs(ref_out), 1.0)
    return float(np.max(np.abs(out - ref_out) / scale)), float(np.max(np.abs(dx - ref_dx)))


def test_float32_gelu_and_its_gradient_match_the_float64_op_to_float32_rounding():
    out_err, grad_err = _gelu_error(ops.gelu)
    assert ops.gelu(_grid())[0].dtype == np.float32
    assert out_err < 5e-7 and grad_err < 5e-7


def test_gelu_check_fails_for_the_tanh_approximation():
    out_err, _ = _gelu_error(ops.gelu_tanh)
    assert out_err > 1e-4


@pytest.mark.parametrize("V", [7, 300])
def test_embedding_backward_sums_repeated_ids_like_add_at(V):
    rng = np.random.default_rng(V)
    w = rng.standard_normal((V, 5)).astype(np.float32)
    ids = rng.integers(0, min(V, 6), (4, 9))  # many repeats
    _, backward = ops.embedding(w, ids=ids)
    dout = rng.standard_normal((4, 9, 5)).astype(np.float32)
    ref = np.zeros_like(w)
    np.add.at(ref, ids.reshape(-1), dout.reshape(-1, 5))
    (got,) = backward(dout)
    assert np.allclose(got, ref, atol=1e-6) and got.dtype == np.float32
    wrong = np.zeros_like(w)
    wrong[ids.reshape(-1)] += dout.reshape(-1, 5)  # drops repeats: the check must see it
    assert not np.allclose(wrong, ref, atol=1e-6)
