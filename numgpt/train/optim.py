"""AdamW, global gradient-norm clipping, and the learning-rate schedule.

A parameter is any object with ``.data`` (an ``np.ndarray`` updated in place) and
``.grad`` (an array of the same shape, or ``None`` meaning "no gradient this step",
which the optimizer and the clipper skip). The optimizer takes parameters as an
insertion-ordered dict ``name -> param`` so its state can be saved by name.

AdamW follows ``torch.optim.AdamW`` (single-tensor path) operation for operation, so
float64 runs agree with PyTorch to rounding (~1e-16 relative):

    p   <- p * (1 - lr * wd)                          decoupled decay, before Adam
    m   <- m + (1 - b1) * (g - m)                     torch's lerp
    v   <- v * b2 + (1 - b2) * g * g
    p   <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Reference: Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (2019).
"""

import math
import numbers
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from ..core.checks import is_int
from ..errors import CheckpointError, ConfigError, ShapeError

__all__ = ["AdamW", "clip_grad_norm", "get_lr", "lr_schedule"]

STATE_FORMAT = "numgpt-adamw"
STATE_VERSION = 1


def _default_no_decay(name, param) -> bool:
    """Biases and LayerNorm gains/shifts (ndim < 2) are not decayed (nanoGPT, GPT-2)."""
    return np.ndim(param.data) < 2


def _check_hyper(lr, betas, eps, weight_decay) -> None:
    """Raise ConfigError naming the first impossible AdamW hyper-parameter."""
    if not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr >= 0):
        raise ConfigError(f"AdamW lr must be a finite number >= 0, got {lr!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ConfigError(f"AdamW betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if not (isinstance(b, numbers.Real) and 0.0 <= b < 1.0):
            raise ConfigError(f"AdamW betas[{i}] must be in [0, 1), got {b!r}")
    if not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps >= 0):
        raise ConfigError(f"AdamW eps must be a finite number >= 0, got {eps!r}")
    if not (isinstance(weight_decay, numbers.Real) and math.isfinite(weight_decay)
            and weight_decay >= 0):
        raise ConfigError(f"AdamW weight_decay must be a finite number >= 0, got {weight_decay!r}")


