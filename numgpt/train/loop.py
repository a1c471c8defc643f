"""The training loop as an importable function: ``train(config) -> TrainResult``.

One optimizer step (``train_step``) is: zero the gradients; for each of
``gradient_accumulation_steps`` micro-batches, forward, scale the loss by ``1/steps`` and
backward (gradients add up in ``.grad``); measure the per-group gradient magnitudes
(every ``log_interval`` steps); clip the global norm; one AdamW update at the scheduled
learning rate. ``train`` wraps it with data sampling, evaluation, checkpoints, a log, a
progress bar and plots. Data parallelism lives in ``train.parallel``: with ``workers > 1``
the rows of every micro-batch are split over threads that run forward and backward at the
same time, each with single-threaded BLAS, and under ``mpiexec -n N`` over N processes
(ranks) too; the gradients go through one reduction path (worker order, then one allreduce
over the ranks), so runs stay deterministic (the result equals the serial step up to float
rounding). Under mpiexec every rank trains and evaluates its share; rank 0 alone writes the
checkpoints, the log, the plots and the sample.

Randomness is explicit. ``SeedSequence(seed)`` spawns independent streams for the batch
sampler, dropout and the evaluation batches; the model init uses ``seed`` itself. The
sampler and dropout generator states go into every checkpoint, so ``resume`` continues
bit for bit: 10 steps + resume + 10 steps gives the same losses and weights as 20 steps.
Evaluation draws its batches from a fresh generator with a fixed seed each time, so every
evaluation of a run scores the same batches and the numbers compare.

Files in the run folder ``out``:
    latest.json/.safetensors  weights, optimizer moments, config, step, RNG states
    best.json/.safetensors    the weights with the lowest validation loss so far
    log.jsonl                 one JSON object per step, per evaluation, and at the end
    *.png                     plots (``numgpt.train.plots``)
    data/                     the prepared default corpus, when no ``data`` is given

Ctrl-C or SIGTERM stops after the current step, saves ``latest`` and raises
``KeyboardInterrupt`` (a second one aborts at once without saving); under mpiexec the ranks
agree on the stop each step, so they all stop after the same one. A NaN or infinite loss or gradient norm
raises ``TrainingDiverged`` before the optimizer touches the weights, so the checkpoints on
disk stay the last good ones.

Shapes: ``B`` batch size, ``T`` block size, ``V`` vocabulary, ``N`` tokens in a split.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..core import ops, quant
from ..core.checks import log_softmax64
from ..core.model import GPT, GPTConfig
from ..core.tensor import apply, no_grad
from ..errors import CheckpointError, ConfigError, InputError, NumGPTError
from ..io import checkpoint
from ..io.data import SPLITS, TokenDataset, get_batch, prepare, split_advice
from ..io.files import atomic_write, make_folder, write_errors
from ..io.recovery import tidy_folder
from ..io.tokenizer import ByteTokenizer, tokenizer_from_config
from .config import ARCH_KEYS, TrainConfig, decay_iters, no_checkpoint_to_resume, resume_config
from .optim import AdamW, lr_schedule
from .parallel import (DataParallel, Ranks, check_split, fingerprint, on_every_rank, rank_rows,
                       ranks_from_environment)

__all__ = ["train", "TrainResult", "TrainingDiverged", "train_step", "StepStats", "DataParallel",
           "estimate_loss", "position_losses", "param_group", "grad_group_means",
           "global_grad_norm", "default_corpus", "resume_config", "keep_freed_memory", "GROUPS",
           "CHECKPOINT_KIND"]

CHECKPOINT_KIND = "numgpt-train"
GROUPS = ("embeddings", "attention", "mlp", "layernorm", "head")
_LOG = "log.jsonl"
_RUN_FILES = ("latest.json", "latest.safetensors", "best.json", "best.safetensors", _LOG)


class TrainingDiverged(NumGPTError):
    """The loss or the gradient norm became NaN or infinite; training stopped."""


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory in the process (``M_TRIM_THRESHOLD`` and
    ``M_TOP_PAD`` raised, ``M_MMAP_THRESHOLD`` at 1 GiB), so each training step reuses the
    pages the last step freed instead of returning them to the kernel and faulting in
    fresh zeroed ones: about 1.6x faster steps on a small model. The process keeps its
    peak memory until it exits. Returns False (and does nothing) off glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h
    return bool(mallopt(M_TRIM_THRESHOLD, 1 << 30) and mallopt(M_TOP_PAD, 64 << 20)
                and mallopt(M_MMAP_THRESHOLD, 1 << 30))


# ------------------------------------------------------------------------- one step

@dataclass
class StepStats:
    """What one optimizer step measured: mean micro-batch loss, pre-clip global gradient
    norm, the learning rate used, and (when asked) mean |grad| per parameter group."""

    loss: float
    grad_norm: float
    lr: float
    grad_means: dict[str, float] | None = None


def param_group(name: str) -> str:
    """The plot group of a parameter: embeddings (``wte``, ``wpe``; ``wte`` is also the tied
    output head, so its gradient includes the head's), attention, mlp, layernorm (the
    blocks' ``ln_1``/``ln_2``), head (``ln_f``, the final LayerNorm feeding the head)."""
    if name.startswith(("wte.", "wpe.")):
        return "embeddings"
    if ".attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if name.startswith("ln_f."):
        return "head"
    if ".ln_" in name:
        return "layernorm"
    raise ConfigError(f"parameter {name!r} belongs to no known group; numgpt trains models whose "
                      f"parameters carry GPT-2's names (wte, wpe, h.N.attn/mlp/ln_1/ln_2, ln_f)")


def grad_group_means(params: dict) -> dict[str, float]:
    """Mean absolute gradient over all elements of each group's parameters."""
    sums = {g: 0.0 for g in GROUPS}
    counts = {g: 0 for g in GROUPS}
    for name, p in params.items():
        if p.grad is not None:
            g = param_group(name)
            sums[g] += float(np.abs(p.grad).sum(dtype=np.float64))
            counts[g] += p.grad.size
    return {g: sums[g] / counts[g] for g in GROUPS if counts[g]}


def global_grad_norm(params: dict) -> float:
    """sqrt(sum of squared gradient entries) over every parameter that has a gradient."""
    total = 0.0
    for p in params.values():
        if p.grad is not None:
            flat = p.grad.ravel()
            total += float(np.dot(flat, flat))
    return math.sqrt(total)


def _check_finite(what: str, value: float, step: int, lr: float) -> None:
    if not math.isfinite(value):
        raise TrainingDiverged(
            f"the {what} is {value} at step {step} (learning rate {lr:.3g}); training stopped "
            f"before the weights were updated. Lower learning_rate, raise warmup_iters or set "
            f"grad_clip, then continue from the last good checkpoint with --resume")


def _backward_slices(model: GPT, slices: list, rngs: list) -> tuple[float, dict]:
    """One worker's share: forward/backward of its (x, y, scale) slices, in order, gradients
    added into a fresh dict; returns (sum of scaled losses, {param: grad}). A NaN loss is not
    raised here: the step checks the loss summed over every worker and rank, so all of them
    stop together."""
    into: dict = {}
    total = 0.0
    for (x, y, scale), rng in zip(slices, rngs):
        _, loss = model(x, y, rng=rng)
        total += float(loss.data) * scale
        (loss if scale == 1.0 else apply(ops.scale, loss, c=scale)).backward(into=into)
    return total, into


def train_step(model: GPT, optimizer: AdamW, batches: list[tuple[np.ndarray, np.ndarray]], *,
               lr: float, grad_clip: float, rng: np.random.Generator | None = None,
               group_stats: bool = False, step: int = 0,
               parallel: DataParallel | None = None) -> StepStats:
    """One optimizer step over ``len(batches)`` micro-batches (gradient accumulation).

    Each micro-batch ``(x, y)`` is ``(B, T)`` int; its mean cross-entropy is scaled by
    ``1 / len(batches)`` before backward, so the accumulated gradient is that of the mean
    loss over all micro-batches. ``rng`` drives dropout (None: no dropout). Clipping uses
    ``grad_clip`` (0: off). ``parallel`` (``train.parallel.DataParallel``; None: one worker,
    one process) splits each micro-batch's rows over its worker threads and MPI ranks, each
    slice's loss scaled by its share of the rows, and sums the gradients through its one
    reduction path; the result equals the serial step up to float rounding. Raises
    ``TrainingDiverged`` (weights untouched) on a NaN/inf loss or gradient norm; ``step``
    only labels that message.
    """
    optimizer.zero_grad()
    params = optimizer.params
    own = parallel is None
    parallel = DataParallel(1) if own else parallel
    try:
        total = parallel.backward(lambda slices, rngs: _backward_slices(model, slices, rngs),
                                  optimizer, batches, rng, f"step {step}")
    finally:
        if own:
            parallel.close()
    _check_finite("loss", total, step, lr)
    means = grad_group_means(params) if group_stats else None
    norm = optimizer.clip_grad_norm(grad_clip)  # fast AdamW: applied inside its one sweep
    _check_finite("gradient norm", norm, step, lr)
    optimizer.step(lr=lr)
    return StepStats(total, norm, lr, means)


# ------------------------------------------------------------------------- evaluation

def estimate_loss(model: GPT, data: np.ndarray, batch_size: int, block_size: int, iters: int,
                  seed, ranks: Ranks | None = None, mask: np.ndarray | None = None) -> float:
    """Mean loss over ``iters`` batches drawn from ``default_rng(seed)`` (no graph, no
    dropout), so two calls with the same seed score the same batches. With ``ranks`` every
    rank draws the same batches, scores its chunk of rows and the losses are summed over the
    ranks (each weighted by its share of the rows). ``mask``: the split's loss mask (chat
    data): only the targets it marks count."""
    ranks = ranks if ranks is not None else Ranks()
    rows = rank_rows(batch_size, ranks.rank, ranks.size)
    rng = np.random.default_rng(seed)
    losses = np.zeros(iters)  # (iters,) this rank's share of each batch's mean loss
    with no_grad():
        for i in range(iters):
            x, y = get_batch(data, batch_size, block_size, rng, mask)  # (B, T) each
            loss = float(model(x[rows], y[rows])[1].data)
            if mask is None or ranks.size == 1:
                losses[i] = loss / ranks.size
            else:  # weighted by this rank's share of the counted targets
                total = np.count_nonzero(y != -1)
                losses[i] = loss * np.count_nonzero(y[rows] != -1) / total if total else 0.0
    ranks.sum(losses, "an evaluation")
    return float(np.mean(losses))


def position_losses(model: GPT, data: np.ndarray, batch_size: int, block_size: int, iters: int,
                    seed, ranks: Ranks | None = None) -> np.ndarray:
    """Mean loss at each position of the context window: (T,) float64.

    Position t predicts token t+1 from the t+1 tokens before it, so the curve shows how
    much the model gains from more context. Log-softmax in float64 over (B, T, V) logits.
    With ``ranks`` the rows of each batch are split over the ranks and the sums reduced.
    """
    ranks = ranks if ranks is not None else Ranks()
    rows = rank_rows(batch_size, ranks.rank, ranks.size)
    rng = np.random.default_rng(seed)
    total = np.zeros(block_size, dtype=np.float64)
    with no_grad():
        for _ in range(iters):
            x, y = get_batch(data, batch_size, block_size, rng)  # (B, T) each
            x, y = x[rows], y[rows]  # (B / ranks, T)
            logp = log_softmax64(model(x)[0].data)  # (B / ranks, T, V)
            picked = np.take_along_axis(logp, y[..., None], axis=-1)[..., 0]  # (B / ranks, T)
            total -= picked.mean(axis=0) / ranks.size
    ranks.sum(total, "the per-position losses")
    return total / iters


# ------------------------------------------------------------------------- data

def default_corpus(folder: Path, *, progress: bool = False) -> Path:
    """The no-download corpus: every topic of the standard library's ``pydoc_data`` (the
    Python language reference sections ``help()`` shows, about 460 KB of English and code),
    written to ``folder/pydoc_topics.txt`` and prepared as bytes into ``folder``. Reused
    when already prepared."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("pydoc_data") is None:
        raise InputError("this Python has no pydoc_data module to train on by default; "
                         "pass --data with a folder made by `numgpt prepare`")
    folder = Path(folder)
    if (folder / "meta.json").is_file():
        return folder
    topics = importlib.import_module("pydoc_data.topics").topics
    text = "\n\n".join(topics[k].strip("\n") for k in sorted(topics)) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    source = atomic_write(folder / "pydoc_topics.txt", text)
    prepare([source], ByteTokenizer(), folder, val_fraction=0.1, progress=progress)
    return folder


def _check_tokenizers(model_tok, data_meta: dict, model_vocab: int, where: str, data_dir) -> None:
    """The data's token ids must mean the same as the model's: same tokenizer kind and
    vocabulary size, and every id inside the model's embedding table."""
    data_tok = data_meta["tokenizer"]
    data_vocab = int(data_meta["vocab_size"])
    mine = model_tok.to_config() if model_tok is not None else None
    if mine is None or mine.get("type") != data_tok.get("type") or model_tok.vocab_size != data_vocab \
            or data_vocab > model_vocab:
        desc = "no tokenizer" if mine is None else f"{mine.get('type')} (vocab {model_tok.vocab_size})"
        raise InputError(
            f"the data in {str(data_dir)!r} was tokenized with {data_tok.get('type')} (vocab "
            f"{data_vocab}) but the model {where} uses {desc}, embedding {model_vocab} ids; "
            f"re-run `numgpt prepare --tokenizer` with the model's tokenizer")


# ------------------------------------------------------------------------- the run

@dataclass
class TrainResult:
    """What ``train`` returns: where it wrote, how far it got, and the trained model."""

    out: Path
    step: int
    losses: list[float]
    val_loss: float | None
    best_val_loss: float | None
    model: GPT
    tokenizer: object
    plots: list[Path] = field(default_factory=list)
    sample: str | None = None
    rank: int = 0  # under mpiexec: this process's rank (0 wrote the files) and how many ran
    ranks: int = 1

    @property
    def log_path(self) -> Path:
        return self.out / _LOG


class _Run:
    """The mutable state of one training run (model, optimizer, RNGs, step, log)."""

    def __init__(self, cfg: TrainConfig, progress: bool, ranks: Ranks):
        self.cfg, self.ranks = cfg, ranks
        self.progress = progress and ranks.is_root  # one bar and one set of messages
        self.out = Path(cfg.out)
        root = ranks.is_root
        ranks.agree(lambda: check_split(cfg.batch_size, cfg.workers, ranks.size), "split the batch")
        ranks.agree(self._prepare_out if root else lambda: None, "prepare the run folder")
        # rank 0 prepares the default corpus first; the others then find it (or, on another
        # machine without a shared folder, write the same files themselves)
        self.data_dir = ranks.agree(self._data_dir if root else lambda: None, "prepare the data")
        self.data_dir = ranks.agree(lambda: self.data_dir if root else self._data_dir(), "find the data")
        ranks.agree(self._setup, "set up training")
        cfg = self.cfg  # resuming may have pinned the schedule of the run (_restore)
        self._check_launch()
        self.parallel = DataParallel(cfg.workers, ranks)
        ranks.out_hint = (self._checkpoint_hint() if cfg.resume else
                          " No checkpoint was saved yet: start over with --overwrite")
        self.schedule = lr_schedule("cosine" if cfg.decay_lr else "constant",
                                    learning_rate=cfg.learning_rate, warmup_iters=cfg.warmup_iters,
                                    lr_decay_iters=cfg.decay_iters, min_lr=cfg.min_lr)
        if cfg.decay_lr and 0 < cfg.max_iters < cfg.warmup_iters:  # nanoGPT says nothing
            self._say(f"numgpt: warning: max_iters {cfg.max_iters} is below warmup_iters "
                      f"{cfg.warmup_iters}: the learning rate warms up for the whole run and ends "
                      f"at {self.schedule(cfg.max_iters - 1):.3g}, never reaching learning_rate "
                      f"{cfg.learning_rate:g}; lower --warmup-iters to train at the peak")
        self.log_file = ranks.agree(self._open_log if root else lambda: None, "open the log")

    def _data_dir(self) -> Path:
        cfg = self.cfg
        return Path(cfg.data) if cfg.data else default_corpus(self.out / "data", progress=self.progress)

    def _setup(self) -> None:
        """Data, model, optimizer, RNGs; the checkpoint when resuming."""
        cfg = self.cfg
        self.dataset = TokenDataset(self.data_dir)
        self._check_splits()
        seeds = np.random.SeedSequence(cfg.seed).spawn(3)
        self.data_rng = np.random.default_rng(seeds[0])
        self.dropout_rng = np.random.default_rng(seeds[1])
        self.eval_seeds = dict(zip(SPLITS, seeds[2].spawn(len(SPLITS))))  # reused each eval
        self.step, self.best_val, self.last_val = 0, None, None
        self.model = self._build_model()
        if "chat" in self.dataset.meta:  # trained on conversations: its checkpoints carry the template
            self.model.chat_template = self.dataset.meta["chat"]["template"]
        self.optimizer = AdamW(self.model.parameters(), lr=cfg.learning_rate,
                               betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                               kernels=cfg.kernels)
        if cfg.resume:
            self._restore()

    def _check_launch(self) -> None:
        """Every rank must train the same thing: the same config, the same data (meta, split
        sizes and a sample of the tokens) and, resuming, the same step, weights and sampler
        state. Compared before the first step; a mismatch is a ConfigError on every rank
        naming the first rank and the keys that differ from rank 0."""
        if self.ranks.size == 1:
            return
        import socket

        mine = self._launch_fingerprint()
        where = f"pid {os.getpid()} on {socket.gethostname()}"  # not compared: differs by design
        everyone = self.ranks.allgather([where, mine], "compare the launch")
        for rank, (_, theirs) in enumerate(everyone):
            differ = sorted(k for k in set(mine) | set(theirs) if everyone[0][1].get(k) != theirs.get(k))
            if differ:
                raise on_every_rank(ConfigError(
                    f"rank {rank} was launched differently from rank 0 ({', '.join(differ)} "
                    f"differ); every rank of `mpiexec -n {self.ranks.size} numgpt train` needs "
                    f"the same flags, config file, data and run folder contents"))
        if self.ranks.is_root:  # so that a launcher's message naming a dead PID names the rank
            print(f"numgpt: {self.ranks.size} ranks: " + ", ".join(
                f"rank {r} {w}" for r, (w, _) in enumerate(everyone)), file=sys.stderr, flush=True)

    def _launch_fingerprint(self) -> dict:
        cfg = self.cfg.to_dict()
        data = {split: self.dataset.splits[split] for split in SPLITS}
        sample = [d[np.linspace(0, len(d) - 1, 4096).astype(np.int64)] for d in data.values()]
        out = {f"config.{k}": v for k, v in cfg.items()}
        out.update({"data.meta": json.dumps(self.dataset.meta, sort_keys=True),
                    "data.tokens": {s: len(d) for s, d in data.items()},
                    "data.sample": fingerprint(sample), "step": self.step,
                    "weights": fingerprint(p.data for p in self.model.parameters().values()),
                    "sampler": json.dumps(self.data_rng.bit_generator.state, sort_keys=True)})
        return out

    # ------------------------------------------------------------------ setup
    def _prepare_out(self) -> None:
        out, cfg = self.out, self.cfg
        if out.exists() and not out.is_dir():
            raise ConfigError(f"out {str(out)!r} exists and is not a folder; choose another --out")
        make_folder(out, "training")
        with write_errors(out, "nothing was changed"):  # a crash's leftovers, before anything reads
            for note in tidy_folder(out):
                print(f"numgpt: note: {note}", file=sys.stderr)
        has_run = (out / "latest.json").exists() or (out / _LOG).exists()
        if cfg.resume and not (out / "latest.json").exists():
            raise no_checkpoint_to_resume(out)
        if has_run and not cfg.resume:
            if not cfg.overwrite:
                if not (out / "latest.json").exists():  # --resume would be refused: say so
                    raise ConfigError(f"{str(out)!r} holds a run that stopped before its first "
                                      f"checkpoint; pass --overwrite to start over, or another --out")
                raise ConfigError(f"{str(out)!r} already holds a training run; pass --resume to "
                                  f"continue it, --overwrite to start over, or another --out")
            for name in _RUN_FILES:
                (out / name).unlink(missing_ok=True)
            for png in out.glob("*.png"):
                png.unlink()

    def _check_splits(self) -> None:
        need = self.cfg.block_size + 1
        counts = {split: len(self.dataset.splits[split]) for split in SPLITS}
        for split in SPLITS:
            n = counts[split]
            if n < need:
                raise InputError(
                    f"the {split} split of {str(self.data_dir)!r} has {n} tokens, but block_size "
                    f"{self.cfg.block_size} needs at least {need}; "
                    f"{split_advice(counts, self.cfg.block_size)}")

    def _build_model(self) -> GPT:
        cfg, meta = self.cfg, self.dataset.meta
        if cfg.init:
            model = checkpoint.load(cfg.init, dtype=cfg.dtype)
            quant.refuse_training(model, f"fine-tuning {cfg.init!r}")  # q8_0 is inference-only
            where = f"at {cfg.init!r}"
            if cfg.block_size > model.config.block_size:
                raise ConfigError(f"config key 'block_size' is {cfg.block_size} but the model {where} "
                                  f"has a context of {model.config.block_size}; lower block_size")
            self.cfg = _fine_tune_config(cfg, model.config)  # what checkpoints record
        else:
            config = cfg.model_config(vocab_size=int(meta["vocab_size"]))
            checkpoint.check_memory(config, "training this model", copies=4,
                                    role="its parameters, gradients and AdamW's two moments")
            model = GPT(config, seed=cfg.seed)
            model.tokenizer = tokenizer_from_config(meta["tokenizer"])
            where = "being trained"
        _check_tokenizers(model.tokenizer, meta, model.config.vocab_size, where, self.data_dir)
        _set_dropout(model, cfg.dropout)
        return model

    def _restore(self) -> None:
        """Load ``out/latest``: weights, optimizer moments, step, best loss, RNG states."""
        prefix = self.out / "latest"
        model, meta, arrays = checkpoint.load_checkpoint(prefix)
        if meta.get("kind") != CHECKPOINT_KIND:
            raise CheckpointError(f"{prefix}.json is not a training checkpoint (kind "
                                  f"{meta.get('kind')!r}); it cannot be resumed")
        saved = meta["train_config"]
        # a fine-tuned model's shape is the --init model's (runs saved before the config
        # recorded it hold the defaults there): only the keys the config decides are compared
        keys = [k for k in ARCH_KEYS if not (self.cfg.init and k in _INIT_MODEL_KEYS)]
        for key in keys:
            if saved.get(key) != getattr(self.cfg, key):
                raise ConfigError(
                    f"config key {key!r} is {getattr(self.cfg, key)!r} but the run in "
                    f"{str(self.out)!r} was trained with {saved.get(key)!r}; a resumed run keeps "
                    f"its model, so drop that setting or start a new --out")
        if model.config.vocab_size != self.model.config.vocab_size:
            raise CheckpointError(f"{prefix} has vocab {model.config.vocab_size}, the data has "
                                  f"{self.model.config.vocab_size}")
        saved_params = model.parameters()
        for name, p in self.model.parameters().items():
            np.copyto(p.data, saved_params[name].data)
        self.optimizer.load_state_dict({"meta": meta["optimizer"], "arrays": arrays})
        # the config, not the checkpoint, decides hyper-parameters a user may change
        self.optimizer.betas = (self.cfg.beta1, self.cfg.beta2)
        self.optimizer.weight_decay = self.cfg.weight_decay
        self.step, self.best_val, self.last_val = int(meta["step"]), meta["best_val_loss"], meta["val_loss"]
        self.data_rng.bit_generator.state = meta["rng"]["data"]
        self.dropout_rng.bit_generator.state = meta["rng"]["dropout"]
        self._continue_schedule(saved)
        self._note_layout(meta.get("layout"))

    def _continue_schedule(self, saved: dict) -> None:
        """Resuming with another ``max_iters`` keeps the cosine of the run (nanoGPT decays to
        ``lr_decay_iters``, stored in its config), so the learning rate does not jump at the
        resume step; an ``lr_decay_iters`` given now is a new schedule, said in one line."""
        cfg = self.cfg
        if not cfg.decay_lr:
            return
        was = decay_iters(saved.get("lr_decay_iters"), saved.get("max_iters", cfg.max_iters),
                          saved.get("warmup_iters", cfg.warmup_iters))
        if cfg.lr_decay_iters is None and cfg.decay_iters != was:
            self.cfg = dataclasses.replace(cfg, lr_decay_iters=was)
            self._say(f"numgpt: resuming at step {self.step} with max_iters {cfg.max_iters}: the "
                      f"learning-rate schedule of the run continues (cosine to min_lr {cfg.min_lr:g} "
                      f"at step {was}" + (", then min_lr" if cfg.max_iters > was else "") +
                      f"); pass --lr-decay-iters N to decay over the new length instead")
        elif cfg.lr_decay_iters is not None and cfg.lr_decay_iters != was:
            self._say(f"numgpt: resuming at step {self.step} with a new schedule: the cosine now "
                      f"reaches min_lr {cfg.min_lr:g} at step {cfg.lr_decay_iters} (lr_decay_iters; "
                      f"the run had {was})")

    def _note_layout(self, saved: dict | None) -> None:
        """One line when the run resumes as another number of shards (ranks x workers) than
        wrote the checkpoint: what still holds, and what no longer repeats bit for bit."""
        if not saved:
            return
        ranks, workers = int(saved["ranks"]), int(saved["workers"])
        now = self.ranks.size * self.cfg.workers
        if ranks * workers == now:
            return
        def layout(r: int, w: int) -> str:
            return (f"{r * w} shard{'s' * (r * w != 1)} ({r} rank{'s' * (r != 1)} x {w} "
                    f"worker{'s' * (w != 1)})")

        self._say(f"numgpt: resuming a run trained as {layout(ranks, workers)} as "
                  f"{layout(self.ranks.size, self.cfg.workers)}: the same global batches and "
                  f"schedule, the gradient sums in another order (equal up to float rounding)"
                  + (" and other dropout masks" if self.cfg.dropout > 0 else "")
                  + f", so it does not repeat the run bit for bit; {ranks * workers} shards "
                  f"(ranks x workers) would")

    def _say(self, line: str) -> None:
        if self.ranks.is_root:
            print(line, file=sys.stderr, flush=True)

    def _checkpoint_hint(self) -> str:
        return (f" The last complete checkpoint is {str(self.out / 'latest')!r}; continue with "
                f"--resume")

    def _open_log(self) -> None:
        """Append to log.jsonl; on resume, first drop records past the checkpoint's step
        (written after it by the interrupted run), so the log reads as one clean run."""
        path = self.out / _LOG
        if self.cfg.resume and path.exists():
            keep = [r for r in _read_log_records(path)
                    if r.get("step", 0) <= self.step and r.get("kind") != "final"]
            atomic_write(path, "".join(json.dumps(r) + "\n" for r in keep))
        with write_errors(path, "nothing was trained"):
            return open(path, "a", encoding="utf-8")

    # ------------------------------------------------------------------ actions
    def log(self, record: dict) -> None:
        """Append ``record`` to log.jsonl (rank 0 alone writes the run's files). A full disk
        stops the run with a one-line ``WriteError``; the line it tore is dropped on resume."""
        if self.log_file is not None:
            with write_errors(self.out / _LOG, f"the last checkpoint in {str(self.out)!r} is "
                                               f"kept; continue with --resume"):
                self.log_file.write(json.dumps(record) + "\n")
                self.log_file.flush()

    def batches(self) -> list[tuple[np.ndarray, np.ndarray]]:
        c = self.cfg
        return [get_batch(self.dataset.train, c.batch_size, c.block_size, self.data_rng,
                          self.dataset.masks["train"])
                for _ in range(c.gradient_accumulation_steps)]

    def evaluate(self) -> dict:
        c = self.cfg
        losses = {s: estimate_loss(self.model, self.dataset.splits[s], c.batch_size, c.block_size,
                                   c.eval_iters, self.eval_seeds[s], self.ranks,
                                   self.dataset.masks[s]) for s in SPLITS}
        record = {"kind": "eval", "step": self.step, "train_loss": losses["train"],
                  "val_loss": losses["val"]}
        self.last_val = losses["val"]
        self.log(record)
        if self.best_val is None or losses["val"] < self.best_val:
            self.best_val = losses["val"]
            self.save("best", moments=False)
        return record

    def meta(self) -> dict:
        return {"kind": CHECKPOINT_KIND, "version": 1, "step": self.step,
                "best_val_loss": self.best_val, "val_loss": self.last_val,
                "train_config": self.cfg.to_dict(), "optimizer": self.optimizer.state_meta(),
                "layout": {"ranks": self.ranks.size, "workers": self.cfg.workers},
                "rng": {"data": self.data_rng.bit_generator.state,
                        "dropout": self.dropout_rng.bit_generator.state},
                "data": {"folder": str(self.data_dir), "meta": self.dataset.meta}}

    def save(self, name: str, moments: bool = True) -> Path:
        """Write ``out/name`` (rank 0 alone; the others hold the same weights)."""
        if name == "latest":  # every rank: a fault from now on points at this checkpoint
            self.ranks.out_hint = self._checkpoint_hint()
        if not self.ranks.is_root:
            return self.out / name
        arrays = self.optimizer.state_arrays() if moments else None
        return checkpoint.save(self.model, self.out / name, meta=self.meta(), arrays=arrays)

    def close(self) -> None:
        if self.log_file is not None:
            try:
                self.log_file.close()
            except OSError:  # a full disk: already reported by log(); resume drops the torn line
                pass
        if getattr(self, "parallel", None) is not None:
            self.parallel.close()


# The TrainConfig keys a fine-tuned model takes from the --init model rather than the config.
_INIT_MODEL_KEYS = ("n_layer", "n_head", "n_embd", "bias", "activation")


def _fine_tune_config(cfg: TrainConfig, model: GPTConfig) -> TrainConfig:
    """``cfg`` with the model keys of the --init model, so that the config a checkpoint
    stores describes the model trained, not the from-scratch defaults (``block_size`` stays
    the training context, at most the model's; ``dtype`` is already the config's)."""
    return TrainConfig.from_dict({**cfg.to_dict(), **{k: getattr(model, k) for k in _INIT_MODEL_KEYS}})


def _read_log_records(path: Path) -> list[dict]:
    """The records of log.jsonl. A last line cut short (the disk filled, or the process died,
    mid-write) is dropped with a warning; a damaged line before it is an error naming it."""
    lines = [(i, line) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if line.strip()]
    records = []
    for n, (i, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a {type(record).__name__}, not an object")
        except ValueError as e:
            if n < len(lines) - 1:
                raise CheckpointError(f"{str(path)!r} line {i} is not a JSON object ({e}); the log "
                                      f"is damaged: delete that line, then resume again") from None
            print(f"numgpt: warning: dropped the torn last line {i} of {str(path)!r} (a write "
                  f"cut short by a crash or a full disk)", file=sys.stderr)
            continue
        records.append(record)
    return records


def _set_dropout(model: GPT, p: float) -> None:
    """Use dropout probability ``p`` in every layer of ``model`` (fine-tuning may change it)."""
    model.config.dropout = p
    for block in model.h:
        block.attn.dropout = p
        block.mlp.dropout = p


STOP_SIGNALS = ("SIGINT", "SIGTERM")


@contextmanager
def _deferred_stop(announce: bool = True) -> Iterator[dict]:
    """While training, the first Ctrl-C (SIGINT) or SIGTERM only sets ``flag["stop"]`` (the
    loop saves and stops at the end of the step, so the weights are never saved half-updated);
    a second one aborts at once (``flag["abort"]``). ``mpiexec`` forwards both signals to every
    rank, and the ranks agree on the flag each step, so they stop after the same step.
    Outside the main thread signals cannot be caught: no change."""
    flag = {"stop": False, "abort": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["stop"]:
            flag["abort"] = True
            raise KeyboardInterrupt
        flag["stop"] = True
        if announce:
            print(f"\nnumgpt: {signal.Signals(signum).name}: stopping after this step and saving "
                  f"a checkpoint (Ctrl-C again aborts without saving)", file=sys.stderr)

    numbers = [getattr(signal, name) for name in STOP_SIGNALS]
    previous = {n: signal.signal(n, handler) for n in numbers}
    try:
        yield flag
    finally:
        for n, old in previous.items():
            signal.signal(n, old)


# ------------------------------------------------------------------------- the loop

def train(config: TrainConfig | dict, *, progress: bool = True,
          on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Train (or fine-tune, or resume) as ``config`` says; see the module docstring.

    Args:
        config: a ``TrainConfig`` or a dict of its keys.
        progress: show a live progress bar (loss, lr, tokens/s, ETA) and messages.
        on_step: called after every step with that step's log record (a dict).
    Returns:
        ``TrainResult`` (out folder, final step, this call's step losses, last and best
        validation loss, the model and its tokenizer, the plots written, the sample).
    Raises:
        ConfigError / InputError / CheckpointError for a bad setup (before any training);
        TrainingDiverged on a NaN/inf loss; KeyboardInterrupt after saving on Ctrl-C.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    keep_freed_memory()
    ranks = ranks_from_environment(cfg.rank_timeout)
    run = _Run(cfg, progress, ranks)
    if progress and ranks.is_root:
        print(f"numgpt: kernels={cfg.kernels} ("
              + ("compiled kernels and the fused AdamW; --kernels reference runs the NumPy ops"
                 if cfg.kernels == "fast" else "the NumPy reference ops; --kernels fast is faster")
              + ")", file=sys.stderr, flush=True)
    try:
        losses = _loop(run, on_step)
        return _finish(run, losses)
    except (TrainingDiverged, KeyboardInterrupt) as e:
        raise on_every_rank(e) if ranks.size > 1 else e  # every rank raises these together
    except BaseException as e:
        if ranks.size > 1:  # the other ranks would wait for this one forever: stop them all
            ranks.abort(f"{type(e).__name__}: {e}")
        raise
    finally:
        run.close()


def _loop(run: _Run, on_step) -> list[float]:
    from tqdm import tqdm

    cfg, losses = run.cfg, []
    bar = tqdm(total=cfg.max_iters, initial=run.step, desc="train", unit="step",
               disable=not run.progress, dynamic_ncols=True)
    with _deferred_stop(announce=run.ranks.is_root) as flag, bar:
        try:
            if run.step == 0 and cfg.eval_interval > 0 and cfg.max_iters > 0:
                _report_eval(run.evaluate(), bar)
            while run.step < cfg.max_iters:
                record = _one_step(run)
                losses.append(record["loss"])
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
                _after_step(run, bar)
                if on_step is not None:
                    on_step(record)
                if run.ranks.any(flag["stop"], f"the stop flag after step {run.step}"):
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            if not flag["abort"]:
                prefix = run.save("latest")
                if run.ranks.is_root:
                    print(f"numgpt: saved {prefix} at step {run.step}; continue with --resume",
                          file=sys.stderr)
            raise
    return losses


def _one_step(run: _Run) -> dict:
    cfg = run.cfg
    lr = run.schedule(run.step)  # nanoGPT numbers iterations from 0
    group_stats = run.step % cfg.log_interval == 0
    t0 = time.perf_counter()
    stats = train_step(run.model, run.optimizer, run.batches(), lr=lr, grad_clip=cfg.grad_clip,
                       rng=run.dropout_rng if cfg.dropout > 0 else None,
                       group_stats=group_stats, step=run.step + 1, parallel=run.parallel)
    dt = time.perf_counter() - t0
    run.step += 1
    record = {"kind": "step", "step": run.step, "loss": stats.loss, "lr": lr,
              "grad_norm": stats.grad_norm, "tokens_per_s": cfg.tokens_per_step / dt}
    if stats.grad_means is not None:
        record["grad_mean_abs"] = stats.grad_means
    run.log(record)
    return record


def _after_step(run: _Run, bar) -> None:
    cfg = run.cfg
    if cfg.eval_interval > 0 and run.step % cfg.eval_interval == 0 and run.step < cfg.max_iters:
        _report_eval(run.evaluate(), bar)
    if cfg.checkpoint_interval > 0 and run.step % cfg.checkpoint_interval == 0:
        run.save("latest")


def _report_eval(record: dict, bar) -> None:
    if not bar.disable:
        bar.write(f"step {record['step']}: train loss {record['train_loss']:.4f}, "
                  f"val loss {record['val_loss']:.4f}")


def _finish(run: _Run, losses: list[float]) -> TrainResult:
    """Final evaluation, checkpoint, per-position loss, plots and the sample (the files and
    the sample on rank 0 alone; the evaluations are shared by every rank)."""
    cfg, root = run.cfg, run.ranks.is_root
    if losses:  # this call trained: score the final weights
        record = run.evaluate()
        if run.progress:
            print(f"final: train loss {record['train_loss']:.4f}, val loss {record['val_loss']:.4f} "
                  f"(best {run.best_val:.4f})", file=sys.stderr)
    run.save("latest")
    pos = position_losses(run.model, run.dataset.val, cfg.batch_size, cfg.block_size,
                          cfg.eval_iters, run.eval_seeds["val"], run.ranks)
    run.log({"kind": "final", "step": run.step, "val_loss_by_position": pos.tolist()})
    plots = []
    if cfg.plot and root:
        run.log_file.flush()
        from .plots import plot_run
        plots = plot_run(run.out)
    sample = _sample(run) if cfg.sample_tokens > 0 and root else None
    return TrainResult(run.out, run.step, losses, run.last_val, run.best_val, run.model,
                       run.model.tokenizer, plots, sample, run.ranks.rank, run.ranks.size)


def _sample(run: _Run) -> str:
    """``sample_tokens`` tokens after ``sample_prompt`` from the trained model (seeded)."""
    import warnings

    from ..infer.sample import ContextSlideWarning, SamplingParams, generate

    cfg, tok = run.cfg, run.model.tokenizer
    prompt = tok.encode(cfg.sample_prompt) or [0]
    params = SamplingParams(temperature=cfg.sample_temperature, seed=cfg.seed)
    with warnings.catch_warnings():  # a sample longer than the context slides it: expected
        warnings.simplefilter("ignore", ContextSlideWarning)
        ids = generate(run.model, prompt[-cfg.block_size:], cfg.sample_tokens, params, tokenizer=tok)
    return tok.decode(prompt + ids)
