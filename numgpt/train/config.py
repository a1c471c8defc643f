"""The training configuration: one typed dataclass, loaded from TOML and/or flags.

Key names are nanoGPT's (``n_layer``, ``learning_rate``, ``lr_decay_iters``, ...) so its
users feel at home; the CLI turns each field into a flag (``n_layer`` -> ``--n-layer``).
A TOML file is flat, ``key = value`` per line, e.g.::

    n_layer = 6
    learning_rate = 6e-4
    data = "data/shakespeare"

Unknown keys and wrong types are refused with the key named (``ConfigError``), never
ignored: a typo like ``learning_rte`` would otherwise silently train with the default.
TOML has no null, so an optional key (``data``, ``init``, ``lr_decay_iters``) is left out
to mean "not set". This module is separate from ``train.py`` so the CLI, the checkpoint
reader and the plots can use the config without importing the training loop.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..core.config import GPTConfig
from ..errors import CheckpointError, ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport (same API)
    import tomli as tomllib

__all__ = ["TrainConfig", "load_toml", "config_fields", "FieldInfo", "ARCH_KEYS", "resume_config",
           "decay_iters", "no_checkpoint_to_resume"]

# Keys that fix the shape or numerics of the model: a resumed run must keep them.
ARCH_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "activation", "dtype", "init")


def _f(default, help: str):  # noqa: A002 - "help" reads naturally next to argparse
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything one training run needs. The defaults are the no-argument ``numgpt train``:
    a small byte-level model on the Python docs that visibly learns in a few minutes on 2 CPU
    cores."""

    # ------------------------------------------------------------ data and files
    data: str | None = _f(None, "folder written by `numgpt prepare` (default: the Python docs "
                                "from pydoc_data, prepared as bytes into OUT/data)")
    out: str = _f("out", "run folder: checkpoints latest/best, log.jsonl, plots")
    init: str | None = _f(None, "fine-tune this model (numgpt checkpoint, HF folder or nanoGPT "
                                "ckpt.pt) instead of training from scratch")
    resume: bool = _f(False, "continue the run in OUT from its latest checkpoint, exactly")
    overwrite: bool = _f(False, "start over in an OUT that already holds a run (deletes its "
                                "checkpoints, log and plots)")
    # ------------------------------------------------------------ model (from scratch)
    n_layer: int = _f(4, "transformer blocks")
    n_head: int = _f(4, "attention heads per block")
    n_embd: int = _f(128, "embedding width")
    block_size: int = _f(64, "context length used for training")
    bias: bool = _f(False, "biases in Linear and LayerNorm (GPT-2 has them; nanoGPT's default "
                           "is off)")
    activation: str = _f("gelu", "'gelu' (exact erf, nanoGPT) or 'gelu_tanh' (GPT-2)")
    dropout: float = _f(0.0, "dropout probability while training")
    dtype: str = _f("float32", "'float32' or 'float64'")
    kernels: str = _f("fast", "op path: 'fast' (compiled kernels, fused AdamW) or 'reference' "
                              "(the NumPy ops every kernel is checked against)")
    seed: int = _f(1337, "seed of the init, the batches, dropout and the evaluation batches")
    # ------------------------------------------------------------ optimization
    batch_size: int = _f(12, "sequences per micro-batch")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step (each loss "
                                             "scaled by 1/steps)")
    workers: int = _f(1, "threads that each take a slice of every batch (data parallel; "
                         "best with --threads 1)")
    rank_timeout: float = _f(300.0, "under mpiexec: seconds a rank waits for the others before "
                                    "it names the silent rank and stops the run")
    max_iters: int = _f(2000, "optimizer steps to train in total")
    learning_rate: float = _f(1e-3, "peak learning rate")
    min_lr: float = _f(1e-4, "floor of the cosine decay")
    decay_lr: bool = _f(True, "warmup + cosine decay (false: constant learning_rate)")
    warmup_iters: int = _f(100, "linear warmup steps")
    lr_decay_iters: int | None = _f(None, "step at which the cosine reaches min_lr "
                                          "(default max_iters)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.99, "AdamW beta2")
    weight_decay: float = _f(0.1, "AdamW decoupled weight decay (matrices and embeddings only)")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)")
    # ------------------------------------------------------------ evaluation and logging
    eval_interval: int = _f(250, "evaluate train/val loss every N steps (0: only at the end)")
    eval_iters: int = _f(20, "batches per evaluation (fixed batches, so evaluations compare)")
    log_interval: int = _f(10, "record per-group gradient magnitudes every N steps")
    checkpoint_interval: int = _f(250, "save OUT/latest every N steps (0: only at the end)")
    plot: bool = _f(True, "write PNG plots into OUT at the end")
    sample_tokens: int = _f(300, "tokens of sample text printed at the end (0: none)")
    sample_prompt: str = _f("The ", "prompt of the final sample")
    sample_temperature: float = _f(0.8, "temperature of the final sample (0: greedy)")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        self._check_values()

    # ------------------------------------------------------------------ checks
    def _check_values(self) -> None:
        self.model_config(vocab_size=1)  # the model's shape rules live in GPTConfig alone
        for name in ("batch_size", "gradient_accumulation_steps", "eval_iters", "log_interval",
                     "workers"):
            _require(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("max_iters", "warmup_iters", "eval_interval", "checkpoint_interval",
                     "sample_tokens", "seed"):
            _require(getattr(self, name) >= 0, name, "must be >= 0")
        _require(self.workers <= self.batch_size, "workers",
                 f"({self.workers}) must be <= batch_size ({self.batch_size}): each takes rows")
        _require(self.dtype in ("float32", "float64"), "dtype",
                 "must be 'float32' or 'float64' for training")
        _require(math.isfinite(self.learning_rate) and self.learning_rate > 0, "learning_rate",
                 "must be a finite number > 0")
        _require(0.0 <= self.min_lr <= self.learning_rate, "min_lr",
                 f"must be in [0, learning_rate={self.learning_rate}]")
        for name in ("beta1", "beta2"):
            _require(0.0 <= getattr(self, name) < 1.0, name, "must be in [0, 1)")
        _require(math.isfinite(self.rank_timeout) and self.rank_timeout > 0, "rank_timeout",
                 "must be a finite number of seconds > 0")
        for name in ("weight_decay", "grad_clip", "sample_temperature"):
            value = getattr(self, name)
            _require(math.isfinite(value) and value >= 0, name, "must be a finite number >= 0")
        if self.lr_decay_iters is not None:
            _require(self.lr_decay_iters >= self.warmup_iters, "lr_decay_iters",
                     f"must be >= warmup_iters ({self.warmup_iters})")
        _require(not (self.resume and self.overwrite), "overwrite",
                 "cannot be combined with resume: choose one")

    # ------------------------------------------------------------------ derived
    def model_config(self, vocab_size: int) -> GPTConfig:
        """The GPTConfig of a model trained from scratch with this config (the vocabulary
        comes from the data). GPTConfig validates the shape: the one place that does."""
        return GPTConfig(vocab_size=vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd, bias=self.bias,
                         dropout=self.dropout, activation=self.activation, dtype=self.dtype,
                         kernels=self.kernels)

    @property
    def decay_iters(self) -> int:
        """Where the cosine reaches ``min_lr``: ``lr_decay_iters``, else ``max_iters`` (at least
        ``warmup_iters``, so a run shorter than its warmup simply stays in warmup)."""
        return decay_iters(self.lr_decay_iters, self.max_iters, self.warmup_iters)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size * self.gradient_accumulation_steps

    # ------------------------------------------------------------------ conversions
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> "TrainConfig":
        """Build from a mapping; unknown keys are a ConfigError naming them (and the nearest
        known key, for typos). ``source`` names where the values came from in messages."""
        _check_keys(values, source)
        try:
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_sources(cls, toml_path: str | Path | None = None,
                     overrides: Mapping[str, Any] | None = None,
                     base: Mapping[str, Any] | None = None) -> "TrainConfig":
        """``base`` (e.g. a checkpoint's saved config), then the TOML file, then ``overrides``
        (e.g. flags), later ones winning key by key. A bad key or type is reported with the
        source it came from."""
        merged: dict[str, Any] = dict(base or {})
        if toml_path is not None:
            file_values = load_toml(toml_path)
            _check_keys(file_values, str(toml_path))
            merged.update(file_values)
        merged.update(overrides or {})
        return cls.from_dict(merged, source="the configuration")


def decay_iters(lr_decay_iters: int | None, max_iters: int, warmup_iters: int) -> int:
    """The step where a run's cosine reaches ``min_lr``: ``lr_decay_iters`` when set, else
    ``max_iters`` (at least ``warmup_iters``); for a saved config too (``TrainConfig.decay_iters``)."""
    if lr_decay_iters is not None:
        return lr_decay_iters
    return max(max_iters, warmup_iters)


# ---------------------------------------------------------------------- type checks

def _check_keys(values: Mapping[str, Any], source: str) -> None:
    """Every key known and every value of its field's type; ConfigError naming the first bad one."""
    hints = typing.get_type_hints(TrainConfig)
    for key, value in values.items():
        if key not in hints:
            known = list(hints)
            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown key {key!r} in {source}{hint}")
        try:
            _coerce(key, value, hints[key])
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def _require(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r} {what}")


def _type_name(tp) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:
        return f"{args[0].__name__} or unset"
    return tp.__name__


def _coerce(key: str, value, tp):
    """``value`` checked against the annotation ``tp`` (int, float, bool, str, or X | None).
    An int is accepted for a float (``learning_rate = 1``); nothing else is converted."""
    annotation, args = tp, typing.get_args(tp)
    if args:  # X | None
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
    if tp is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if tp in (bool, str) and isinstance(value, tp):
        return value
    raise ConfigError(f"config key {key!r} must be {_type_name(annotation)}, "
                      f"got {value!r} ({type(value).__name__})")


# ---------------------------------------------------------------------- TOML

def load_toml(path: str | Path) -> dict:
    """The flat key/value table of a TOML file; ConfigError for a missing file or bad syntax."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read ({e})") from None
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    for key, value in values.items():
        if isinstance(value, dict):
            raise ConfigError(f"config file {str(path)!r}: [{key}] is a table; the training "
                              f"config is flat, write its keys at the top level")
    return values


# ---------------------------------------------------------------------- CLI support

@dataclass(frozen=True)
class FieldInfo:
    """What the CLI needs to make a flag: name, base type, default, help, optional."""

    name: str
    type: type
    default: Any
    help: str
    optional: bool


def config_fields() -> list[FieldInfo]:
    """Every TrainConfig key, in declaration order, for generating ``--flags``."""
    hints = typing.get_type_hints(TrainConfig)
    out = []
    for f in dataclasses.fields(TrainConfig):
        tp, args = hints[f.name], typing.get_args(hints[f.name])
        base = next((a for a in args if a is not type(None)), tp)
        out.append(FieldInfo(f.name, base, f.default, f.metadata.get("help", ""), bool(args)))
    return out


# ---------------------------------------------------------------------- resume

def resume_config(out, overrides: dict | None = None, toml_path=None) -> TrainConfig:
    """The config of the run in ``out`` (from ``out/latest.json``) with ``overrides`` (and a
    TOML file) applied on top and ``resume`` set: what ``numgpt train --resume`` trains with."""
    path = Path(out) / "latest.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        saved = doc["meta"]["train_config"]
    except FileNotFoundError:
        raise no_checkpoint_to_resume(out) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot resume from {str(path)!r}: not a readable training "
                              f"checkpoint ({e})") from None
    saved = {**saved, "out": str(out), "resume": True, "overwrite": False}
    return TrainConfig.from_sources(toml_path, {**(overrides or {}), "resume": True}, base=saved)


def no_checkpoint_to_resume(out) -> CheckpointError:
    """The error for ``--resume`` where ``out/latest.json`` is missing. A run that stopped
    before its first checkpoint (its log is there) cannot be resumed and is started over with
    ``--overwrite`` (a plain rerun is refused: the folder holds a run); a folder with no run
    is trained without ``--resume`` first."""
    out = Path(out)
    if (out / "log.jsonl").exists():
        return CheckpointError(
            f"cannot resume: the run in {str(out)!r} stopped before its first checkpoint (there "
            f"is no latest.json); start it over with --overwrite instead of --resume, or choose "
            f"another --out")
    return CheckpointError(f"cannot resume: {str(out / 'latest.json')!r} does not exist; train "
                           f"without --resume first, or point --out at the run")
