"""The op library against PyTorch, the fused ops against their compositions, dtype rules,
and the errors bad shapes get.

PyTorch is the oracle only here: every op runs on the same float64 inputs in both
libraries, then both back-propagate the same random upstream gradient, and outputs and
input gradients must agree to ~1e-10.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from numgpt.core import ops
from numgpt.errors import NumGPTError, ShapeError

TOL = dict(rtol=1e-10, atol=1e-10)
FUSED_TOL = dict(rtol=0.0, atol=1e-12)
B, nh, T, hs = 2, 2, 4, 8
C = 4  # channels of the Q/K/V split cases


@dataclass
class Case:
    id: str
    op: Callable
    inputs: list  # differentiable inputs (ndarray or None), float64
    consts: dict = field(default_factory=dict)
    torch_fn: Callable | None = None  # (*torch tensors or None) -> torch tensor


def _visible(Tq: int, Tk: int) -> torch.Tensor:
    """allowed[i, j]: query i (at absolute position Tk - Tq + i) may look at key j."""
    i = torch.arange(Tq)[:, None]
    j = torch.arange(Tk)[None, :]
    return j <= i + (Tk - Tq)


def _row_visible(lengths: list[int], Tq: int, Tk: int) -> torch.Tensor:
    """(B, 1, Tq, Tk): row b holds lengths[b] real keys; its queries are the newest Tq."""
    rows = [torch.cat([_visible(Tq, n), torch.zeros(Tq, Tk - n, dtype=torch.bool)], dim=1) for n in lengths]
    return torch.stack(rows)[:, None]


def _masked(s: torch.Tensor) -> torch.Tensor:
    return s.masked_fill(~_visible(*s.shape[-2:]), float("-inf"))


def _self_attention(qkv: torch.Tensor, nh: int) -> torch.Tensor:
    """nanoGPT's split, causal SDPA and head merge: (B, T, 3C) -> (B, T, C)."""
    B, T, C3 = qkv.shape
    q, k, v = (t.reshape(B, T, nh, C3 // (3 * nh)).transpose(1, 2) for t in qkv.split(C3 // 3, dim=2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
    return y.transpose(1, 2).reshape(B, T, C3 // 3)


def _cases() -> list[Case]:
    rng = np.random.default_rng(1234)
    r = lambda *s: rng.standard_normal(s)  # noqa: E731
    ids = np.array([[1, 3, 1, 0], [3, 3, 2, 1]])  # repeated ids on purpose
    targets = np.array([[1, 4, 0], [2, 2, 3]])
    ignored = np.array([[1, -1, 0], [-1, 2, 3]])
    tt = lambda a: torch.from_numpy(a)  # noqa: E731
    cases = [
        Case("add", ops.add, [r(3, 4), r(3, 4)], {}, lambda a, b: a + b),
        Case("add broadcast row", ops.add, [r(2, 3, 4), r(4)], {}, lambda a, b: a + b),
        Case("add broadcast both", ops.add, [r(2, 1, 4), r(3, 1)], {}, lambda a, b: a + b),
        Case("sub", ops.sub, [r(3, 4), r(3, 4)], {}, lambda a, b: a - b),
        Case("sub broadcast", ops.sub, [r(2, 3, 4), r(1, 3, 1)], {}, lambda a, b: a - b),
        Case("mul", ops.mul, [r(3, 4), r(3, 4)], {}, lambda a, b: a * b),
        Case("mul broadcast", ops.mul, [r(2, 3, 4), r(3, 1)], {}, lambda a, b: a * b),
        Case("scale", ops.scale, [r(3, 4)], {"c": -1.7}, lambda x: x * -1.7),
        Case("neg", ops.neg, [r(3, 4)], {}, lambda x: -x),
        Case("relu", ops.relu, [r(3, 4)], {}, torch.relu),
        Case("relu at +-inf", ops.relu, [np.array([-np.inf, -2.0, 0.5, np.inf])], {}, torch.relu),
        Case("tanh", ops.tanh, [2 * r(3, 4)], {}, torch.tanh),
        Case("exp", ops.exp, [r(3, 4)], {}, torch.exp),
        Case("log", ops.log, [np.abs(r(3, 4)) + 0.1], {}, torch.log),
        Case("gelu erf", ops.gelu, [3 * r(4, 5)], {}, F.gelu),
        Case("gelu_tanh", ops.gelu_tanh, [3 * r(4, 5)], {}, lambda x: F.gelu(x, approximate="tanh")),
        Case("matmul 2-D", ops.matmul, [r(3, 4), r(4, 5)], {}, torch.matmul),
        Case("matmul 3-D batched", ops.matmul, [r(2, 3, 4), r(2, 4, 5)], {}, torch.matmul),
        Case("matmul 3-D @ 2-D", ops.matmul, [r(2, 3, 4), r(4, 5)], {}, torch.matmul),
        Case("matmul 4-D broadcast", ops.matmul, [r(2, 1, 3, 4), r(1, 3, 4, 2)], {}, torch.matmul),
        # numgpt stores W (in, out); torch's F.linear wants (out, in)
        Case("linear", ops.linear, [r(5, 4), r(4, 3), r(3)], {}, lambda x, w, b: F.linear(x, w.T, b)),
        Case("linear no bias", ops.linear, [r(5, 4), r(4, 3), None], {}, lambda x, w, b: F.linear(x, w.T)),
        Case("linear 3-D input", ops.linear, [r(2, 3, 4), r(4, 6), r(6)], {},
             lambda x, w, b: F.linear(x, w.T, b)),
        Case("sum all", ops.sum, [r(2, 3, 4)], {}, lambda x: x.sum()),
        Case("sum axis 1 keepdims", ops.sum, [r(2, 3, 4)], {"axis": 1, "keepdims": True},
             lambda x: x.sum(dim=1, keepdim=True)),
        Case("sum axes 0,2", ops.sum, [r(2, 3, 4)], {"axis": (0, 2)}, lambda x: x.sum(dim=(0, 2))),
        Case("sum axis -1", ops.sum, [r(2, 3, 4)], {"axis": -1}, lambda x: x.sum(dim=-1)),
        Case("mean all", ops.mean, [r(2, 3, 4)], {}, lambda x: x.mean()),
        Case("mean axis -1", ops.mean, [r(2, 3, 4)], {"axis": -1}, lambda x: x.mean(dim=-1)),
        Case("mean axis 0 keepdims", ops.mean, [r(2, 3, 4)], {"axis": 0, "keepdims": True},
             lambda x: x.mean(dim=0, keepdim=True)),
        Case("mean axes 1,2 keepdims", ops.mean, [r(2, 3, 4)], {"axis": (1, 2), "keepdims": True},
             lambda x: x.mean(dim=(1, 2), keepdim=True)),
        Case("reshape", ops.reshape, [r(2, 3, 4)], {"shape": (6, 4)}, lambda x: x.reshape(6, 4)),
        Case("reshape with -1", ops.reshape, [r(2, 3, 4)], {"shape": (4, -1)}, lambda x: x.reshape(4, -1)),
        Case("transpose head split", ops.transpose, [r(B, T, nh, hs)], {"axes": (0, 2, 1, 3)},
             lambda x: x.permute(0, 2, 1, 3)),
        Case("transpose permute 3-D", ops.transpose, [r(2, 3, 4)], {"axes": (2, 0, 1)},
             lambda x: x.permute(2, 0, 1)),
        Case("slice q", ops.slice, [r(B, T, 3 * C)], {"index": (Ellipsis, np.s_[0:C])},
             lambda x: x.split(C, dim=-1)[0]),
        Case("slice k", ops.slice, [r(B, T, 3 * C)], {"index": (Ellipsis, np.s_[C:2 * C])},
             lambda x: x.split(C, dim=-1)[1]),
        Case("slice v", ops.slice, [r(B, T, 3 * C)], {"index": (Ellipsis, np.s_[2 * C:3 * C])},
             lambda x: x.split(C, dim=-1)[2]),
        Case("softmax", ops.softmax, [3 * r(2, 3, 5)], {}, lambda x: torch.softmax(x, dim=-1)),
        Case("softmax large logits", ops.softmax, [r(2, 5) + 800.0], {}, lambda x: torch.softmax(x, dim=-1)),
        Case("log_softmax", ops.log_softmax, [3 * r(2, 3, 5)], {}, lambda x: torch.log_softmax(x, dim=-1)),
        Case("cross_entropy", ops.cross_entropy, [r(2, 3, 5)], {"targets": targets},
             lambda z: F.cross_entropy(z.reshape(-1, 5), tt(targets).reshape(-1))),
        Case("cross_entropy ignore_index", ops.cross_entropy, [r(2, 3, 5)], {"targets": ignored},
             lambda z: F.cross_entropy(z.reshape(-1, 5), tt(ignored).reshape(-1), ignore_index=-1)),
        Case("layernorm", ops.layernorm, [r(2, 3, 6), 1 + 0.1 * r(6), r(6)], {"eps": 1e-5},
             lambda x, g, b: F.layer_norm(x, (6,), g, b, eps=1e-5)),
        Case("layernorm no beta", ops.layernorm, [r(2, 3, 6), 1 + 0.1 * r(6), None], {"eps": 1e-5},
             lambda x, g, b: F.layer_norm(x, (6,), g, None, eps=1e-5)),
        Case("embedding repeated ids", ops.embedding, [r(5, 3)], {"ids": ids},
             lambda w: F.embedding(tt(ids), w)),
        Case("tied_head", ops.tied_head, [r(2, 3, 4), r(7, 4)], {}, lambda x, w: x @ w.T),
        Case("attention_scores", ops.attention_scores, [r(B, nh, T, hs), r(B, nh, T, hs)], {},
             lambda q, k: q @ k.transpose(-1, -2) / math.sqrt(hs)),
        Case("attention_scores cache", ops.attention_scores, [r(B, nh, 2, hs), r(B, nh, 5, hs)], {},
             lambda q, k: q @ k.transpose(-1, -2) / math.sqrt(hs)),
        Case("causal_mask", ops.causal_mask, [r(B, nh, T, T)], {}, _masked),
        Case("causal_mask cache", ops.causal_mask, [r(B, nh, 2, 5)], {}, _masked),
        Case("attention_output", ops.attention_output, [ops.softmax(r(B, nh, T, T))[0], r(B, nh, T, hs)], {},
             lambda p, v: p @ v),
        Case("attention fused causal", ops.attention, [r(B, nh, T, hs), r(B, nh, T, hs), r(B, nh, T, hs)], {},
             lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        Case("attention fused 2 queries on 5 cached keys", ops.attention,
             [r(B, nh, 2, hs), r(B, nh, 5, hs), r(B, nh, 5, hs)], {},
             lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=_visible(2, 5))),
        Case("attention fused 1 query on 5 cached keys", ops.attention,
             [r(B, nh, 1, hs), r(B, nh, 5, hs), r(B, nh, 5, hs)], {},
             lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=_visible(1, 5))),
        Case("attention fused per-row cache lengths 3 and 5", ops.attention,
             [r(B, nh, 2, hs), r(B, nh, 5, hs), r(B, nh, 5, hs)], {"key_lengths": np.array([3, 5])},
             lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=_row_visible([3, 5], 2, 5))),
        Case("self_attention (split, attend, merge)", ops.self_attention, [r(B, T, 3 * nh * hs)],
             {"n_head": nh}, lambda qkv: _self_attention(qkv, nh)),
        # dropout is compared with torch in its own test (same mask); here for the dtype tests
        Case("dropout", ops.dropout, [r(3, 4)], {"p": 0.3, "rng": np.random.default_rng(0)}, None),
    ]
    return cases


CASES = _cases()
TORCH_CASES = [c for c in CASES if c.torch_fn is not None]


def _consts(case: Case) -> dict:
    """Fresh constants (a fresh generator for dropout, so every run draws the same mask)."""
    consts = dict(case.consts)
    if "rng" in consts:
        consts["rng"] = np.random.default_rng(0)
    return consts


def _upstream(out: np.ndarray, seed: int = 99) -> np.ndarray:
    return np.asarray(np.random.default_rng(seed).standard_normal(np.shape(out)), dtype=out.dtype)


def test_table_covers_every_op():
    covered = {c.op.__name__ for c in CASES}
    assert covered == set(ops.__all__) - {"unbroadcast"}


# ----------------------------------------------------------------------- vs PyTorch

@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: c.id)
def test_op_matches_torch_forward_and_backward(case: Case):
    with np.errstate(invalid="raise", over="raise"):
        out, backward = case.op(*case.inputs, **case.consts)
    g = _upstream(out)
    grads = backward(g)
    assert len(grads) == len(case.inputs)

    tin = [None if x is None else torch.tensor(x, requires_grad=True) for x in case.inputs]
    tout = case.torch_fn(*tin)
    assert tuple(tout.shape) == out.shape
    np.testing.assert_allclose(out, tout.detach().numpy(), **TOL)
    tout.backward(torch.from_numpy(g))
    for x, t, grad in zip(case.inputs, tin, grads):
        if x is None:
            assert grad is None
            continue
        assert grad.shape == x.shape
        np.testing.assert_allclose(grad, t.grad.numpy(), **TOL)


