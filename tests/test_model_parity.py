"""Rung 4 of the verification ladder: the whole model against ``transformers.GPT2LMHeadModel``.

A GPT2LMHeadModel with random weights (HF's own GPT-2 init, plus random LayerNorm gains and
biases and random linear biases so no parameter sits at a trivial value) is saved with
``save_pretrained`` and loaded by numgpt's importer. Both run the same token ids; we compare
logits, the mean cross-entropy, and the gradient of every parameter (HF's tied ``wte``
gradient already holds the output head's contribution, as numgpt's does).

Gates (from the issue): float64 logits < 1e-5 abs, loss < 1e-6 abs, every parameter
gradient < 1e-4 abs or < 1e-3 relative (to that gradient's largest entry); float32 logits
< 1e-4 abs. Shapes: a tiny config, a tiny config with exact GELU and eps 1e-6, and the full
124M GPT-2 shape. Negative controls (each must FAIL the same check): a loader that drops a
separate, different output head; a numgpt model whose head does not feed its gradient back
into ``wte``; attention without the causal mask.

Every numgpt run happens on both op paths (``GPTConfig.kernels``: "fast" compiled kernels and
"reference" NumPy ops) against the same transformers run; rows are labelled with the path.

Measurements are made once per module (fixtures), asserted by the tests below, and written to
``docs/results/model_parity.md`` by the last test. The 124M tests are marked ``slow``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import numgpt  # noqa: E402
from numgpt.core import kernels, ops  # noqa: E402
from numgpt.core.tensor import Tensor, apply, no_grad  # noqa: E402

import results_table  # noqa: E402  (tests/results_table.py)

RESULTS = results_table.results_dir() / "model_parity.md"  # docs/results/ under --write-results

TINY = dict(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4)
TINY_GELU = dict(TINY, activation_function="gelu", layer_norm_epsilon=1e-6)
GPT2_124M = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)

PATHS = ("fast", "reference")
TOL = {"logits64": 1e-5, "loss64": 1e-6, "grad_abs": 1e-4, "grad_rel": 1e-3, "logits32": 1e-4}


@dataclass
class Row:
    config: str
    dtype: str
    quantity: str
    diff: float
    tol: str
    ok: bool
    control: bool = False  # a negative control: this row is expected to fail


# ------------------------------------------------------------------------ references

def make_hf(shape: dict, seed: int, **overrides):
    """A GPT2LMHeadModel, dropout off, eager attention, with random non-trivial weights."""
    config = transformers.GPT2Config(**{**shape, **overrides}, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, attn_implementation="eager",
                                     bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)  # HF's initialiser draws from torch's global generator
    hf = transformers.GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if ".ln_" in name or "ln_f" in name:  # gains around 1, biases around 0
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return hf


def hf_run(hf, idx: np.ndarray, targets: np.ndarray, grads: bool = True) -> dict:
    """HF logits (B, T, V), mean cross-entropy over all positions, and parameter grads."""
    hf.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grads):
        logits = hf(torch.tensor(idx)).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 torch.tensor(targets).reshape(-1))
        if grads:
            loss.backward()
    out = {"logits": logits.detach().numpy(), "loss": float(loss.detach())}
    if grads:
        out["grads"] = {n.removeprefix("transformer."): p.grad.numpy()
                        for n, p in hf.named_parameters()}  # lm_head is wte: listed once
    return out


def numgpt_run(model, idx: np.ndarray, targets: np.ndarray, grads: bool = True) -> dict:
    model.zero_grad()
    if not grads:
        with no_grad():
            logits, loss = model(idx, targets)
        return {"logits": logits.data, "loss": float(loss.data)}
    logits, loss = model(idx, targets)
    loss.backward()
    return {"logits": logits.data, "loss": float(loss.data),
            "grads": {n: p.grad for n, p in model.parameters().items()}}


def tokens(vocab: int, B: int, T: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, (B, T)), rng.integers(0, vocab, (B, T))


# ------------------------------------------------------------------------- the check

def compare(label: str, dtype: str, ref: dict, got: dict, control: bool = False) -> list[Row]:
    """The parity check: one row per gated quantity."""
    rows = []
    d = float(np.max(np.abs(got["logits"] - ref["logits"])))
    if dtype == "float32":
        return [Row(label, dtype, "logits", d, "< 1e-4 abs", d < TOL["logits32"], control)]
    rows.append(Row(label, dtype, "logits", d, "< 1e-5 abs", d < TOL["logits64"], control))
    d = abs(got["loss"] - ref["loss"])
    rows.append(Row(label, dtype, "loss", d, "< 1e-6 abs", d < TOL["loss64"], control))
    if "grads" in ref:
        assert set(ref["grads"]) == set(got["grads"]), "parameter names differ from HF's"
        rows.append(_grad_row(label, dtype, ref["grads"], got["grads"], control))
    return rows


def _grad_row(label: str, dtype: str, ref: dict, got: dict, control: bool) -> Row:
    worst_abs, worst_rel, worst_name, ok = 0.0, 0.0, "", True
    for name, r in ref.items():
        diff = float(np.max(np.abs(got[name] - r)))
        rel = diff / max(float(np.max(np.abs(r))), 1e-300)
        ok &= diff < TOL["grad_abs"] or rel < TOL["grad_rel"]
        if diff >= worst_abs:
            worst_abs, worst_rel, worst_name = diff, rel, name
    return Row(label, dtype, f"grad of all {len(ref)} params (worst `{worst_name}`, rel {worst_rel:.1e})",
               worst_abs, "< 1e-4 abs or < 1e-3 rel", ok, control)


def passes(rows: list[Row]) -> bool:
    return all(r.ok for r in rows)


# -------------------------------------------------------------------- measurements

def _load(folder: Path, path: str, dtype: str | None = None):
    model = numgpt.load(folder, dtype=dtype) if dtype else numgpt.load(folder)
    model.set_kernels(path)
    return model


def _positive(shape: dict, label: str, folder: Path, B: int, T: int, seed: int) -> list[Row]:
    """float32 logits, then float64 logits/loss/every gradient, for one HF model, each numgpt
    run on both op paths against the one transformers run."""
    hf = make_hf(shape, seed)
    hf.save_pretrained(folder)
    idx, targets = tokens(shape["vocab_size"], B, T, seed)
    ref32 = hf_run(hf, idx, targets, grads=False)
    rows = []
    for path in PATHS:
        rows += compare(f"{label} [{path}]", "float32", ref32,
                        numgpt_run(_load(folder, path), idx, targets, grads=False))
    hf.double()
    ref64 = hf_run(hf, idx, targets)
    for path in PATHS:
        rows += compare(f"{label} [{path}]", "float64", ref64,
                        numgpt_run(_load(folder, path, "float64"), idx, targets))
    return rows


def _control_untied_head(folder: Path) -> list[Row]:
    """HF with a separate head = wte + noise; numgpt loaded with only the (tied) wte."""
    hf = make_hf(TINY, 11)
    hf.save_pretrained(folder)  # tied: numgpt loads this
    hf.config.tie_word_embeddings = False
    hf.lm_head.weight = torch.nn.Parameter(hf.transformer.wte.weight.detach().clone()
                                           + 0.02 * torch.randn(hf.lm_head.weight.shape))
    hf.double()
    idx, targets = tokens(TINY["vocab_size"], 2, 16, 11)
    ref = hf_run(hf, idx, targets, grads=False)
    return [r for path in PATHS for r in compare(
        f"tiny, HF head untied (+N(0,0.02)) [{path}]", "float64", ref,
        numgpt_run(_load(folder, path, "float64"), idx, targets, grads=False), control=True)]


def _control_head_not_tied_in_numgpt(folder: Path) -> list[Row]:
    """numgpt's head reads a frozen copy of wte: same logits, but wte misses the head gradient."""
    hf = make_hf(TINY, 12)
    hf.save_pretrained(folder)
    hf.double()
    idx, targets = tokens(TINY["vocab_size"], 2, 16, 12)
    ref = hf_run(hf, idx, targets)
    rows = []
    for path in PATHS:
        model = _load(folder, path, "float64")
        frozen = Tensor(model.wte.weight.data.copy())
        model.head = lambda x, model=model, frozen=frozen: apply(ops.tied_head, model.ln_f(x), frozen)
        rows += compare(f"tiny, numgpt head on a copy of wte [{path}]", "float64", ref,
                        numgpt_run(model, idx, targets), control=True)
    return rows


