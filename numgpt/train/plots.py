"""PNG plots of a training run, drawn from its ``log.jsonl``.

``plot_run(run_dir)`` writes, into the run folder:

* ``loss.png``: the loss of every step (faint), its moving average, and the train and
  validation losses of each evaluation;
* ``lr.png``: the learning rate per step (warmup, cosine decay, floor);
* ``grad_norm.png``: the global gradient norm per step, before clipping (log scale);
* ``grad_groups.png``: mean |gradient| per parameter group (embeddings, attention, MLP,
  LayerNorm, head) every ``log_interval`` steps (log scale);
* ``val_loss_by_position.png``: validation loss at each position of the context window,
  from the end of training (how much the model gains from more context).

Matplotlib is used through its object API with the Agg canvas (no pyplot, no display, no
global backend switch), and each file is written to a temp name then renamed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.files import atomic_write

__all__ = ["read_log", "plot_run", "PLOT_FILES"]

PLOT_FILES = ("loss.png", "lr.png", "grad_norm.png", "grad_groups.png", "val_loss_by_position.png")
_GROUP_LABELS = {"embeddings": "embeddings (wte tied to the head, wpe)", "attention": "attention",
                 "mlp": "MLP", "layernorm": "LayerNorm (blocks)", "head": "head (ln_f)"}


def read_log(run_dir) -> dict[str, list[dict]]:
    """The records of ``run_dir/log.jsonl`` by kind: ``{"step": [...], "eval": [...], "final": [...]}``."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise InputError(f"{str(path)!r} does not exist; plot a folder written by `numgpt train`")
    out: dict[str, list[dict]] = {"step": [], "eval": [], "final": []}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{str(path)!r} line {i} is not JSON ({e}); the log is damaged") from None
        out.setdefault(record.get("kind", "step"), []).append(record)
    return out


def _figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.2), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))


def _smooth(values: np.ndarray, width: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists so far)."""
    c = np.cumsum(np.insert(values.astype(np.float64), 0, 0.0))  # c[i] = sum of the first i
    end = np.arange(1, len(values) + 1)
    start = np.maximum(end - width, 0)
    return (c[end] - c[start]) / (end - start)


def _plot_loss(steps, evals, out: Path) -> Path:
    fig, ax = _figure("Loss", "step", "cross-entropy (nats/token)")
    if steps:
        x = np.array([r["step"] for r in steps])
        y = np.array([r["loss"] for r in steps])
        ax.plot(x, y, color="tab:blue", alpha=0.25, lw=0.8, label="train (each step)")
        width = max(1, len(y) // 50)
        if width > 1:
            ax.plot(x, _smooth(y, width), color="tab:blue", lw=1.5,
                    label=f"train ({width}-step average)")
    if evals:
        ex = [r["step"] for r in evals]
        ax.plot(ex, [r["train_loss"] for r in evals], "o-", color="tab:green", ms=3,
                label="train (evaluation)")
        ax.plot(ex, [r["val_loss"] for r in evals], "o-", color="tab:red", ms=3,
                label="validation (evaluation)")
    ax.legend()
    return _save(fig, out / "loss.png")


def _plot_series(steps, key, title, ylabel, out: Path, log: bool = False) -> Path:
    fig, ax = _figure(title, "step", ylabel)
    ax.plot([r["step"] for r in steps], [r[key] for r in steps], color="tab:purple", lw=1.0)
    if log:
        ax.set_yscale("log")
    return _save(fig, out)


def _plot_groups(steps, out: Path) -> Path:
    fig, ax = _figure("Mean |gradient| per parameter group (before clipping)", "step",
                      "mean absolute gradient")
    rows = [r for r in steps if "grad_mean_abs" in r]
    for group, label in _GROUP_LABELS.items():
        pts = [(r["step"], r["grad_mean_abs"][group]) for r in rows if group in r["grad_mean_abs"]]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, lw=1.2, label=label)
    ax.set_yscale("log")
    if rows:
        ax.legend(fontsize=8, framealpha=0.85, loc="best")
    return _save(fig, out / "grad_groups.png")


def _plot_positions(final, out: Path) -> Path:
    fig, ax = _figure("Validation loss by position in the context window",
                      "position t (tokens of context = t + 1)", "cross-entropy (nats/token)")
    if final:
        y = final[-1]["val_loss_by_position"]
        ax.plot(np.arange(len(y)), y, "o-", ms=2.5, color="tab:red",
                label=f"step {final[-1]['step']}")
        ax.legend()
    return _save(fig, out / "val_loss_by_position.png")


def plot_run(run_dir, out_dir=None) -> list[Path]:
    """Write the five PNGs (``PLOT_FILES``) for the run in ``run_dir``; returns their paths."""
    records = read_log(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = records["step"]
    return [
        _plot_loss(steps, records["eval"], out),
        _plot_series(steps, "lr", "Learning rate", "learning rate", out / "lr.png"),
        _plot_series(steps, "grad_norm", "Global gradient norm (before clipping)", "L2 norm",
                     out / "grad_norm.png", log=True),
        _plot_groups(steps, out),
        _plot_positions(records["final"], out),
    ]