def test_dropout_matches_torch_with_the_same_mask():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 64))  # no exact zeros, so the mask is readable from the output
    p = 0.3
    out, backward = ops.dropout(x, p=p, rng=np.random.default_rng(5))
    keep = out != 0
    assert abs(keep.mean() - (1 - p)) < 0.03  # 4096 draws: std of the kept fraction ~0.007
    g = _upstream(out)
    grad, = backward(g)

    xt = torch.tensor(x, requires_grad=True)
    mask = torch.from_numpy(keep).to(torch.float64)
    yt = xt * mask / (1 - p)
    yt.backward(torch.from_numpy(g))
    np.testing.assert_allclose(out, yt.detach().numpy(), **TOL)
    np.testing.assert_allclose(grad, xt.grad.numpy(), **TOL)


def test_dropout_same_seed_same_mask_and_eval_is_identity():
    x = np.random.default_rng(0).standard_normal((8, 8))
    a, _ = ops.dropout(x, p=0.5, rng=np.random.default_rng(11))
    b, _ = ops.dropout(x, p=0.5, rng=np.random.default_rng(11))
    c, _ = ops.dropout(x, p=0.5, rng=np.random.default_rng(12))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    for kwargs in ({"p": 0.0, "rng": np.random.default_rng(1)}, {"p": 0.5, "rng": None}):
        out, backward = ops.dropout(x, **kwargs)
        assert np.array_equal(out, x)
        assert np.array_equal(backward(x)[0], x)
    with pytest.raises(ValueError, match="1.0"):
        ops.dropout(x, p=1.0, rng=np.random.default_rng(1))


