"""What the inspect tools share: prompt checks, the logit-difference metric, tables, heatmaps."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.checks import check_token_ids, is_int
from ..errors import InputError

__all__ = ["prompt", "token", "logit_diff", "format_grid", "heatmap"]


class Result:
    """Base of the tools' frozen result dataclasses: ``to_dict`` is the JSON form (arrays as
    nested lists), what ``numgpt inspect --json`` and ``/v1/inspect`` print."""

    def to_dict(self) -> dict:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()}


def prompt(model, ids, what: str = "prompt") -> np.ndarray:
    """ids as one (1, T) int64 row after the shared id rule; 1 <= T <= block_size."""
    c = model.config
    arr = np.asarray(ids)
    arr = arr[None] if arr.ndim == 1 else arr
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise InputError(f"the {what} must be a non-empty list of token ids, got shape {np.shape(ids)}")
    return check_token_ids(arr, c.vocab_size, c.block_size, what=f"{what} ids",
                           hint="encode the text with the model's tokenizer")


def token(model, t, what: str) -> int:
    """One token id inside the vocabulary."""
    if not is_int(t) or not 0 <= t < model.config.vocab_size:
        raise InputError(f"{what} must be a token id in [0, {model.config.vocab_size}), got {t!r}")
    return int(t)


def logit_diff(logits: np.ndarray, answer: int, wrong: int) -> np.ndarray:
    """logit[answer] - logit[wrong] at the last position of each row: (B, T, V) -> (B,), float64."""
    last = logits[:, -1].astype(np.float64)  # (B, V)
    return last[:, answer] - last[:, wrong]


def format_grid(values: np.ndarray, rows: list[str], cols: list[str], fmt: str = "{:+.3f}") -> str:
    """A plain-text table: one line per row label, one column per col label."""
    width = max(len(fmt.format(1.0)), *(len(c) for c in cols)) + 1
    lead = max(len(r) for r in rows) + 1
    lines = [" " * lead + "".join(c.rjust(width) for c in cols)]
    for label, row in zip(rows, values):
        lines.append(label.ljust(lead) + "".join(fmt.format(v).rjust(width) for v in row))
    return "\n".join(lines)


def heatmap(path, panels: list[tuple[np.ndarray, list[str], list[str], str]], label: str) -> Path:
    """Write each panel ``(values (rows, cols), row labels, col labels, title)`` as a heatmap
    side by side in one PNG (matplotlib, Agg canvas, atomic write); diverging colours centred
    on 0."""
    from matplotlib.figure import Figure

    from ..train.plots import _save  # the one writer of PNG figures

    width = sum(1.6 + 0.45 * len(cols) for _, _, cols, _ in panels)
    height = 1.6 + 0.35 * max(len(rows) for _, rows, _, _ in panels)
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    for i, (values, rows, cols, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        limit = float(np.nanmax(np.abs(values))) or 1.0
        im = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, label=label)
    return _save(fig, Path(path))