class AdamW:
    """AdamW with a no-decay group, in-place updates and name-keyed state.

    Args:
        params: ``name -> param`` (insertion-ordered); each ``param.data`` is an
            ndarray of any shape, updated in place by ``step``.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        no_decay: ``(name, param) -> bool``; True puts the parameter in the group with
            weight decay 0. Default: every parameter with ``ndim < 2`` (biases, LayerNorm).

        kernels: ``"reference"`` (NumPy, one pass per operation per parameter) or
            ``"fast"``: the llm.c layout, every parameter's ``data``, gradient and both
            moments as views into four flat buffers (``data`` is re-pointed at its view,
            values unchanged), and one compiled sweep (``core.kernels.adamw_update``) that
            clips and updates all of them. Fast needs parameters of one dtype.

    State per parameter: ``exp_avg`` and ``exp_avg_sq`` (same shape and dtype as
    ``data``) and a step count (a parameter whose grad is None does not advance, as in
    PyTorch). One flat scratch buffer per dtype, as large as the largest parameter,
    holds the temporaries, so a step allocates no full-size arrays.
    """

    def __init__(self, params: Mapping, lr: float = 1e-3, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01,
                 no_decay: Callable | None = None, kernels: str = "reference"):
        if kernels not in ("fast", "reference"):
            raise ConfigError(f"AdamW kernels must be 'fast' or 'reference', got {kernels!r}")
        if not isinstance(params, Mapping):
            raise ConfigError(
                f"AdamW params must be a dict name -> param, got {type(params).__name__}; "
                "pass model.parameters() as a dict")
        if not params:
            raise ConfigError("AdamW got no parameters; the dict of parameters is empty")
        _check_hyper(lr, betas, eps, weight_decay)
        rule = _default_no_decay if no_decay is None else no_decay
        self.params = dict(params)
        self.lr, self.betas = float(lr), (float(betas[0]), float(betas[1]))
        self.eps, self.weight_decay = float(eps), float(weight_decay)
        self.no_decay = {n for n, p in self.params.items() if rule(n, p)}
        self.step_count = 0
        self.steps = {n: 0 for n in self.params}
        self.kernels = kernels
        self._grad_scale = 1.0  # the fast path's clipping factor, applied inside the update
        if kernels == "fast":
            self.flat = _FlatBuffers(self.params)
            self.exp_avg, self.exp_avg_sq = self.flat.views("exp_avg"), self.flat.views("exp_avg_sq")
        else:
            self.exp_avg = {n: np.zeros_like(p.data) for n, p in self.params.items()}
            self.exp_avg_sq = {n: np.zeros_like(p.data) for n, p in self.params.items()}
        self._scratch = self._make_scratch()

    def _make_scratch(self) -> dict:
        """One flat buffer per dtype, sized to the largest parameter of that dtype."""
        sizes: dict = {}
        for p in self.params.values():
            dt = p.data.dtype
            sizes[dt] = max(sizes.get(dt, 0), p.data.size)
        return {dt: np.empty(n, dtype=dt) for dt, n in sizes.items()}

    def _buffer(self, data: np.ndarray) -> np.ndarray:
        """A view of the scratch buffer with the shape of ``data`` (no allocation)."""
        return self._scratch[data.dtype][:data.size].reshape(data.shape)

    def decay_for(self, name: str) -> float:
        """The weight decay applied to parameter ``name`` (0 for the no-decay group)."""
        return 0.0 if name in self.no_decay else self.weight_decay

    def step(self, lr: float | None = None) -> None:
        """Update every parameter that has a gradient, in place.

        Args:
            lr: learning rate for this step (a schedule's value); also becomes
                ``self.lr``. None keeps the current ``self.lr``.
        """
        if lr is not None:
            _check_hyper(lr, self.betas, self.eps, self.weight_decay)
            self.lr = float(lr)
        self.step_count += 1
        if self.kernels == "fast":
            self._fast_step()
            return
        for name, p in self.params.items():
            if p.grad is not None:
                self._update(name, p)

    def clip_grad_norm(self, max_norm: float = 0.0) -> float:
        """The global gradient norm (as ``clip_grad_norm``), clipping to ``max_norm`` when it
        is > 0 (0: measure only). Reference path: the module's ``clip_grad_norm`` scales the
        gradients in place. Fast path: the gradients are gathered into the flat buffer, their
        norm is one compiled sweep, and the clipping factor is applied inside the next
        ``step``'s update (the same numbers, one pass fewer); the gradients stay unscaled.
        """
        if self.kernels == "reference":
            if max_norm > 0:
                return clip_grad_norm(self.params, max_norm)
            total = 0.0
            for p in self.params.values():
                if p.grad is not None:
                    flat = p.grad.ravel()
                    total += float(np.dot(flat, flat))
            return math.sqrt(total)
        if max_norm < 0:
            raise ConfigError(f"clip_grad_norm max_norm must be a number >= 0, got {max_norm!r}")
        total = math.sqrt(self.flat.gather_grads(self.params))
        coef = max_norm / (total + 1e-6) if max_norm > 0 else 1.0
        self._grad_scale = coef if coef < 1.0 else 1.0
        return total

    def _fast_step(self) -> None:
        """One fused sweep over the flat buffers (``core.kernels.adamw_update``)."""
        from ..core import kernels

        flat = self.flat
        if not flat.gathered:
            flat.gather_grads(self.params)
        b1, b2 = self.betas
        active = np.array([p.grad is not None for p in self.params.values()])
        for name, p in self.params.items():
            if p.grad is not None:
                self.steps[name] += 1
        t = np.array([max(self.steps[n], 1) for n in self.params], dtype=np.float64)
        decay = np.array([self.decay_for(n) for n in self.params], dtype=np.float64)
        dt = flat.data.dtype  # every scalar in the buffers' dtype (see adamw_update)
        kernels.adamw_update(flat.data, flat.grad, flat.exp_avg, flat.exp_avg_sq,
                             flat.piece_start, flat.piece_end, flat.piece_owner,
                             (1 - self.lr * decay).astype(dt), (self.lr / (1 - b1 ** t)).astype(dt),
                             ((1 - b2 ** t) ** 0.5).astype(dt), active, dt.type(1 - b1), dt.type(b2),
                             dt.type(1 - b2), dt.type(self.eps), dt.type(self._grad_scale))
        self._grad_scale = 1.0
        flat.gathered = False

    def _update(self, name: str, p) -> None:
        """One AdamW update of one parameter, in torch's order of operations."""
        data, grad = p.data, p.grad
        if grad.shape != data.shape:
            raise ShapeError(
                f"gradient of {name!r} has shape {grad.shape}, parameter has {data.shape}")
        b1, b2 = self.betas
        m, v, buf = self.exp_avg[name], self.exp_avg_sq[name], self._buffer(data)
        self.steps[name] += 1
        t = self.steps[name]
        wd = self.decay_for(name)
        if wd != 0:
            data *= 1 - self.lr * wd                 # decoupled decay, before Adam
        np.subtract(grad, m, out=buf)                # m.lerp_(g, 1 - b1)
        buf *= 1 - b1
        m += buf
        v *= b2                                      # v.mul_(b2).addcmul_(g, g, 1 - b2)
        np.multiply(grad, grad, out=buf)
        buf *= 1 - b2
        v += buf
        step_size = self.lr / (1 - b1 ** t)
        bc2_sqrt = (1 - b2 ** t) ** 0.5
        np.sqrt(v, out=buf)                          # denom = sqrt(v) / sqrt(bc2) + eps
        buf /= bc2_sqrt
        buf += self.eps
        np.divide(m, buf, out=buf)                   # p.addcdiv_(m, denom, -step_size)
        buf *= -step_size
        data += buf

    def zero_grad(self) -> None:
        """Set every parameter's ``.grad`` to None (PyTorch's default, set_to_none=True).

        None rather than zeros: the backward pass then assigns fresh gradients instead
        of accumulating into stale ones, and a parameter that gets no gradient is
        visibly skipped by ``step`` and ``clip_grad_norm``.
        """
        for p in self.params.values():
            p.grad = None
        if self.kernels == "fast":
            self.flat.gathered = False

    def state_meta(self) -> dict:
        """JSON-able scalars: format, step counts, hyper-parameters, no-decay names."""
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION,
            "step": self.step_count, "lr": self.lr, "betas": list(self.betas),
            "eps": self.eps, "weight_decay": self.weight_decay,
            "no_decay": sorted(self.no_decay), "param_steps": dict(self.steps),
        }

    def state_arrays(self) -> dict:
        """Moments as a flat ``{"exp_avg.<name>": arr, "exp_avg_sq.<name>": arr}`` (copies)."""
        out = {}
        for name in self.params:
            out[f"exp_avg.{name}"] = self.exp_avg[name].copy()
            out[f"exp_avg_sq.{name}"] = self.exp_avg_sq[name].copy()
        return out

    def state_dict(self) -> dict:
        """``{"meta": state_meta(), "arrays": state_arrays()}``: JSON + safetensors parts."""
        return {"meta": self.state_meta(), "arrays": self.state_arrays()}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what ``state_dict`` returned; resuming is bit-identical.

        Checks everything before changing anything. Raises CheckpointError naming the
        parameter when a name is missing or unexpected or a shape differs, and when the
        format or the no-decay group differs. Arrays are copied into the existing
        buffers (cast to each parameter's dtype).
        """
        if not (isinstance(state, Mapping) and "meta" in state and "arrays" in state):
            raise CheckpointError(
                "optimizer state must be a dict with 'meta' and 'arrays' "
                "(as returned by AdamW.state_dict())")
        meta, arrays = state["meta"], state["arrays"]
        self._check_meta(meta)
        self._check_arrays(arrays)
        for name in self.params:
            np.copyto(self.exp_avg[name], arrays[f"exp_avg.{name}"], casting="same_kind")
            np.copyto(self.exp_avg_sq[name], arrays[f"exp_avg_sq.{name}"], casting="same_kind")
        self.step_count = int(meta["step"])
        self.steps = {n: int(meta["param_steps"][n]) for n in self.params}
        self.lr, self.betas = float(meta["lr"]), (float(meta["betas"][0]), float(meta["betas"][1]))
        self.eps, self.weight_decay = float(meta["eps"]), float(meta["weight_decay"])

    def _check_meta(self, meta: Mapping) -> None:
        """Format, hyper-parameters, per-parameter steps and the no-decay group."""
        if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
            raise CheckpointError(
                f"optimizer state has format {meta.get('format')!r} version "
                f"{meta.get('version')!r}; expected {STATE_FORMAT!r} version {STATE_VERSION}")
        try:
            _check_hyper(meta["lr"], meta["betas"], meta["eps"], meta["weight_decay"])
            steps, saved_no_decay = meta["param_steps"], set(meta["no_decay"])
        except (KeyError, ConfigError) as e:
            raise CheckpointError(f"optimizer state meta is incomplete or invalid: {e}") from e
        for name in self.params:
            if name not in steps:
                raise CheckpointError(f"optimizer state has no step count for parameter {name!r}")
        extra = sorted(set(steps) - set(self.params))
        if extra:
            raise CheckpointError(
                f"optimizer state has parameter {extra[0]!r} that this model does not have "
                f"({len(extra)} unexpected in all)")
        if saved_no_decay != self.no_decay:
            diff = sorted(saved_no_decay ^ self.no_decay)
            raise CheckpointError(
                f"optimizer state puts parameter {diff[0]!r} in a different weight-decay "
                "group than this optimizer; construct AdamW with the same no_decay rule")

    def _check_arrays(self, arrays: Mapping) -> None:
        """Every expected moment present with the parameter's shape; nothing extra."""
        expected = set()
        for name, p in self.params.items():
            for kind in ("exp_avg", "exp_avg_sq"):
                key = f"{kind}.{name}"
                expected.add(key)
                if key not in arrays:
                    raise CheckpointError(
                        f"optimizer state is missing {key!r} for parameter {name!r}")
                shape = np.shape(arrays[key])
                if shape != p.data.shape:
                    raise CheckpointError(
                        f"optimizer state {key!r} has shape {shape}, parameter {name!r} "
                        f"has {p.data.shape}; the checkpoint is for a different model")
        extra = sorted(set(arrays) - expected)
        if extra:
            raise CheckpointError(
                f"optimizer state has array {extra[0]!r} for a parameter this model does "
                f"not have ({len(extra)} unexpected in all)")


class _FlatBuffers:
    """The llm.c layout: parameters, gradients and both AdamW moments, each one contiguous
    buffer (n,), with every parameter a view into it (in the dict's order).

    ``piece_*`` cut the buffers into pieces of at most ``PIECE`` elements, each inside one
    parameter, so the compiled sweeps spread a large parameter over the threads and know
    which parameter's hyper-parameters apply.
    """

    PIECE = 1 << 15

    def __init__(self, params: Mapping):
        dtypes = {p.data.dtype for p in params.values()}
        if len(dtypes) != 1:
            raise ConfigError(f"AdamW kernels='fast' needs parameters of one dtype, got "
                              f"{sorted(str(d) for d in dtypes)}; cast the model or use kernels='reference'")
        (dtype,) = dtypes
        sizes = [p.data.size for p in params.values()]
        self.offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)  # (P + 1,)
        n = int(self.offsets[-1])
        self.data, self.grad = np.empty(n, dtype), np.zeros(n, dtype)
        self.exp_avg, self.exp_avg_sq = np.zeros(n, dtype), np.zeros(n, dtype)
        self.shapes = {name: p.data.shape for name, p in params.items()}
        for (name, p), view in zip(params.items(), self.views("data").values()):
            view[...] = p.data
            p.data = view  # the parameter now lives in the flat buffer
        starts, owners = [], []
        for i, (lo, hi) in enumerate(zip(self.offsets[:-1], self.offsets[1:])):
            cut = list(range(int(lo), int(hi), self.PIECE))
            starts += cut
            owners += [i] * len(cut)
        self.piece_start = np.array(starts, dtype=np.int64)
        self.piece_end = np.append(self.piece_start[1:], n).astype(np.int64)
        self.piece_owner = np.array(owners, dtype=np.int64)
        self._partial = np.zeros(len(starts))
        self.grad_views = self.views("grad")
        self.gathered = False

    def views(self, buffer: str) -> dict:
        """``name -> view`` of one flat buffer with each parameter's shape."""
        flat = getattr(self, buffer)
        return {name: flat[lo:hi].reshape(shape) for (name, shape), lo, hi
                in zip(self.shapes.items(), self.offsets[:-1], self.offsets[1:])}

    def gather_grads(self, params: Mapping) -> float:
        """Copy each gradient into its view of the flat gradient buffer (then ``p.grad`` is
        that view; None stays None, its span zeroed) -> sum of squares of all of them."""
        from ..core import kernels

        for (name, p), view in zip(params.items(), self.grad_views.values()):
            if p.grad is None:
                view[...] = 0.0
            elif p.grad is not view:
                if p.grad.shape != view.shape:
                    raise ShapeError(f"gradient of {name!r} has shape {p.grad.shape}, "
                                     f"parameter has {view.shape}")
                view[...] = p.grad
                p.grad = view
        kernels.sum_of_squares(self.grad, self.piece_start, self.piece_end, self._partial)
        self.gathered = True
        return float(math.fsum(self._partial))