# ------------------------------------------------------------ fused vs composed

def _composed_cross_entropy(logits: np.ndarray, targets: np.ndarray, ignore_index: int = -1):
    """-mean(log(softmax(z))[row, t]) over kept rows, built from ops, with its backward."""
    V = logits.shape[-1]
    z, b_reshape = ops.reshape(logits, shape=(-1, V))  # (N, V)
    t = targets.reshape(-1)
    rows = np.nonzero(t != ignore_index)[0]
    p, b_softmax = ops.softmax(z)
    logp, b_log = ops.log(p)
    picked, b_pick = ops.slice(logp, index=(rows, t[rows]))  # (n,)
    m, b_mean = ops.mean(picked)
    loss, b_neg = ops.neg(m)

    def backward(dout):
        d, = b_neg(dout)
        d, = b_mean(d)
        d, = b_pick(d)
        d, = b_log(d)
        d, = b_softmax(d)
        return b_reshape(d)
    return loss, backward


@pytest.mark.parametrize("targets", [np.array([[1, 4, 0], [2, 2, 3]]), np.array([[1, -1, 0], [-1, 2, 3]])],
                         ids=["all targets", "ignore_index"])
def test_fused_cross_entropy_equals_softmax_log_gather(targets):
    logits = 2 * np.random.default_rng(4).standard_normal((2, 3, 5))
    fused, fused_bw = ops.cross_entropy(logits, targets=targets)
    composed, composed_bw = _composed_cross_entropy(logits, targets)
    np.testing.assert_allclose(fused, composed, **FUSED_TOL)
    dout = np.float64(1.7)
    np.testing.assert_allclose(fused_bw(dout)[0], composed_bw(dout)[0], **FUSED_TOL)


