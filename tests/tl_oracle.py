"""TransformerLens as an oracle: one random-weight GPT-2 folder, booted by both engines.

``hf_folder`` writes a ``GPT2LMHeadModel`` with random weights (LayerNorm gains and every
bias randomised too: the Hugging Face init leaves them at 1 and 0, which would hide a gain
or bias bug) and the packaged GPT-2 tokenizer into a folder with ``save_pretrained``;
``numgpt.load`` and ``TransformerBridge.boot_transformers`` both read that folder, offline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
bridge_module = pytest.importorskip("transformer_lens.model_bridge",
                                    reason="transformer-lens 4.x (test extra) is not installed")

import numgpt  # noqa: E402
from conftest import shared_data_dir  # noqa: E402
SMALL = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=50257, n_positions=64)
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)


def hf_folder(folder: Path, shape: dict, seed: int = 0, mlp_scale: float = 4.0) -> Path:
    """Save a random-weight GPT-2 of ``shape`` and the GPT-2 tokenizer into ``folder``; the MLP
    matrices are scaled by ``mlp_scale`` so the MLPs matter next to the residual stream."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**shape, attn_implementation="eager")
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.add_(0.05 * torch.randn_like(p))
            if "mlp" in name and name.endswith("weight"):
                p.mul_(mlp_scale)
    hf.save_pretrained(folder)
    files = gpt2_files()
    tok = transformers.GPT2Tokenizer(str(files / "vocab.json"), str(files / "merges.txt"))
    tok.save_pretrained(folder)
    return folder


def gpt2_files() -> Path:
    """A folder with GPT-2's vocab.json + merges.txt: the packaged copy, else ../shared/data/gpt2
    (the bridge needs a tokenizer); skips when neither has them."""
    for folder in (Path(numgpt.__file__).parent / "io" / "gpt2", shared_data_dir() / "gpt2"):
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return folder
    pytest.skip("GPT-2 vocab.json/merges.txt not found (packaged or in ../shared/data/gpt2); "
                "TransformerBridge needs a tokenizer")


def boot(folder: Path, dtype: str = "float32"):
    """TransformerLens's bridge on ``folder`` (raw numerics: nothing folded), CPU, ``dtype``."""
    tok = transformers.GPT2Tokenizer.from_pretrained(folder)  # name_or_path set: the bridge needs it
    return bridge_module.TransformerBridge.boot_transformers(
        str(folder), device="cpu", tokenizer=tok, dtype=getattr(torch, dtype))


def to_numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy()


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Max |a - b| in float64 (inf when the shapes differ)."""
    if np.shape(a) != np.shape(b):
        return float("inf")
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())