def clip_grad_norm(params, max_norm: float) -> float:
    """Scale all gradients in place so their global L2 norm is at most ``max_norm``.

    As ``torch.nn.utils.clip_grad_norm_``: ``norm = sqrt(sum_p ||g_p||^2)`` over the
    parameters whose grad is not None; every grad is multiplied by
    ``max_norm / (norm + 1e-6)`` when that factor is < 1, else left as is.

    Args:
        params: a dict ``name -> param`` or an iterable of params.
        max_norm: the largest allowed global norm (> 0).
    Returns:
        The global norm before clipping, as a Python float.
    """
    if not (isinstance(max_norm, numbers.Real) and max_norm > 0):
        raise ConfigError(f"clip_grad_norm max_norm must be a number > 0, got {max_norm!r}")
    items: Iterable = params.values() if isinstance(params, Mapping) else params
    grads = [p.grad for p in items if p.grad is not None]
    if not grads:
        return 0.0
    # per-tensor norms, then the norm of those (torch's order); dot avoids temporaries
    norms = [math.sqrt(float(np.dot(g.ravel(), g.ravel()))) for g in grads]
    total = math.sqrt(math.fsum(n * n for n in norms))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            g *= coef
    return total


def _check_schedule(learning_rate, warmup_iters, lr_decay_iters, min_lr) -> None:
    """Raise ConfigError naming the first impossible schedule argument."""
    if not (isinstance(learning_rate, numbers.Real) and math.isfinite(learning_rate)
            and learning_rate >= 0):
        raise ConfigError(f"learning_rate must be a finite number >= 0, got {learning_rate!r}")
    if not (is_int(warmup_iters) and warmup_iters >= 0):
        raise ConfigError(f"warmup_iters must be an integer >= 0, got {warmup_iters!r}")
    if not (is_int(lr_decay_iters) and lr_decay_iters >= warmup_iters):
        raise ConfigError(
            f"lr_decay_iters must be an integer >= warmup_iters ({warmup_iters}), "
            f"got {lr_decay_iters!r}")
    if not (isinstance(min_lr, numbers.Real) and 0 <= min_lr <= learning_rate):
        raise ConfigError(
            f"min_lr must be a number in [0, learning_rate={learning_rate}], got {min_lr!r}")


