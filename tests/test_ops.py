"""The op library against PyTorch, the fused ops against their compositions, dtype rules,
the three attention entries against the reference chain, and the errors bad shapes get.

The cases come from the one op table (``numgpt/verify/op_cases.py``), which also feeds the
gradient gate and ``benchmarks/bench_ops.py``. PyTorch is the oracle only here: every op runs on the same float64 inputs in both
libraries, then both back-propagate the same random upstream gradient, and outputs and
input gradients must agree to ~1e-10.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from numgpt.core import ops
from numgpt.errors import DTypeError, NumGPTError, ShapeError
from numgpt.verify import op_cases as op_table
from numgpt.verify.op_cases import OpCase

TOL = dict(rtol=1e-10, atol=1e-10)
FUSED_TOL = dict(rtol=0.0, atol=1e-12)
B, nh, T, hs = 2, 2, 4, 8
C = 4  # channels of the Q/K/V split cases


# every op's cases, built from the one op table (numgpt/verify/op_cases.py), float64
CASES = op_table.cases()
TORCH_CASES = op_table.torch_cases()


def _inputs(case: OpCase, dtype=np.float64) -> list:
    """The case's inputs: the same arrays on every call (seeded by the case's place in the table)."""
    return case.inputs(np.random.default_rng(1234 + CASES.index(case)), dtype)


def _upstream(out: np.ndarray, seed: int = 99) -> np.ndarray:
    return np.asarray(np.random.default_rng(seed).standard_normal(np.shape(out)), dtype=out.dtype)


def test_table_covers_every_op():
    covered = {c.op.__name__ for c in CASES}
    assert covered == set(ops.__all__) - {"unbroadcast"}


# ----------------------------------------------------------------------- vs PyTorch

@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: c.name)
def test_op_matches_torch_forward_and_backward(case: OpCase):
    inputs, consts = _inputs(case), case.consts()
    with np.errstate(invalid="raise", over="raise"):
        out, backward = op_table.call(case.entry, inputs, consts)

    tin = [None if x is None else torch.tensor(x, requires_grad=case.entry.differentiable) for x in inputs]
    tout = op_table.torch_fn(case.entry)(*tin, **consts)
    assert tuple(tout.shape) == out.shape
    np.testing.assert_allclose(out, tout.detach().numpy(), **TOL)
    if not case.entry.differentiable:
        assert backward is None  # forward only: inference keeps nothing for a backward pass
        return
    g = _upstream(out)
    grads = backward(g)
    assert len(grads) == len(inputs)
    tout.backward(torch.from_numpy(g))
    for x, t, grad in zip(inputs, tin, grads):
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


# ------------------------------------------- the attention entries vs the reference chain

def _reference_attention(q, k, v, key_lengths=None):
    """The four-op chain written out here (scores, mask, softmax, P @ v) with its backward."""
    s, b_scores = ops.attention_scores(q, k)  # (B, nh, Tq, Tk)
    m, b_mask = ops.causal_mask(s, key_lengths=key_lengths)
    p, b_softmax = ops.softmax(m)
    y, b_out = ops.attention_output(p, v)  # (B, nh, Tq, hs)

    def backward(g):
        dp, dv = b_out(g)
        dq, dk = b_scores(*b_mask(*b_softmax(dp)))
        return dq, dk, dv
    return y, backward


def _qkv(Tq: int, Tk: int, dtype=np.float64, seed: int = 5):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((B, nh, n, hs)).astype(dtype) for n in (Tq, Tk, Tk))


@pytest.mark.parametrize("Tq,Tk", [(4, 4), (2, 5), (1, 5)])
def test_reference_entry_is_the_four_op_chain(Tq, Tk):
    q, k, v = _qkv(Tq, Tk)
    out, backward = ops.attention_reference(q, k, v)
    y, chain_bw = _reference_attention(q, k, v)
    assert np.array_equal(out, y)
    g = _upstream(y)
    for ours, chain in zip(backward(g), chain_bw(g)):
        assert np.array_equal(ours, chain)


@pytest.mark.parametrize("block", [128, 3, 1], ids=["one block", "blocks of 3", "blocks of 1"])
def test_training_entry_equals_the_reference_chain(block):
    rng = np.random.default_rng(6)
    qkv = rng.standard_normal((B, 7, 3 * nh * hs))  # (B, T, 3C)
    fused, fused_bw = ops.attention_training(qkv, n_head=nh, block=block)  # (B, T, C)
    q, k, v = ops.split_heads(qkv, nh)
    y, chain_bw = _reference_attention(q, k, v)
    np.testing.assert_allclose(fused, ops.merge_heads(y), **FUSED_TOL)
    g = _upstream(fused)
    dq, dk, dv = chain_bw(g.reshape(B, 7, nh, hs).transpose(0, 2, 1, 3))  # (B, nh, T, hs) each
    dqkv = np.concatenate([ops.merge_heads(d) for d in (dq, dk, dv)], axis=-1)  # (B, T, 3C)
    np.testing.assert_allclose(fused_bw(g)[0], dqkv, **FUSED_TOL)


@pytest.mark.parametrize("block", [128, 1], ids=["one block", "blocks of 1"])
@pytest.mark.parametrize("Tq,Tk,lengths", [(4, 4, None), (2, 5, None), (1, 5, None), (2, 5, [3, 5]),
                                           (3, 5, [5, 4])])
def test_inference_entry_equals_the_reference_chain(Tq, Tk, lengths, block):
    q, k, v = _qkv(Tq, Tk)
    key_lengths = None if lengths is None else np.array(lengths)
    out = ops.attention_inference(q, k, v, key_lengths=key_lengths, block=block)
    np.testing.assert_allclose(out, _reference_attention(q, k, v, key_lengths)[0], **FUSED_TOL)


def test_entries_equal_the_reference_in_float32_to_float32_rounding():
    q, k, v = _qkv(6, 6, np.float32)
    want = _reference_attention(*(a.astype(np.float64) for a in (q, k, v)))[0]
    ref32 = ops.attention_reference(q, k, v)[0]
    qkv = np.concatenate([ops.merge_heads(a) for a in (q, k, v)], axis=-1)  # (B, T, 3C)
    train32 = ops.attention_training(qkv, n_head=nh, block=4)[0]
    infer32 = ops.attention_inference(q, k, v, block=4)
    assert ref32.dtype == train32.dtype == infer32.dtype == np.float32
    eps32 = np.finfo(np.float32).eps
    for got in (ops.merge_heads(ref32), train32, ops.merge_heads(infer32)):
        err = np.max(np.abs(got - ops.merge_heads(want)))
        assert err < 16 * eps32, err  # a few float32 roundings of O(1) values
        assert err > 0  # really computed in float32 (not float64 and cast)


def test_negative_controls_wrong_attention_fails_the_reference_check():
    q, k, v = _qkv(4, 4)
    y = _reference_attention(q, k, v)[0]
    unscaled = ops.attention_inference(q * math.sqrt(hs), k, v)  # scores without 1/sqrt(hs)
    one_key_short = ops.attention_inference(q, k, v, key_lengths=np.array([4, 4]))
    sees_future = ops.attention_output(ops.softmax(ops.attention_scores(q, k)[0])[0], v)[0]  # no mask
    assert np.array_equal(one_key_short, ops.attention_inference(q, k, v))  # lengths = Tk: same
    for wrong in (unscaled, sees_future, ops.attention_inference(q, k, v[:, :, ::-1])):
        assert np.max(np.abs(wrong - y)) > 1e-3


# --------------------------------------------------------------------------- dtype

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_float32_in_float32_out_and_float32_grads(case: OpCase):
    inputs = _inputs(case, np.float32)
    out, backward = op_table.call(case.entry, inputs, case.consts())
    assert out.dtype == np.float32
    if backward is None:
        return
    grads = backward(_upstream(out))
    for x, grad in zip(inputs, grads):
        if x is not None:
            assert grad.dtype == np.float32, f"gradient is {grad.dtype}"
            assert grad.shape == x.shape


MULTI_INPUT = [c for c in CASES if sum(x is not None for x in _inputs(c)) >= 2]


@pytest.mark.parametrize("case", MULTI_INPUT, ids=lambda c: c.name)
def test_mixed_float32_float64_inputs_raise_type_error(case: OpCase):
    inputs = _inputs(case)
    inputs[0] = inputs[0].astype(np.float32)
    with pytest.raises(TypeError, match="float32") as info:
        case.op(*inputs, **case.consts())
    assert isinstance(info.value, DTypeError) and isinstance(info.value, NumGPTError)


SHAPE_MOVES = {"reshape", "transpose", "slice"}  # they move elements and need no float math


@pytest.mark.parametrize("case", [c for c in CASES if c.op.__name__ not in SHAPE_MOVES], ids=lambda c: c.name)
def test_integer_arrays_as_float_inputs_raise_type_error(case: OpCase):
    inputs = _inputs(case, np.int64)
    with pytest.raises(TypeError, match="int64") as info:
        case.op(*inputs, **case.consts())
    assert isinstance(info.value, DTypeError)


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
    ("attention q/k mismatch", lambda: ops.attention_inference(z((2, 2, 4, 8)), z((2, 3, 4, 8)), z((2, 3, 4, 8))),
     ["(2, 2, 4, 8)", "(2, 3, 4, 8)"]),
    ("attention v mismatch", lambda: ops.attention_reference(z((2, 2, 4, 8)), z((2, 2, 4, 8)), z((2, 2, 5, 8))),
     ["(2, 2, 5, 8)", "(2, 2, 4, 8)"]),
    ("attention more queries than keys",
     lambda: ops.attention_inference(z((1, 1, 5, 8)), z((1, 1, 3, 8)), z((1, 1, 3, 8))), ["5", "3"]),
    ("attention_training qkv not (B, T, 3C)", lambda: ops.attention_training(z((2, 4, 10)), n_head=2),
     ["(2, 4, 10)", "n_head=2"]),
    ("attention key_lengths shape", lambda: ops.attention_inference(z((2, 1, 2, 8)), z((2, 1, 5, 8)),
                                                                   z((2, 1, 5, 8)), key_lengths=np.array([5])),
     ["(1,)", "(2,)"]),
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
