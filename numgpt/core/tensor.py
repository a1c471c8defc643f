"""The autograd engine: ``Tensor`` nodes that chain the verified ops of ``ops.py``.

A ``Tensor`` holds ``data`` (an ndarray), ``grad`` (an ndarray once a backward pass has
reached it), ``requires_grad``, its ``parents`` and the op's ``backward`` closure. The
closure captures arrays only; the node points to its parents, never the other way, so a
graph has no reference cycle and is freed as soon as its loss is dropped.

``backward()`` walks an iterative reverse topological order (no recursion, so chains of
any length work), sums the gradients of every node used more than once, and stores them
in ``.grad`` of every tensor that requires grad (accumulating across calls, as PyTorch
does for leaves; ``zero_grad`` clears them). ``no_grad()`` switches graph building off
for the current thread only, so concurrent server threads do not affect each other.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import numpy as np

from . import ops
from ..errors import ShapeError

__all__ = ["Tensor", "apply", "no_grad", "is_grad_enabled", "zero_grad"]

_state = threading.local()


def is_grad_enabled() -> bool:
    """True unless the current thread is inside a ``no_grad()`` block."""
    return getattr(_state, "grad_enabled", True)


@contextmanager
def no_grad() -> Iterator[None]:
    """Build no graph inside this block (this thread only); nests and restores on exit."""
    previous = is_grad_enabled()
    _state.grad_enabled = False
    try:
        yield
    finally:
        _state.grad_enabled = previous


class Tensor:
    """An array in a computation graph."""

    __slots__ = ("data", "grad", "requires_grad", "parents", "_backward", "name", "__weakref__")
    # NumPy on the left (``np.float32(2) * t``, ``arr - t``) defers to our reflected
    # operators instead of building an object array of Tensors.
    __array_ufunc__ = None

    def __init__(self, data, requires_grad: bool = False, name: str | None = None):
        self.data = data if isinstance(data, np.ndarray) else np.asarray(data)
        self.grad: np.ndarray | None = None
        self.requires_grad = bool(requires_grad)
        self.parents: tuple[Tensor | None, ...] = ()
        self._backward: Callable | None = None
        self.name = name

    # -------------------------------------------------------------- basic properties
    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def dtype(self):
        return self.data.dtype

    def numpy(self) -> np.ndarray:
        return self.data

    def item(self) -> float:
        return self.data.item()

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        flag = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}{flag})"

    # ------------------------------------------------------------------- backward
    def backward(self, grad: np.ndarray | None = None, *, into: dict | None = None) -> None:
        """Back-propagate from this tensor; a scalar is seeded with 1.

        ``into``: instead of adding each leaf's gradient to ``leaf.grad``, add it to
        ``into[leaf]`` (a dict keyed by the leaf tensor). Several threads can then run
        backward passes over the same parameters at once, each into its own dict, and sum
        the dicts in a fixed order afterwards (the data-parallel training step does this).
        """
        if grad is None:
            if self.data.size != 1:
                raise ShapeError(f"backward() without a gradient needs a scalar; this tensor has "
                                 f"shape {self.shape}: pass grad= of that shape")
            grad = np.ones_like(self.data)
        grad = np.asarray(grad, dtype=self.data.dtype)
        if grad.shape != self.shape:
            raise ShapeError(f"gradient shape {grad.shape} does not match tensor shape {self.shape}")
        order = _topological_order(self)
        grads: dict[int, np.ndarray] = {id(self): grad}
        # Sums this pass allocated (id -> array, held in ``grads`` too, so ids stay unique):
        # only those may be added to in place or handed to a leaf without a copy. An op's
        # gradient may alias another's (add passes one dout to both inputs), so others may not.
        owned: dict[int, np.ndarray] = {}
        for node in order:  # outputs before inputs
            g = grads.pop(id(node), None)
            if g is None:
                continue
            mine = owned.pop(id(g), None) is not None
            if node._backward is None:  # a leaf
                before = node.grad if into is None else into.get(node)
                total = (g if mine else g.copy()) if before is None else before + g
                if into is None:
                    node.grad = total
                else:
                    into[node] = total
                continue
            for parent, pg in zip(node.parents, node._backward(g)):
                if parent is None or pg is None or not parent.requires_grad:
                    continue
                key = id(parent)
                if key not in grads:
                    grads[key] = pg
                elif id(grads[key]) in owned:
                    grads[key] += pg
                else:
                    total = grads[key] + pg
                    owned[id(total)] = total
                    grads[key] = total

    # ------------------------------------------------------------ operator overloads
    def __add__(self, other): return apply(ops.add, self, _lift(other, self))
    def __radd__(self, other): return apply(ops.add, _lift(other, self), self)
    def __sub__(self, other): return apply(ops.sub, self, _lift(other, self))
    def __rsub__(self, other): return apply(ops.sub, _lift(other, self), self)
    def __mul__(self, other): return apply(ops.mul, self, _lift(other, self))
    def __rmul__(self, other): return apply(ops.mul, _lift(other, self), self)
    def __neg__(self): return apply(ops.neg, self)
    def __matmul__(self, other): return apply(ops.matmul, self, other)
    def __getitem__(self, index): return apply(ops.slice, self, index=index)

    def sum(self, axis=None, keepdims=False): return apply(ops.sum, self, axis=axis, keepdims=keepdims)
    def mean(self, axis=None, keepdims=False): return apply(ops.mean, self, axis=axis, keepdims=keepdims)
    def reshape(self, *shape): return apply(ops.reshape, self, shape=_shape_arg(shape))
    def transpose(self, *axes): return apply(ops.transpose, self, axes=_shape_arg(axes))
    def relu(self): return apply(ops.relu, self)
    def tanh(self): return apply(ops.tanh, self)
    def exp(self): return apply(ops.exp, self)
    def log(self): return apply(ops.log, self)


def _shape_arg(args) -> tuple[int, ...]:
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else tuple(args)


def _lift(value, like: Tensor) -> Tensor:
    """Wrap a Python scalar or array as a constant tensor of ``like``'s dtype."""
    if isinstance(value, Tensor):
        return value
    return Tensor(np.asarray(value, dtype=like.dtype))


def apply(op: Callable, *inputs: Tensor | None, **consts) -> Tensor:
    """Run a verified op on tensors and, when a gradient is wanted, record the graph node.

    Positional ``inputs`` are the op's differentiable arguments (``None`` for an absent
    optional one); ``consts`` pass through to the op unchanged.
    """
    arrays = [None if t is None else t.data for t in inputs]
    out, backward = op(*arrays, **consts)
    node = Tensor(out)
    if is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        node.requires_grad = True
        node.parents = inputs
        node._backward = backward
    return node


def _topological_order(root: Tensor) -> list[Tensor]:
    """Nodes reachable from ``root``, each after every node that consumes it (iterative DFS)."""
    order: list[Tensor] = []
    visited: set[int] = set()
    stack: list[tuple[Tensor, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        for parent in node.parents:
            if parent is not None and parent.requires_grad and id(parent) not in visited:
                stack.append((parent, False))
    order.reverse()
    return order


def zero_grad(tensors: Iterable[Tensor]) -> None:
    """Clear ``.grad`` of every given tensor."""
    for t in tensors:
        t.grad = None
