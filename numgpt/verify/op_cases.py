"""The one table of op cases: every op of ``numgpt.core.ops``, the inputs it is checked
on, which of them are differentiable, and its PyTorch equivalent.

Three consumers read it, so an op is added (or a shape changed) in one place:

* the float64 gradient gate (``numgpt.verify.gradcheck``, ``numgpt gradcheck``,
  ``tests/test_gradcheck.py``): every case with ``gate=True``;
* the PyTorch parity tests (``tests/test_ops.py``): every case with ``torch=True`` (forward
  and, for differentiable ops, every input gradient), plus the dtype and float32 tests on
  every case;
* the per-op timing (``benchmarks/bench_ops.py``): each entry's ``bench`` shapes, forward
  and backward, numgpt against torch.

From any op a reader reaches, in one hop each: its derivation (the docstring of
``ops.<name>``), its tests (``tests/test_ops.py`` parametrised ids ``<name>: <label>``, the
gate rows ``docs/results/gradcheck.md`` under the same names) and its timing (the row
``<name>`` of ``docs/results/bench_ops.md``).

numgpt never imports torch at import time: the torch equivalents are source strings,
evaluated by ``torch_fn`` (called only by tests and the benchmark) in a namespace holding
torch, ``F`` (torch.nn.functional), ``math`` and the few torch helpers below.

Shape legend: B batch, T time, C channels, nh heads, hs head size, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..core import ops

__all__ = ["Case", "OpEntry", "OpCase", "TABLE", "cases", "gate_cases", "torch_cases",
           "entry", "torch_fn", "call", "FixedGenerator"]

B, nh, T, hs = 2, 2, 4, 8  # attention cases
C = 4  # channels of the Q/K/V slice cases


class FixedGenerator:
    """Hands out the same random stream on every call, so repeated forwards (central
    differences, float32 reruns) share one dropout mask."""

    def __init__(self, rng: np.random.Generator):
        self._state = rng.bit_generator.state

    def random(self, shape, dtype=np.float64):
        g = np.random.default_rng()
        g.bit_generator.state = self._state
        return g.random(shape, dtype=dtype)


@dataclass(frozen=True)
class Case:
    """One set of inputs for an op.

    ``shapes``: one per positional input (None: that optional input is absent).
    ``consts``: keyword constants, or a zero-argument callable making fresh ones.
    ``make``: overrides the entry's input builder (explicit values such as +-inf).
    """
    label: str
    shapes: tuple = ()
    consts: dict | Callable[[], dict] = field(default_factory=dict)
    gate: bool = True  # in the float64 gradient gate
    torch: bool = True  # in the PyTorch parity tests (when the entry has a torch equivalent)
    make: Callable[[np.random.Generator], list] | None = None


def _normal(rng: np.random.Generator, shape: tuple, position: int) -> np.ndarray:
    return rng.standard_normal(shape)


@dataclass(frozen=True)
class OpEntry:
    """One op: the function (its docstring holds the derivation), its positional input
    names, how to build an input of a given shape, its torch equivalent as source text of
    ``lambda *tensors, **consts: ...``, its cases and the shapes it is timed at."""
    op: Callable
    inputs: tuple[str, ...]
    torch: str | None
    cases: tuple[Case, ...]
    bench: Callable[[dict], Case]  # sizes {B, T, C, nh, V} -> the case bench_ops times
    make: Callable[[np.random.Generator, tuple, int], np.ndarray] = _normal
    differentiable: bool = True  # False: forward only (no backward to check or time)

    @property
    def name(self) -> str:
        return self.op.__name__


@dataclass(frozen=True)
class OpCase:
    """A case bound to its entry: what the consumers iterate."""
    entry: OpEntry
    case: Case

    @property
    def name(self) -> str:
        return f"{self.entry.name}: {self.case.label}" if self.case.label else self.entry.name

    @property
    def op(self) -> Callable:
        return self.entry.op

    @property
    def input_names(self) -> list[str]:
        return list(self.entry.inputs)

    def consts(self) -> dict:
        c = self.case.consts
        return dict(c() if callable(c) else c)

    def inputs(self, rng: np.random.Generator, dtype=np.float64) -> list:
        """The positional inputs, built in float64 from ``rng`` then cast to ``dtype``."""
        if self.case.make is not None:
            arrays = self.case.make(rng)
        else:
            arrays = [None if s is None else self.entry.make(rng, s, i) for i, s in enumerate(self.case.shapes)]
        with np.errstate(invalid="ignore"):  # +-inf has no integer value; the dtype is what matters
            return [None if x is None else np.asarray(x).astype(dtype) for x in arrays]


def call(entry: OpEntry, inputs: list, consts: dict):
    """``(out, backward)`` for every op; ``backward`` is None for a forward-only op."""
    if entry.differentiable:
        return entry.op(*inputs, **consts)
    return entry.op(*inputs, **consts), None


# ----------------------------------------------------------------------- input builders

def _shifted(c: float):
    return lambda rng, shape, i: rng.standard_normal(shape) + c


def _scaled(c: float):
    return lambda rng, shape, i: c * rng.standard_normal(shape)


def _positive(rng, shape, i):
    return np.abs(rng.standard_normal(shape)) + 0.5


def _layernorm_input(rng, shape, i):  # x, gamma near 1, beta
    return 1 + 0.1 * rng.standard_normal(shape) if i == 1 else rng.standard_normal(shape)


def _probabilities_then_values(rng, shape, i):  # p (rows sum to 1), v
    return ops.softmax(rng.standard_normal(shape))[0] if i == 0 else rng.standard_normal(shape)


_IDS = np.array([[1, 3, 1, 0], [3, 3, 2, 1]])  # repeated ids on purpose
_TARGETS = np.array([[1, 4, 0], [2, 2, 3]])
_IGNORED = np.array([[1, -1, 0], [-1, 2, 3]])
_ROW_IGNORED = np.array([[-1, -1, -1], [4, -1, 3]])  # a chat batch row with no assistant token


def _unary(op, torch_src, make=_normal, label="", bench=None):
    return OpEntry(op, ("x",), torch_src, (Case(label, ((3, 4),)),),
                   bench or (lambda s: Case("", ((s["B"], s["T"], s["C"]),))), make)


def _elementwise(op, torch_src, broadcast: tuple[tuple[str, tuple, tuple], ...]):
    cases = (Case("", ((3, 4), (3, 4))),) + tuple(Case(lbl, (a, b)) for lbl, a, b in broadcast)
    return OpEntry(op, ("a", "b"), torch_src, cases,
                   lambda s: Case("", ((s["B"], s["T"], s["C"]), (s["C"],))))


def _qkv_shapes(Tq: int, Tk: int) -> tuple:
    return ((B, nh, Tq, hs), (B, nh, Tk, hs), (B, nh, Tk, hs))


def _bench_heads(s: dict, n: int = 3) -> tuple:
    return ((s["B"], s["nh"], s["T"], s["C"] // s["nh"]),) * n


TABLE: tuple[OpEntry, ...] = (
    _elementwise(ops.add, "lambda a, b: a + b",
                 (("broadcast row", (2, 3, 4), (4,)), ("broadcast both", (2, 1, 4), (3, 1)))),
    _elementwise(ops.sub, "lambda a, b: a - b", (("broadcast", (2, 3, 4), (1, 3, 1)),)),
    _elementwise(ops.mul, "lambda a, b: a * b", (("broadcast", (2, 3, 4), (3, 1)),)),
    OpEntry(ops.scale, ("x",), "lambda x, c: x * c", (Case("", ((3, 4),), {"c": -1.7}),),
            lambda s: Case("", ((s["B"], s["T"], s["C"]),), {"c": -1.7})),
    _unary(ops.neg, "lambda x: -x"),
    OpEntry(ops.relu, ("x",), "lambda x: torch.relu(x)",
            (Case("", ((3, 4),)),  # shifted off 0, where the derivative jumps
             Case("at +-inf", gate=False, make=lambda rng: [np.array([-np.inf, -2.0, 0.5, np.inf])])),
            lambda s: Case("", ((s["B"], s["T"], 4 * s["C"]),)), _shifted(0.05)),
    _unary(ops.tanh, "lambda x: torch.tanh(x)", _scaled(2.0)),
    _unary(ops.exp, "lambda x: torch.exp(x)"),
    _unary(ops.log, "lambda x: torch.log(x)", _positive),
    OpEntry(ops.gelu, ("x",), "lambda x: F.gelu(x)", (Case("erf", ((3, 5),)),),
            lambda s: Case("", ((s["B"], s["T"], 4 * s["C"]),)), _scaled(2.0)),
    OpEntry(ops.gelu_tanh, ("x",), "lambda x: F.gelu(x, approximate='tanh')", (Case("", ((3, 5),)),),
            lambda s: Case("", ((s["B"], s["T"], 4 * s["C"]),)), _scaled(2.0)),
    OpEntry(ops.matmul, ("a", "b"), "lambda a, b: a @ b",
            (Case("2-D", ((3, 4), (4, 5))), Case("3-D batched", ((2, 3, 4), (2, 4, 5))),
             Case("3-D @ 2-D", ((2, 3, 4), (4, 5))), Case("4-D broadcast", ((2, 1, 3, 4), (1, 2, 4, 2))),
             Case("4-D broadcast, 3 heads", ((2, 1, 3, 4), (1, 3, 4, 2)), gate=False)),
            lambda s: Case("", ((s["B"], s["T"], s["C"]), (s["C"], s["C"])))),
    # numgpt stores W (in, out); torch's F.linear wants (out, in)
    OpEntry(ops.linear, ("x", "W", "b"), "lambda x, w, b: F.linear(x, w.T, b)",
            (Case("", ((5, 4), (4, 3), (3,))), Case("no bias", ((5, 4), (4, 3), None)),
             Case("3-D input", ((2, 3, 4), (4, 6), (6,)))),
            lambda s: Case("", ((s["B"], s["T"], s["C"]), (s["C"], 4 * s["C"]), (4 * s["C"],)))),
    OpEntry(ops.sum, ("x",), "lambda x, axis=None, keepdims=False: "
                             "x.sum() if axis is None else x.sum(dim=axis, keepdim=keepdims)",
            (Case("all", ((2, 3, 4),)), Case("axis 1, keepdims", ((2, 3, 4),), {"axis": 1, "keepdims": True}),
             Case("axes 0,2", ((2, 3, 4),), {"axis": (0, 2)}),
             Case("axis -1", ((2, 3, 4),), {"axis": -1}, gate=False)),
            lambda s: Case("", ((s["B"], s["T"], s["C"]),), {"axis": -1})),
    OpEntry(ops.mean, ("x",), "lambda x, axis=None, keepdims=False: "
                              "x.mean() if axis is None else x.mean(dim=axis, keepdim=keepdims)",
            (Case("all", ((2, 3, 4),)), Case("axis -1", ((2, 3, 4),), {"axis": -1}),
             Case("axis 0, keepdims", ((2, 3, 4),), {"axis": 0, "keepdims": True}),
             Case("axes 1,2 keepdims", ((2, 3, 4),), {"axis": (1, 2), "keepdims": True}, gate=False)),
            lambda s: Case("", ((s["B"], s["T"], s["C"]),), {"axis": -1})),
    OpEntry(ops.reshape, ("x",), "lambda x, shape: x.reshape(shape)",
            (Case("", ((2, 3, 4),), {"shape": (6, 4)}),
             Case("with -1", ((2, 3, 4),), {"shape": (4, -1)}, gate=False)),
            lambda s: Case("", ((s["B"], s["T"], s["C"]),), {"shape": (s["B"] * s["T"], s["C"])})),
    OpEntry(ops.transpose, ("x",), "lambda x, axes: x.permute(axes)",
            (Case("head split", ((B, T, nh, hs),), {"axes": (0, 2, 1, 3)}),
             Case("permute 3-D", ((2, 3, 4),), {"axes": (2, 0, 1)})),
            lambda s: Case("", ((s["B"], s["T"], s["nh"], s["C"] // s["nh"]),), {"axes": (0, 2, 1, 3)})),
    OpEntry(ops.slice, ("qkv",), "lambda x, index: x[index]",
            tuple(Case(part, ((B, T, 3 * C),), {"index": (Ellipsis, np.s_[i * C:(i + 1) * C])})
                  for i, part in enumerate("qkv")),
            lambda s: Case("", ((s["B"], s["T"], 3 * s["C"]),), {"index": (Ellipsis, np.s_[0:s["C"]])})),
    OpEntry(ops.softmax, ("x",), "lambda x: torch.softmax(x, dim=-1)",
            (Case("", ((2, 3, 5),)),
             Case("large logits", gate=False, make=lambda rng: [rng.standard_normal((2, 5)) + 800.0])),
            lambda s: Case("", ((s["B"], s["nh"], s["T"], s["T"]),)), _scaled(2.0)),
    OpEntry(ops.log_softmax, ("x",), "lambda x: torch.log_softmax(x, dim=-1)", (Case("", ((2, 3, 5),)),),
            lambda s: Case("", ((s["B"], s["T"], s["V"]),)), _scaled(2.0)),
    OpEntry(ops.cross_entropy, ("logits",),
            "lambda z, targets, ignore_index=-1: F.cross_entropy(z.reshape(-1, z.shape[-1]), "
            "torch.from_numpy(targets).reshape(-1), ignore_index=ignore_index)",
            (Case("", ((2, 3, 5),), {"targets": _TARGETS}),
             Case("ignore_index", ((2, 3, 5),), {"targets": _IGNORED}),
             Case("ignore_index, a whole row", ((2, 3, 5),), {"targets": _ROW_IGNORED})),
            lambda s: Case("", ((s["B"], s["T"], s["V"]),),
                           {"targets": np.random.default_rng(0).integers(0, s["V"], (s["B"], s["T"]))})),
    OpEntry(ops.layernorm, ("x", "gamma", "beta"),
            "lambda x, g, b, eps=1e-5: F.layer_norm(x, x.shape[-1:], g, b, eps=eps)",
            (Case("", ((2, 3, 6), (6,), (6,)), {"eps": 1e-5}),
             Case("no beta", ((2, 3, 6), (6,), None), {"eps": 1e-5})),
            lambda s: Case("", ((s["B"], s["T"], s["C"]), (s["C"],), (s["C"],)), {"eps": 1e-5}),
            _layernorm_input),
    OpEntry(ops.embedding, ("W",), "lambda w, ids: F.embedding(torch.from_numpy(ids), w)",
            (Case("repeated ids", ((5, 3),), {"ids": _IDS}),),
            lambda s: Case("", ((s["V"], s["C"]),),
                           {"ids": np.random.default_rng(0).integers(0, s["V"], (s["B"], s["T"]))})),
    OpEntry(ops.tied_head, ("x", "W_e"), "lambda x, w: x @ w.T", (Case("", ((2, 3, 4), (7, 4))),),
            lambda s: Case("", ((s["B"], s["T"], s["C"]), (s["V"], s["C"])))),
    OpEntry(ops.attention_scores, ("q", "k"), "lambda q, k: q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])",
            (Case("", _qkv_shapes(T, T)[:2]),
             Case("2 queries on 5 cached keys", _qkv_shapes(2, 5)[:2], gate=False)),
            lambda s: Case("", _bench_heads(s, 2))),
    OpEntry(ops.causal_mask, ("scores",), "lambda s, key_lengths=None: masked(s, key_lengths)",
            (Case("", ((B, nh, T, T),)), Case("2 queries on 5 cached keys", ((B, nh, 2, 5),), gate=False)),
            lambda s: Case("", ((s["B"], s["nh"], s["T"], s["T"]),))),
    OpEntry(ops.attention_output, ("p", "v"), "lambda p, v: p @ v",
            (Case("", ((B, nh, T, T), (B, nh, T, hs))),),
            lambda s: Case("", ((s["B"], s["nh"], s["T"], s["T"]), _bench_heads(s, 1)[0])),
            _probabilities_then_values),
    OpEntry(ops.attention_training, ("qkv",), "lambda qkv, n_head, block=128: self_attention(qkv, n_head)",
            (Case("fused split, heads merged", ((B, T, 3 * nh * hs),), {"n_head": nh}),
             Case("T=6 in blocks of 4", ((B, 6, 3 * nh * hs),), {"n_head": nh, "block": 4}, gate=False)),
            lambda s: Case("", ((s["B"], s["T"], 3 * s["C"]),), {"n_head": s["nh"]})),
    OpEntry(ops.attention_reference, ("q", "k", "v"), "lambda q, k, v, key_lengths=None: sdpa(q, k, v, key_lengths)",
            (Case("causal", _qkv_shapes(T, T)),
             Case("2 queries on 5 cached keys", _qkv_shapes(2, 5)),
             Case("per-row cache lengths 3 and 5", _qkv_shapes(2, 5), {"key_lengths": np.array([3, 5])}),
             Case("1 query on 5 cached keys", _qkv_shapes(1, 5), gate=False)),
            lambda s: Case("", _bench_heads(s))),
    OpEntry(ops.attention_inference, ("q", "k", "v"),
            "lambda q, k, v, key_lengths=None, block=128: sdpa(q, k, v, key_lengths)",
            (Case("causal", _qkv_shapes(T, T), gate=False),
             Case("2 queries on 5 cached keys", _qkv_shapes(2, 5), gate=False),
             Case("1 query on 5 cached keys", _qkv_shapes(1, 5), gate=False),
             Case("per-row cache lengths 3 and 5", _qkv_shapes(2, 5), {"key_lengths": np.array([3, 5])},
                  gate=False),
             Case("per-row cache lengths 4 and 5, blocks of 1", _qkv_shapes(3, 5),
                  {"key_lengths": np.array([4, 5]), "block": 1}, gate=False)),
            lambda s: Case("", _bench_heads(s)), differentiable=False),
    # dropout is compared with torch in its own test (same mask), not here
    OpEntry(ops.dropout, ("x",), None,
            (Case("p=0.3, fixed mask", ((3, 4),), lambda: {"p": 0.3, "rng": FixedGenerator(np.random.default_rng(7))}),),
            lambda s: Case("", ((s["B"], s["T"], s["C"]),),
                           lambda: {"p": 0.1, "rng": np.random.default_rng(0)})),
)


def entry(name: str) -> OpEntry:
    """The table entry of ``ops.<name>``."""
    for e in TABLE:
        if e.name == name:
            return e
    raise KeyError(f"no op {name!r} in the table; ops there: {[e.name for e in TABLE]}")


def cases() -> list[OpCase]:
    return [OpCase(e, c) for e in TABLE for c in e.cases]


def gate_cases() -> list[OpCase]:
    """The float64 gradient gate's cases: differentiable ops, ``gate=True``."""
    return [c for c in cases() if c.case.gate and c.entry.differentiable]