@pytest.mark.parametrize("Tq,Tk", [(4, 4), (2, 5), (1, 5)])
def test_fused_attention_equals_four_op_composition(Tq, Tk):
    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((B, nh, Tq, hs)), rng.standard_normal((B, nh, Tk, hs)), \
        rng.standard_normal((B, nh, Tk, hs))
    fused, fused_bw = ops.attention(q, k, v)

    s, b_scores = ops.attention_scores(q, k)  # (B, nh, Tq, Tk)
    m, b_mask = ops.causal_mask(s)
    p, b_softmax = ops.softmax(m)
    y, b_out = ops.attention_output(p, v)  # (B, nh, Tq, hs)
    np.testing.assert_allclose(fused, y, **FUSED_TOL)

    g = _upstream(y)
    dp, dv = b_out(g)
    dq, dk = b_scores(*b_mask(*b_softmax(dp)))
    for fused_grad, composed_grad in zip(fused_bw(g), (dq, dk, dv)):
        np.testing.assert_allclose(fused_grad, composed_grad, **FUSED_TOL)


# --------------------------------------------------------------------------- dtype

def _cast(case: Case, dtype) -> list:
    with np.errstate(invalid="ignore"):  # +-inf has no integer value; the dtype is what matters
        return [None if x is None else x.astype(dtype) for x in case.inputs]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_float32_in_float32_out_and_float32_grads(case: Case):
    inputs = _cast(case, np.float32)
    out, backward = case.op(*inputs, **_consts(case))
    assert out.dtype == np.float32
    grads = backward(_upstream(out))
    for x, grad in zip(inputs, grads):
        if x is not None:
            assert grad.dtype == np.float32, f"gradient is {grad.dtype}"
            assert grad.shape == x.shape


