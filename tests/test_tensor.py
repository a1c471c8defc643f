"""The autograd engine: ops rebuilt through ``Tensor`` are bit-identical to their own
backward, gradients accumulate exactly, long chains and freed graphs work, ``no_grad`` is
per-thread, and the operator overloads agree with PyTorch.
"""

from __future__ import annotations

import gc
from fractions import Fraction
import math
import threading
import weakref

import numpy as np
import pytest
import torch

from numgpt.verify import gradcheck

from numgpt.core import ops
from numgpt.core.tensor import Tensor, apply, is_grad_enabled, no_grad, zero_grad
from numgpt.errors import ShapeError

# every gate case of the op table (numgpt/verify/op_cases.py), as the gradient gate runs them
OP_CASES = gradcheck.op_cases(np.random.default_rng(0))


def _leaf(x: np.ndarray, requires_grad: bool = True) -> Tensor:
    return Tensor(np.array(x, copy=True), requires_grad=requires_grad)


@pytest.mark.parametrize("name,op,inputs,consts,names", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_op_through_tensor_is_bit_identical_to_its_backward(name, op, inputs, consts, names):
    out, backward = op(*inputs, **consts)
    g = np.random.default_rng(1).standard_normal(np.shape(out))
    expected = backward(g)

    leaves = [None if x is None else _leaf(x) for x in inputs]
    y = apply(op, *leaves, **consts)
    assert np.array_equal(y.data, out)
    y.backward(g)
    for leaf, grad in zip(leaves, expected):
        if leaf is not None:
            assert leaf.grad is not None and np.array_equal(leaf.grad, grad), name


def test_constant_inputs_get_no_gradient_and_are_not_traversed():
    x, c = _leaf(np.arange(3.0)), _leaf(np.ones(3), requires_grad=False)
    y = apply(ops.mul, x, c)
    y.backward(np.ones(3))
    assert c.grad is None
    assert np.array_equal(x.grad, np.ones(3))


# ------------------------------------------------------------------- accumulation
# Seeds are all ones (``sum().backward()`` or an explicit ones gradient). Each expected
# value below is a closed form computed directly in NumPy, not by the engine.

X = np.random.default_rng(2).standard_normal(7)


def test_x_times_x_gives_exactly_2x():
    x = _leaf(X)
    (x * x).backward(np.ones_like(X))
    # the two partials are x*1 and 1*x, exactly x; x + x == 2x exactly (scaling by 2)
    assert np.array_equal(x.grad, 2 * X)


def test_x_plus_x_gives_exactly_2():
    x = _leaf(X)
    (x + x).backward(np.ones_like(X))
    assert np.array_equal(x.grad, np.full_like(X, 2.0))


def test_diamond_2x_plus_3x_gives_exactly_5():
    x = _leaf(X)
    y = 2.0 * x
    z = x * 3.0
    (y + z).backward(np.ones_like(X))
    # partials 2 and 3 are exact, so is their sum
    assert np.array_equal(x.grad, np.full_like(X, 5.0))


def test_x_cubed_gives_3x_squared():
    x = _leaf(X)
    (x * x * x).backward(np.ones_like(X))
    # The three partials are each fl(x*x) (the rounded square): two arrive through x*x
    # (x times an upstream of x) and one directly (an upstream of fl(x*x) times 1). Their
    # sum fl(x*x) + fl(x*x) = 2 fl(x*x) is exact, so the result is fl(3 * fl(x*x)) in any
    # order: bit-equal to 3 * (x * x). It is NOT bit-equal to the exactly rounded 3 x^2
    # (two roundings instead of one), so against that we allow 1 ulp.
    assert np.array_equal(x.grad, 3.0 * (X * X))
    exact = np.array([float(3 * Fraction(v) ** 2) for v in X])
    assert np.all(np.abs(x.grad - exact) <= np.spacing(np.abs(exact)))


def test_zero_grad_then_second_backward_reproduces_the_first_exactly():
    w = _leaf(np.random.default_rng(3).standard_normal((4, 3)))
    xin = Tensor(np.random.default_rng(4).standard_normal((5, 4)))

    def step():
        loss = apply(ops.tanh, xin @ w).mean()
        loss.backward()

    step()
    first = w.grad.copy()
    zero_grad([w])
    assert w.grad is None
    step()
    assert np.array_equal(w.grad, first)


def test_second_backward_without_zero_grad_accumulates_like_pytorch():
    # PyTorch semantics: leaf .grad accumulates across backward calls until cleared
    w = _leaf(np.random.default_rng(3).standard_normal((4, 3)))
    loss = (w * w).sum()
    loss.backward()
    first = w.grad.copy()
    loss.backward()  # the graph is reusable (closures hold arrays, nothing is freed)
    assert np.array_equal(w.grad, 2 * first)

    wt = torch.tensor(w.data, requires_grad=True)
    lt = (wt * wt).sum()
    lt.backward(retain_graph=True)
    lt.backward()
    np.testing.assert_array_equal(w.grad, wt.grad.numpy())


# -------------------------------------------------------------------- long chains

def test_ten_thousand_node_chain_backprops_without_recursion_error():
    x = _leaf(np.array([1.0, -2.0]))
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    y.sum().backward()
    expected = 1.0
    for _ in range(10_000):  # the same sequence of roundings the chain rule performs
        expected *= 1.0001
    assert np.array_equal(x.grad, np.full(2, expected))
    assert math.isclose(expected, math.exp(10_000 * math.log1p(1e-4)), rel_tol=1e-10)


def test_ten_thousand_node_add_chain():
    x = _leaf(np.zeros(3))
    y = x
    for _ in range(10_000):
        y = y + 1.0
    y.sum().backward()
    assert np.array_equal(y.data, np.full(3, 10_000.0))
    assert np.array_equal(x.grad, np.ones(3))


# -------------------------------------------------------------------- memory

def _graph():
    """Build loss = mean(tanh(x @ w + b)); return the loss, weakrefs to it and every intermediate."""
    w = _leaf(np.random.default_rng(5).standard_normal((4, 3)))
    b = _leaf(np.zeros(3))
    x = Tensor(np.random.default_rng(6).standard_normal((5, 4)))
    h = x @ w
    a = h + b
    t = a.tanh()
    loss = t.mean()
    return loss, [weakref.ref(n) for n in (loss, h, a, t)], (w, b)


@pytest.mark.parametrize("after_backward", [False, True], ids=["before backward", "after backward"])
def test_dropped_graph_is_freed_without_the_cycle_collector(after_backward):
    enabled = gc.isenabled()
    gc.disable()
    try:
        loss, refs, params = _graph()
        if after_backward:
            loss.backward()
        assert all(r() is not None for r in refs)
        del loss
        dead = [r() is None for r in refs]
        assert all(dead), f"still alive: {dead}"
        assert params[0].grad is not None or not after_backward  # leaves keep their grads
    finally:
        if enabled:
            gc.enable()


# -------------------------------------------------------------------- errors, no_grad

def test_non_scalar_backward_without_gradient_names_the_shape():
    y = _leaf(np.ones((2, 3))) * 2.0
    with pytest.raises(ValueError, match=r"\(2, 3\)") as info:
        y.backward()
    assert isinstance(info.value, ShapeError)  # numgpt's family, still a ValueError


def test_backward_with_wrong_gradient_shape_names_both_shapes():
    y = _leaf(np.ones((2, 3))) * 2.0
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(2, 3\)") as info:
        y.backward(np.ones((3, 2)))
    assert isinstance(info.value, ShapeError)


def test_no_grad_builds_no_graph_and_restores():
    x = _leaf(np.ones(3))
    with no_grad():
        assert not is_grad_enabled()
        y = x * x
        with no_grad():
            pass
        assert not is_grad_enabled()  # nested exit does not re-enable
    assert is_grad_enabled()
    assert y.parents == () and not y.requires_grad and y._backward is None
    assert (x * x).requires_grad


def test_no_grad_restores_after_an_exception():
    with pytest.raises(RuntimeError):
        with no_grad():
            raise RuntimeError("boom")
    assert is_grad_enabled()


def test_no_grad_is_per_thread():
    """Thread A sits inside no_grad while thread B builds a graph at the same moment."""
    inside, built = threading.Event(), threading.Event()
    seen: dict = {}

    def a():
        with no_grad():
            inside.set()
            seen["a_waited"] = built.wait(timeout=10)  # B builds while A is still inside
            seen["a_enabled"] = is_grad_enabled()
            y = _leaf(np.ones(2)) * 3.0
            seen["a_requires_grad"] = y.requires_grad

    def b():
        seen["b_waited"] = inside.wait(timeout=10)
        x = _leaf(np.arange(2.0))
        y = (x * x).sum()
        seen["b_enabled"] = is_grad_enabled()
        seen["b_parents"] = len(y.parents)
        y.backward()
        seen["b_grad"] = x.grad.copy()
        built.set()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert seen["a_waited"] and seen["b_waited"], "the two threads did not overlap"
    assert seen["a_enabled"] is False and seen["a_requires_grad"] is False
    assert seen["b_enabled"] is True and seen["b_parents"] == 1
    assert np.array_equal(seen["b_grad"], np.array([0.0, 2.0]))
    assert is_grad_enabled()


# -------------------------------------------------------------------- overloads

def _pair(shape, seed):
    a = np.random.default_rng(seed).standard_normal(shape)
    return _leaf(a), torch.tensor(a, requires_grad=True)


OVERLOADS = [
    ("add", lambda x, y: x + y),
    ("sub", lambda x, y: x - y),
    ("mul", lambda x, y: x * y),
    ("neg", lambda x, y: -x),
    ("radd scalar", lambda x, y: 2.5 + x),
    ("add scalar", lambda x, y: x + 2.5),
    ("rsub scalar", lambda x, y: 1.5 - x),
    ("rmul scalar", lambda x, y: 3.0 * y),
    ("getitem slice", lambda x, y: x[1:, :2]),
    ("getitem row", lambda x, y: y[0]),
    ("sum method", lambda x, y: (x * y).sum()),
    ("sum axis", lambda x, y: x.sum(axis=0)),
    ("sum keepdims", lambda x, y: y.sum(axis=1, keepdims=True)),
    ("mean method", lambda x, y: x.mean()),
    ("reshape varargs", lambda x, y: x.reshape(4, 3)),
    ("reshape tuple", lambda x, y: y.reshape((2, 6))),
    ("transpose", lambda x, y: x.transpose(1, 0) * 2.0),
    ("relu tanh exp", lambda x, y: x.relu() + y.tanh() + x.exp()),
    ("log", lambda x, y: (x * x + 1.0).log()),
]


def _torch_sum(t, axis=None, keepdims=False):
    return t.sum() if axis is None else t.sum(dim=axis, keepdim=keepdims)


def _as_torch(fn):
    """The same expression on torch tensors (torch spells sum/mean/transpose differently)."""
    class T:
        def __init__(self, t): self.t = t
        def __add__(self, o): return T(self.t + _u(o))
        def __radd__(self, o): return T(_u(o) + self.t)
        def __sub__(self, o): return T(self.t - _u(o))
        def __rsub__(self, o): return T(_u(o) - self.t)
        def __mul__(self, o): return T(self.t * _u(o))
        def __rmul__(self, o): return T(_u(o) * self.t)
        def __matmul__(self, o): return T(self.t @ _u(o))
        def __neg__(self): return T(-self.t)
        def __getitem__(self, i): return T(self.t[i])
        def sum(self, axis=None, keepdims=False): return T(_torch_sum(self.t, axis, keepdims))
        def mean(self): return T(self.t.mean())
        def reshape(self, *s): return T(self.t.reshape(*s))
        def transpose(self, *a): return T(self.t.permute(*a))
        def relu(self): return T(torch.relu(self.t))
        def tanh(self): return T(torch.tanh(self.t))
        def exp(self): return T(torch.exp(self.t))
        def log(self): return T(torch.log(self.t))

    def _u(o): return o.t if isinstance(o, T) else o
    return lambda a, b: fn(T(a), T(b)).t


@pytest.mark.parametrize("fn", [f for _, f in OVERLOADS], ids=[n for n, _ in OVERLOADS])
def test_operator_overloads_match_torch(fn):
    (x, xt), (y, yt) = _pair((3, 4), 7), _pair((3, 4), 8)
    out = fn(x, y)
    outt = _as_torch(fn)(xt, yt)
    np.testing.assert_allclose(out.data, outt.detach().numpy(), rtol=1e-12, atol=1e-12)
    g = np.random.default_rng(9).standard_normal(out.shape)
    out.backward(g)
    outt.backward(torch.from_numpy(g))
    for mine, theirs in ((x, xt), (y, yt)):
        if theirs.grad is None:
            assert mine.grad is None
        else:
            np.testing.assert_allclose(mine.grad, theirs.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_matmul_overload_matches_torch():
    (a, at), (b, bt) = _pair((2, 3, 4), 10), _pair((4, 5), 11)
    out, outt = a @ b, at @ bt
    np.testing.assert_allclose(out.data, outt.detach().numpy(), rtol=1e-12, atol=1e-12)
    out.sum().backward()
    outt.sum().backward()
    np.testing.assert_allclose(a.grad, at.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(b.grad, bt.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_scalar_lift_keeps_float32():
    x = _leaf(np.ones(3, dtype=np.float32))
    for y in (x + 1.5, 2.0 * x, 1.0 - x, x * np.float64(0.5)):
        assert y.dtype == np.float32


def test_numpy_scalar_on_the_left_defers_to_tensor():
    # np.float64(2) * x must call Tensor.__rmul__, not build an object array of Tensors
    x = _leaf(np.arange(3.0))
    for y in (np.float64(2.0) * x, np.float32(2.0) + x, np.ones(3) - x):
        assert isinstance(y, Tensor) and y.requires_grad
    y = np.float64(2.0) * x
    y.sum().backward()
    assert np.array_equal(x.grad, np.full(3, 2.0))