def torch_cases() -> list[OpCase]:
    return [c for c in cases() if c.case.torch and c.entry.torch is not None]


# ------------------------------------------------------------------- torch, lazily

def _torch_namespace() -> dict:
    """torch, F, math and the helpers the torch equivalents use; imports torch."""
    import torch
    import torch.nn.functional as F

    def visible(Tq: int, Tk: int, key_lengths=None):
        """allowed[.., i, j]: query i (the newest Tq positions of a row of ``length`` keys,
        default Tk) may look at key j: (Tq, Tk), or (B, 1, Tq, Tk) with per-row lengths."""
        lengths = torch.full((1,), Tk) if key_lengths is None else torch.as_tensor(np.asarray(key_lengths))
        position = lengths.view(-1, 1, 1, 1) - Tq + torch.arange(Tq).view(1, 1, Tq, 1)
        allowed = torch.arange(Tk).view(1, 1, 1, Tk) <= position  # (B, 1, Tq, Tk)
        return allowed[0, 0] if key_lengths is None else allowed

    def masked(s, key_lengths=None):
        return s.masked_fill(~visible(s.shape[-2], s.shape[-1], key_lengths), float("-inf"))

    def sdpa(q, k, v, key_lengths=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible(q.shape[-2], k.shape[-2], key_lengths))

    def self_attention(qkv, n_head: int):
        """nanoGPT's split, causal SDPA and head merge: (B, T, 3C) -> (B, T, C)."""
        B_, T_, C3 = qkv.shape
        q, k, v = (t.reshape(B_, T_, n_head, C3 // (3 * n_head)).transpose(1, 2) for t in qkv.split(C3 // 3, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B_, T_, C3 // 3)

    return {"torch": torch, "F": F, "math": math, "np": np, "visible": visible, "masked": masked,
            "sdpa": sdpa, "self_attention": self_attention}


def torch_fn(e: OpEntry) -> Callable:
    """The entry's torch equivalent as a callable ``(*tensors, **consts) -> tensor``."""
    if e.torch is None:
        raise ValueError(f"ops.{e.name} has no torch equivalent in the table")
    return eval(e.torch, _torch_namespace())  # noqa: S307 - source text from this module