def get_lr(step: int, *, learning_rate: float, warmup_iters: int,
           lr_decay_iters: int, min_lr: float) -> float:
    """nanoGPT's schedule: linear warmup, cosine decay to ``min_lr``, then flat.

    ``step < warmup_iters``: ``learning_rate * (step + 1) / (warmup_iters + 1)``;
    ``step > lr_decay_iters``: ``min_lr``; in between:
    ``min_lr + 0.5 * (1 + cos(pi * r)) * (learning_rate - min_lr)`` with
    ``r = (step - warmup_iters) / (lr_decay_iters - warmup_iters)``.
    """
    _check_schedule(learning_rate, warmup_iters, lr_decay_iters, min_lr)
    if not (is_int(step) and step >= 0):
        raise ConfigError(f"step must be an integer >= 0, got {step!r}")
    if step < warmup_iters:
        return learning_rate * (step + 1) / (warmup_iters + 1)
    if step >= lr_decay_iters:  # at == the cosine is already at min_lr; also avoids 0/0
        return min_lr
    decay_ratio = (step - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


def lr_schedule(kind: str, *, learning_rate: float, warmup_iters: int = 0,
                lr_decay_iters: int | None = None, min_lr: float = 0.0) -> Callable[[int], float]:
    """A function ``step -> lr``.

    Args:
        kind: ``"cosine"`` (``get_lr``; needs ``lr_decay_iters``) or ``"constant"``
            (always ``learning_rate``, as nanoGPT with ``decay_lr=False``).
    """
    if kind == "constant":
        _check_schedule(learning_rate, 0, 0, 0.0)
        return lambda step: float(learning_rate)
    if kind != "cosine":
        raise ConfigError(f"lr schedule must be 'cosine' or 'constant', got {kind!r}")
    if lr_decay_iters is None:
        raise ConfigError("the 'cosine' lr schedule needs lr_decay_iters (e.g. max_iters)")
    _check_schedule(learning_rate, warmup_iters, lr_decay_iters, min_lr)
    return lambda step: get_lr(step, learning_rate=learning_rate, warmup_iters=warmup_iters,
                               lr_decay_iters=lr_decay_iters, min_lr=min_lr)