MULTI_INPUT = [c for c in CASES if sum(x is not None for x in c.inputs) >= 2]


@pytest.mark.parametrize("case", MULTI_INPUT, ids=lambda c: c.id)
def test_mixed_float32_float64_inputs_raise_type_error(case: Case):
    inputs = list(case.inputs)
    inputs[0] = inputs[0].astype(np.float32)
    with pytest.raises(TypeError, match="float32"):
        case.op(*inputs, **_consts(case))


SHAPE_MOVES = {"reshape", "transpose", "slice"}  # they move elements and need no float math


@pytest.mark.parametrize("case", [c for c in CASES if c.op.__name__ not in SHAPE_MOVES], ids=lambda c: c.id)
def test_integer_arrays_as_float_inputs_raise_type_error(case: Case):
    inputs = _cast(case, np.int64)
    with pytest.raises(TypeError, match="int64"):
        case.op(*inputs, **_consts(case))


def test_embedding_and_cross_entropy_reject_float_ids():
    w = np.ones((5, 3))
    with pytest.raises(TypeError, match="float64"):
        ops.embedding(w, ids=np.array([0.0, 1.0]))
    with pytest.raises(TypeError, match="float64"):
        ops.cross_entropy(np.ones((2, 5)), targets=np.array([0.0, 1.0]))


# ----------------------------------------------------------------------- bad input

z = np.zeros