def _unmasked_training_entry(qkv, *, n_head, block=128):
    """Attention from qkv (B, T, 3C) with every key visible (no causal mask), forward only."""
    q, k, v = ops.split_heads(qkv, n_head)  # (B, nh, T, hs) each
    p, _ = ops.softmax(ops.attention_scores(q, k)[0])  # (B, nh, T, T)
    return ops.merge_heads(p @ v), None


def _unmasked_inference_entry(q, k, v, *, key_lengths=None, block=128):
    """``attention_inference`` with every key visible (no causal mask): (B, nh, Tq, hs)."""
    p, _ = ops.softmax(ops.attention_scores(q, k)[0])  # (B, nh, Tq, Tk)
    return p @ v


def _control_no_causal_mask(folder: Path) -> list[Row]:
    """The attention kernel of each path replaced by one without the causal mask:
    ``ops.attention`` (inside ``ops.attention_training``), or ``kernels.attention_training``
    when the fast path runs that kernel; and the inference entry that the forward without a
    graph runs (``attention_inference`` of the path)."""
    hf = make_hf(TINY, 13)
    hf.save_pretrained(folder)
    hf.double()

    def unmasked(q, k, v, key_lengths=None):  # (B, nh, T, hs) each -> (B, nh, T, hs)
        p, _ = ops.softmax(ops.attention_scores(q, k)[0])  # (B, nh, T, T), every key visible
        return p @ v, None

    idx, targets = tokens(TINY["vocab_size"], 2, 16, 13)
    ref = hf_run(hf, idx, targets, grads=False)
    rows = []
    for path in PATHS:
        model = _load(folder, path, "float64")
        with pytest.MonkeyPatch.context() as mp:
            if path == "fast" and "attention_training" in kernels.FAST_OPS:
                mp.setattr(kernels, "attention_training", _unmasked_training_entry)
            else:  # the path runs ops.attention_training, whose kernel is ops.attention
                mp.setattr(ops, "attention", unmasked)
            mp.setattr(kernels if path == "fast" else ops, "attention_inference", _unmasked_inference_entry)
            got = numgpt_run(model, idx, targets, grads=False)
        rows += compare(f"tiny, causal mask removed [{path}]", "float64", ref, got, control=True)
    return rows


