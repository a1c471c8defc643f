"""Record a validation trace from Hugging Face ``transformers`` (the reference engine).

Optional: needs the ``reference`` extra (``pip install 'numgpt[reference]'``: torch and
transformers). torch and transformers are imported inside the functions only, and
nothing in numgpt imports this module at top level, so numgpt runs without them.

``record_transformers(hf_model, prompt_ids, n_steps)`` writes the same keys, shapes and
step numbering as ``numgpt.verify.trace.record`` (see that module's docstring), read from the
reference engine with forward hooks on block 0 and from its cache:

==  =========================================================================
 1  forward hook on ``transformer.h[0].ln_1``
 2  forward hook on ``h[0].attn.c_attn``; its output split into q, k, v and into heads
    exactly as ``GPT2Attention.forward`` does (``split`` then ``view``/``transpose``)
 3  ``past_key_values.layers[0].keys / .values`` after the step (``DynamicCache``)
 4  scores: ``q @ k^T * attn.scaling`` from the hooked q and cached keys (eager's own
    expression), masked positions set to -inf (eager adds the dtype's minimum instead,
    see below); probabilities: the eager attention weights, from a hook on ``h[0].attn``
 5  the same hook on ``h[0].attn``: its output, which is after ``c_proj``
 6  forward hook on ``h[0].mlp``
 7  forward hook on ``h[0]``
 8  ``outputs.logits``; 9-11 selected, argmax'ed (as greedy ``generate`` does) and
    softmaxed with torch
==  =========================================================================

Masked scores: eager attention adds ``torch.finfo(dtype).min`` to future keys rather than
-inf. The probabilities are the same (exp underflows to 0 either way); for the scores both
recorders store -inf at the masked positions so the files compare entry by entry.

The model is switched to eager attention (sdpa does not return the weights) and to eval
mode for the recording, and put back afterwards.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, NumGPTError
from .trace import check_prompt, generated, meta, step_key

__all__ = ["record_transformers", "load_hf"]


def _imports():
    """(torch, transformers), or a NumGPTError that says how to install them."""
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise NumGPTError(f"the reference recorder needs torch and transformers ({exc}); "
                          f"install them with: pip install 'numgpt[reference]'") from exc
    return torch, transformers


def load_hf(folder: str | os.PathLike, dtype: str = "float32"):
    """A ``GPT2LMHeadModel`` from a local Hugging Face folder, eager attention, eval mode."""
    torch, transformers = _imports()
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a Hugging Face model folder (no config.json)")
    try:
        model = transformers.GPT2LMHeadModel.from_pretrained(
            folder, attn_implementation="eager", dtype=getattr(torch, dtype), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"transformers could not load {folder}: {exc}") from exc
    except pickle.UnpicklingError:  # torch.load(weights_only=True) met something other than tensors
        weights = next((str(folder / n) for n in ("pytorch_model.bin", "model.bin")
                        if (folder / n).is_file()), f"{folder}'s PyTorch weights file")
        raise CheckpointError(f"{weights}: the PyTorch weights file holds objects other than tensors "
                              f"(a pickle that could run code); refused, since only tensors are "
                              f"read (weights_only=True). Use a model.safetensors copy from a "
                              f"trusted source") from None
    return model.eval()


def _numpy(t) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


class _Hooks:
    """Forward hooks on block 0 that keep its outputs as numpy arrays, per step."""

    def __init__(self, block, n_embd: int, head_dim: int):
        self.seen: dict[str, np.ndarray] = {}
        self.n_embd, self.head_dim = n_embd, head_dim
        self.handles = [
            block.ln_1.register_forward_hook(self._keep("01_ln1")),
            block.attn.c_attn.register_forward_hook(self._qkv),
            block.attn.register_forward_hook(self._attn),
            block.mlp.register_forward_hook(self._keep("06_mlp_out")),
            block.register_forward_hook(self._keep("07_block_out")),
        ]

    def _keep(self, name: str):
        def hook(module, inputs, output):
            self.seen[name] = _numpy(output[0] if isinstance(output, tuple) else output)
        return hook

    def _qkv(self, module, inputs, output) -> None:
        """c_attn output (1, Tn, 3C) -> q, k, v (1, nh, Tn, hs), split as GPT2Attention does."""
        for name, part in zip(("02_q", "02_k", "02_v"), output.split(self.n_embd, dim=2)):
            heads = part.view(*part.shape[:-1], -1, self.head_dim).transpose(1, 2)  # (1, nh, Tn, hs)
            self.seen[name] = _numpy(heads)
            self.seen["_torch_" + name] = heads.detach()

    def _attn(self, module, inputs, output) -> None:
        attn_out, weights = output[0], output[1]
        if weights is None:
            raise NumGPTError("the attention module returned no weights; the model must use "
                              "eager attention (attn_implementation='eager')")
        self.seen["05_attn_out"] = _numpy(attn_out)
        self.seen["04_probs"] = _numpy(weights)
        self.seen["_scaling"] = module.scaling

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _scores(torch, q, keys, scaling: float) -> np.ndarray:
    """Eager's ``q @ k^T * scaling`` with future keys at -inf: (1, nh, Tn, Tk)."""
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scaling  # (1, nh, Tn, hs) @ (1, nh, hs, Tk)
    Tn, Tk = scores.shape[-2:]
    future = torch.ones(Tn, Tk, dtype=torch.bool).triu(Tk - Tn + 1)  # query i sees j <= Tk - Tn + i
    return _numpy(scores.masked_fill(future, float("-inf")))