SHAPE_ERRORS = [
    ("add (3,4)+(5,)", lambda: ops.add(z((3, 4)), z(5)), ["(3, 4)", "(5,)"]),
    ("sub no broadcast", lambda: ops.sub(z((2, 3)), z((3, 2))), ["(2, 3)", "(3, 2)"]),
    ("mul no broadcast", lambda: ops.mul(z((4,)), z((3,))), ["(4,)", "(3,)"]),
    ("matmul inner mismatch", lambda: ops.matmul(z((3, 4)), z((5, 6))), ["(3, 4)", "(5, 6)"]),
    ("matmul batch mismatch", lambda: ops.matmul(z((2, 3, 4)), z((3, 4, 5))), ["(2, 3, 4)", "(3, 4, 5)"]),
    ("linear weight mismatch", lambda: ops.linear(z((5, 4)), z((3, 6))), ["(5, 4)", "(3, 6)"]),
    ("linear bias mismatch", lambda: ops.linear(z((5, 4)), z((4, 3)), z(4)), ["(4,)", "(4, 3)"]),
    ("layernorm gamma mismatch", lambda: ops.layernorm(z((2, 3, 6)), z(5)), ["(2, 3, 6)", "(5,)"]),
    ("layernorm beta mismatch", lambda: ops.layernorm(z((2, 6)), z(6), z(4)), ["(2, 6)", "(4,)"]),
    ("cross_entropy target shape", lambda: ops.cross_entropy(z((2, 4, 5)), targets=np.zeros((2, 3), int)),
     ["(2, 3)", "(2, 4, 5)"]),
    ("tied_head mismatch", lambda: ops.tied_head(z((2, 3, 4)), z((7, 5))), ["(2, 3, 4)", "(7, 5)"]),
    ("attention_scores q/k mismatch", lambda: ops.attention_scores(z((2, 2, 4, 8)), z((2, 2, 4, 6))),
     ["(2, 2, 4, 8)", "(2, 2, 4, 6)"]),
    ("attention q/k mismatch", lambda: ops.attention(z((2, 2, 4, 8)), z((2, 3, 4, 8)), z((2, 3, 4, 8))),
     ["(2, 2, 4, 8)", "(2, 3, 4, 8)"]),
    ("attention v mismatch", lambda: ops.attention(z((2, 2, 4, 8)), z((2, 2, 4, 8)), z((2, 2, 5, 8))),
     ["(2, 2, 5, 8)", "(2, 2, 4, 8)"]),
    ("attention more queries than keys", lambda: ops.attention(z((1, 1, 5, 8)), z((1, 1, 3, 8)), z((1, 1, 3, 8))),
     ["5", "3"]),
    ("reshape wrong size", lambda: ops.reshape(z((2, 3, 4)), shape=(5, 5)), ["(2, 3, 4)", "(5, 5)"]),
    ("transpose not a permutation", lambda: ops.transpose(z((2, 3, 4)), axes=(0, 0, 1)), ["(0, 0, 1)", "(2, 3, 4)"]),
    ("sum axis out of range", lambda: ops.sum(z((2, 3)), axis=2), ["axis 2", "2 dims"]),
    ("embedding id too large", lambda: ops.embedding(z((5, 3)), ids=np.array([[1, 7]])), ["[0, 5)", "7"]),
    ("embedding negative id", lambda: ops.embedding(z((5, 3)), ids=np.array([-2, 1])), ["[0, 5)", "-2"]),
    ("cross_entropy target too large",
     lambda: ops.cross_entropy(z((2, 3, 5)), targets=np.array([[0, 9, 1], [2, 3, 4]])), ["[0, 5)", "9"]),
    ("cross_entropy negative target",
     lambda: ops.cross_entropy(z((2, 5)), targets=np.array([-3, 1])), ["[0, 5)", "-3"]),
]


@pytest.mark.parametrize("call,expected", [pytest.param(c, e, id=i) for i, c, e in SHAPE_ERRORS])
def test_bad_shapes_raise_value_error_naming_both_shapes(call, expected):
    with pytest.raises(ValueError) as info:
        call()
    assert isinstance(info.value, ShapeError) and isinstance(info.value, NumGPTError)
    for text in expected:
        assert text in str(info.value), f"{text!r} missing from: {info.value}"