def write_table(rows: list[Row]) -> None:
    lines = ["# Model parity: numgpt vs transformers.GPT2LMHeadModel", "",
             "Generated by `tests/test_model_parity.py`; do not edit by hand. Random weights "
             "(HF's GPT-2 init; LayerNorm gains 1+N(0,0.1), LayerNorm and linear biases random) "
             "saved with `save_pretrained`, loaded with `numgpt.load`; eager attention, dropout "
             "off; loss is the mean cross-entropy over every position (torch's `cross_entropy` "
             "on HF's logits). Shapes: tiny = vocab 97, ctx 32, C 32, 2 layers, 4 heads, B=2, "
             "T=16; tiny-gelu = tiny with exact GELU and eps 1e-6; 124M = vocab 50257, ctx "
             "1024, C 768, 12 layers, 12 heads, B=2, T=12. Negative controls are deliberately "
             "broken models: the check must FAIL on them.", "",
             "| config | dtype | quantity | max abs diff | tolerance | pass |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        verdict = "yes" if r.ok else "no"
        if r.control:
            verdict += " (negative control)"
        lines.append(f"| {r.config} | {r.dtype} | {r.quantity} | {r.diff:.3e} | {r.tol} | {verdict} |")
    controls = {}
    for r in rows:
        if r.control:
            controls[r.config] = controls.get(r.config, True) and r.ok
    lines += ["", "Negative controls: " + "; ".join(
        f"{name}: {'check FAILED as it must' if not ok else 'check PASSED: the gate is blind'}"
        for name, ok in controls.items()) + "."]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, list[Row]]:
    """The tiny shapes and the three negative controls (a few seconds)."""
    tmp = tmp_path_factory.mktemp("parity")
    return {"tiny": _positive(TINY, "tiny", tmp / "tiny", B=2, T=16, seed=0),
            "tiny-gelu": _positive(TINY_GELU, "tiny-gelu", tmp / "tiny_gelu", B=2, T=16, seed=1),
            "untied": _control_untied_head(tmp / "untied"),
            "frozen_head": _control_head_not_tied_in_numgpt(tmp / "frozen"),
            "no_mask": _control_no_causal_mask(tmp / "nomask")}