@contextlib.contextmanager
def _recording_mode(model):
    """Eager attention and eval mode for the recording; the previous settings afterwards."""
    impl, training = model.config._attn_implementation, model.training
    if impl != "eager":
        model.set_attn_implementation("eager")
    model.eval()
    try:
        yield
    finally:
        if impl != "eager":
            model.set_attn_implementation(impl)
        model.train(training)


def _step(torch, hooks: _Hooks, out) -> dict[str, np.ndarray]:
    """Checkpoint arrays of one step from the hooks, the cache and the logits."""
    seen, layer0 = hooks.seen, out.past_key_values.layers[0]
    logits = out.logits  # (1, Tn, V)
    last = logits[:, -1]  # (1, V)
    arrays = {k: v for k, v in seen.items() if not k.startswith("_")}
    arrays.update({
        "03_cache_k": _numpy(layer0.keys), "03_cache_v": _numpy(layer0.values),
        "04_scores": _scores(torch, seen["_torch_02_q"], layer0.keys, seen["_scaling"]),
        "08_logits": _numpy(logits), "09_last_logits": _numpy(last),
        "10_argmax": _numpy(torch.argmax(last, dim=-1)).astype(np.int64),
        "11_probs": _numpy(torch.softmax(last, dim=-1)),
    })
    return arrays


def record_transformers(hf_model, prompt_ids, n_steps: int, tokenizer=None) -> dict[str, np.ndarray]:
    """Greedy-generate ``n_steps`` tokens with a ``transformers`` GPT-2 and its cache, recording
    the same checkpoints as ``numgpt.verify.trace.record``. ``tokenizer`` (anything with
    ``decode(ids)``) only decodes checkpoint 12's text."""
    torch, transformers = _imports()
    cfg = hf_model.config
    ids = check_prompt(prompt_ids, n_steps, cfg.vocab_size, cfg.n_positions)
    engine = f"transformers {transformers.__version__} (torch {torch.__version__}, eager attention)"
    trace = meta(engine, ids, n_steps, cfg.to_dict())
    hooks = _Hooks(hf_model.transformer.h[0], cfg.n_embd, cfg.n_embd // cfg.n_head)
    picked: list[int] = []
    try:
        with _recording_mode(hf_model), torch.no_grad():
            new, past = torch.tensor([ids], dtype=torch.long), None  # (1, T)
            for step in range(n_steps):
                hooks.seen.clear()
                out = hf_model(input_ids=new, past_key_values=past, use_cache=True)
                past = out.past_key_values
                arrays = _step(torch, hooks, out)
                trace.update({step_key(step, k): v for k, v in arrays.items()})
                picked.append(int(arrays["10_argmax"][0]))
                new = torch.tensor([[picked[-1]]], dtype=torch.long)  # (1, 1)
    finally:
        hooks.remove()
    trace.update(generated(picked, tokenizer))
    return trace
