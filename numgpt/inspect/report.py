"""Each inspect result as a text table and as a PNG heatmap (what ``numgpt inspect`` prints)."""

from __future__ import annotations

import numpy as np

from .ablation import Ablation
from .attribution import Attribution
from .common import format_grid, heatmap
from .lens import LogitLens
from .patching import Patching

__all__ = ["text", "png"]


def _labels(ids: list[int], tokenizer) -> list[str]:
    """'3 ' dog'' per position: the index and the token's text (its id without a tokenizer)."""
    if tokenizer is None:
        return [f"{i} #{t}" for i, t in enumerate(ids)]
    return [f"{i} {tokenizer.decode([t])!r}"[:14] for i, t in enumerate(ids)]


def _layers(n: int) -> list[str]:
    return [f"L{l}" for l in range(n)]


def _panels(result, tokenizer) -> tuple[list, str]:
    """The heatmap panels of a result and the colour bar's label."""
    if isinstance(result, LogitLens):
        values = result.target_probs if result.target is not None else result.top_probs[..., 0]
        what = "target probability" if result.target is not None else "top-1 probability"
        return [(values, result.layers, _labels(result.ids, tokenizer), f"logit lens: {what}")], what
    if isinstance(result, Patching):
        L, nh = result.heads.shape
        return [(result.resid, _layers(L), _labels(result.corrupted_ids, tokenizer),
                 "patch resid_pre (layer, position)"),
                (result.heads, _layers(L), [f"H{h}" for h in range(nh)], "patch head output (hook_z)")], \
            "normalised logit difference"
    if isinstance(result, Ablation):
        L, nh = result.heads.shape
        grid = np.column_stack([result.heads, result.mlps])
        return [(grid, _layers(L), [f"H{h}" for h in range(nh)] + ["MLP"],
                 f"{result.method} ablation")], f"change in {result.metric}"
    if isinstance(result, Attribution):
        L, nh = result.heads.shape
        grid = np.column_stack([result.heads, result.attn_bias, result.mlps])
        return [(grid, _layers(L), [f"H{h}" for h in range(nh)] + ["attn bias", "MLP"],
                 "direct logit attribution")], "logit contribution"
    raise TypeError(f"not an inspect result: {type(result).__name__}")


def text(result, tokenizer=None) -> str:
    """A plain-text report of any inspect result."""
    panels, label = _panels(result, tokenizer)
    if isinstance(result, LogitLens):
        lines = [f"logit lens over {len(result.ids)} positions; top-1 token (probability) per layer:"]
        pos = _labels(result.ids, tokenizer)
        for l, layer in enumerate(result.layers):
            tops = [f"{_labels([t], tokenizer)[0][2:]} {p:.2f}" for t, p in
                    zip(result.top_ids[l, :, 0], result.top_probs[l, :, 0])]
            lines.append(f"{layer:>6}: " + " | ".join(tops))
        if result.target is not None:
            lines += ["", f"probability of the target token #{result.target}:",
                      format_grid(result.target_probs, result.layers, pos, "{:.4f}")]
        return "\n".join(lines)
    head = {Patching: lambda r: f"clean logit diff {r.clean_diff:+.4f}, corrupted {r.corrupted_diff:+.4f}; "
                                "1 = patch restores the clean answer, 0 = no effect",
            Ablation: lambda r: f"clean {r.metric} {r.clean:.4f}; each cell: {r.metric} after the "
                                f"ablation minus clean",
            Attribution: lambda r: f"logit of #{r.target}" + (f" minus #{r.contrast}" if r.contrast is not None else "")
                                   + f" at position {r.position}: {r.logit:+.4f} = embed {r.embed:+.4f} "
                                     f"+ pos {r.pos_embed:+.4f} + ln_f bias {r.ln_bias:+.4f} + the cells"}
    lines = [head[type(result)](result)]
    for values, rows, cols, title in panels:
        lines += ["", f"{title} ({label}):", format_grid(values, rows, cols)]
    return "\n".join(lines)


def png(result, path, tokenizer=None):
    """Write the result's heatmap(s) to ``path``; returns the path."""
    panels, label = _panels(result, tokenizer)
    return heatmap(path, panels, label)
