"""``GPTConfig``: the shape and numerics of a GPT-2 model, validated in one place.

This module imports no NumPy: the command line builds and checks a config (``TrainConfig``
asks ``GPTConfig`` to validate the model's shape) before it sets the BLAS thread count,
which BLAS reads once, when NumPy loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ConfigError

__all__ = ["GPTConfig", "PRESETS"]

_DTYPES = {"float32": 4, "float64": 8}  # name -> bytes per value
_FIELD_TYPES = {"int": int, "bool": bool, "float": float, "str": str}  # annotations are strings here


@dataclass
class GPTConfig:
    """Shape and numerics of a GPT-2 model. Unknown keys and impossible values are refused.

    The one place model shapes are validated (``_check_shapes``); a new field needs only its
    annotation and default, plus a line in ``_check_numerics`` if some values are impossible.
    """

    vocab_size: int = 50257
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    bias: bool = True
    dropout: float = 0.0
    activation: str = "gelu_tanh"  # GPT-2's gelu_new; "gelu" is the exact erf form (nanoGPT)
    layer_norm_epsilon: float = 1e-5
    dtype: str = "float32"
    kernels: str = "fast"  # "fast": compiled kernels (core/kernels.py); "reference": the NumPy ops

    def __post_init__(self) -> None:
        self._check_types()
        self._check_shapes()
        self._check_numerics()

    def _check_types(self) -> None:
        """Each field holds its annotated type (ints widen to float); a field whose annotation
        is not a plain int/bool/float/str checks its own values in ``_check_numerics``."""
        for f in dataclasses.fields(self):
            want = _FIELD_TYPES.get(f.type)
            if want is None:
                continue
            value = getattr(self, f.name)
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise ConfigError(f"config key {f.name!r} must be {f.type}, got {value!r} "
                                  f"({type(value).__name__})")

    def _check_shapes(self) -> None:
        """The model's shapes: the one place they are validated (layers and TrainConfig rely on it)."""
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key {name!r} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"config key 'n_embd' must be divisible by n_head: n_embd ({self.n_embd}) "
                              f"is not a multiple of n_head ({self.n_head})")

    def _check_numerics(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"config key 'dropout' must be in [0, 1), got {self.dropout}")
        if self.activation not in ("gelu", "gelu_tanh"):
            raise ConfigError(f"config key 'activation' must be 'gelu' or 'gelu_tanh', got "
                              f"{self.activation!r}")
        if not 0 < self.layer_norm_epsilon < float("inf"):
            raise ConfigError(f"config key 'layer_norm_epsilon' must be finite and > 0, got "
                              f"{self.layer_norm_epsilon}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"config key 'dtype' must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.kernels not in ("fast", "reference"):
            raise ConfigError(f"config key 'kernels' must be 'fast' (compiled kernels) or 'reference' "
                              f"(the NumPy ops), got {self.kernels!r}")

    @property
    def np_dtype(self):
        import numpy as np  # here, not at import: see the module docstring

        return np.dtype(self.dtype).type

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{name: shape}`` of every parameter ``GPT(self)`` would allocate, in its order,
        computed without allocating (loads and training check sizes against it first).
        Linear weights are ``(in, out)``; the output head is tied to ``wte``."""
        C, bias = self.n_embd, self.bias
        shapes: dict[str, tuple[int, ...]] = {"wte.weight": (self.vocab_size, C),
                                              "wpe.weight": (self.block_size, C)}

        def add(name: str, weight: tuple[int, ...], width: int) -> None:
            shapes[name + ".weight"] = weight
            if bias:
                shapes[name + ".bias"] = (width,)

        for i in range(self.n_layer):
            add(f"h.{i}.ln_1", (C,), C)
            add(f"h.{i}.attn.c_attn", (C, 3 * C), 3 * C)
            add(f"h.{i}.attn.c_proj", (C, C), C)
            add(f"h.{i}.ln_2", (C,), C)
            add(f"h.{i}.mlp.c_fc", (C, 4 * C), 4 * C)
            add(f"h.{i}.mlp.c_proj", (4 * C, C), C)
        add("ln_f", (C,), C)
        return shapes

    def parameter_count(self) -> int:
        """Parameters ``GPT(self)`` holds (the tied head counted once), by arithmetic alone,
        so that absurd sizes (n_layer 100000) are counted without building 100000 layers."""
        C, L, bias = self.n_embd, self.n_layer, int(self.bias)
        per_layer = 12 * C * C + 2 * C + bias * 11 * C  # weights, LayerNorm gains, biases
        return (self.vocab_size + self.block_size) * C + L * per_layer + C + bias * C

    def parameter_tensor_count(self) -> int:
        """How many tensors ``parameter_shapes`` names, by arithmetic alone, so a loader can
        compare a claimed n_layer with the tensors a file holds before building the names."""
        per_layer = 12 if self.bias else 6  # ln_1, c_attn, c_proj, ln_2, c_fc, c_proj (+ biases)
        return 2 + self.n_layer * per_layer + (2 if self.bias else 1)  # wte, wpe ... ln_f

    def parameter_bytes(self) -> int:
        """Memory the parameters take in this config's dtype."""
        return self.parameter_count() * _DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