@pytest.fixture(scope="module")
def results_124m(tmp_path_factory) -> list[Row]:
    """The full GPT-2 124M shape: about 2 GB of float64 parameters and gradients per side."""
    return _positive(GPT2_124M, "124M", tmp_path_factory.mktemp("parity124m") / "gpt2", B=2, T=12, seed=2)


# ----------------------------------------------------------------------------- tests

def _failures(rows: list[Row]) -> list[str]:
    return [f"{r.config} {r.dtype} {r.quantity}: {r.diff:.3e} (tol {r.tol})" for r in rows if not r.ok]


@pytest.mark.parametrize("config", ["tiny", "tiny-gelu"])
def test_tiny_model_matches_transformers_float32_and_float64_with_every_gradient(results, config):
    rows = results[config]
    per_path64 = [("float64", "logits"), ("float64", "loss"), ("float64", "grad")]
    assert [(r.dtype, r.quantity.split()[0]) for r in rows] == \
        [("float32", "logits")] * len(PATHS) + per_path64 * len(PATHS)
    assert {r.config for r in rows} == {f"{config} [{path}]" for path in PATHS}
    assert passes(rows), _failures(rows)


@pytest.mark.slow
def test_gpt2_124m_shape_matches_transformers_float32_and_float64_with_every_gradient(results_124m):
    rows = results_124m
    assert "all 148 params" in rows[-1].quantity  # 12 blocks x 12 tensors + wte, wpe, ln_f x2
    assert passes(rows), _failures(rows)


def _by_path(rows: list[Row]) -> dict[str, list[Row]]:
    return {path: [r for r in rows if r.config.endswith(f"[{path}]")] for path in PATHS}


def test_parity_check_fails_when_the_output_head_is_not_tied_to_wte(results):
    for rows in _by_path(results["untied"]).values():
        assert not passes(rows)
        assert not rows[0].ok  # the logits themselves differ


def test_parity_check_fails_when_the_head_gradient_does_not_reach_wte(results):
    for path_rows in _by_path(results["frozen_head"]).values():
        rows = {r.quantity.split()[0]: r for r in path_rows}
        assert rows["logits"].ok and rows["loss"].ok  # the forward pass cannot see it ...
        assert not rows["grad"].ok and "`wte.weight`" in rows["grad"].quantity  # ... the gradient does


def test_parity_check_fails_when_attention_sees_the_future(results):
    for rows in _by_path(results["no_mask"]).values():
        assert len(rows) and not passes(rows)
        assert not rows[0].ok


@pytest.mark.slow
def test_results_table_is_written_with_every_row(results, results_124m):
    groups = ["tiny", "tiny-gelu", "124M", "untied", "frozen_head", "no_mask"]
    rows = [r for g in groups for r in (results_124m if g == "124M" else results[g])]
    write_table(rows)
    text = RESULTS.read_text()
    n_rows = len(rows)
    assert text.count("\n| ") == n_rows + 1  # header + one line per measured row
    assert "check PASSED: the gate is blind" not in text
