"""q8_0 weights (numgpt/core/quant.py): the format, the kernels, and the quality gates.

1. Quantization error: every value within half its block's scale (random and trained weights).
2. Kernels: each quantized matmul (batch-1, batched, prefill tiles) equals the float64
   product with the dequantized weights to float32 rounding; a kernel that reads the
   wrong block's scale fails the same check (negative control).
3. Model: a byte-level GPT trained here on tinyshakespeare for a few seconds, quantized:
   held-out perplexity within 1% of float32, greedy tokens agreeing on >= 95% of 20 prompts
   x 32 tokens; kernels that drop the scale or use the wrong block fail the perplexity gate.
   The figures go to docs/results/quant_quality.md.
4. Checkpoints, the CLI, training's refusal, and the peak memory of a q8_0 process.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import numgpt
from numgpt.core import quant
from numgpt.core.model import GPT, GPTConfig
from numgpt.core.tensor import no_grad
from numgpt.errors import ConfigError, NumGPTError
from numgpt.infer.evaluate import perplexity

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results" / "quant_quality.md"
U32 = 2.0 ** -24  # float32 unit roundoff


# --------------------------------------------------------------------------- helpers

def _block_errors(w: np.ndarray, q: quant.Q8Matrix) -> tuple[np.ndarray, np.ndarray]:
    """Max abs error of each block (float64) and half its scale step: both (N, K/32)."""
    N, K = w.shape
    err = np.abs(q.dequantize() - w.astype(np.float64)).reshape(N, K // 32, 32).max(axis=-1)
    return err, q.scales.astype(np.float64) / 2


def _float32_bound(x: np.ndarray, q: quant.Q8Matrix) -> np.ndarray:
    """Error bound of a float32 dot product of length K: (K + 2) u sum_k |x_k W_nk|.

    Recursive summation in any order (LLVM's vector lanes, BLAS's blocking) is within
    K u of the exact sum of |terms|; +2 for rounding each product and the block scale."""
    K = q.shape[1]
    return (K + 2) * U32 * (np.abs(x.astype(np.float64)) @ np.abs(q.dequantize()).T)


def _check_matmul(x: np.ndarray, q: quant.Q8Matrix, got: np.ndarray) -> float:
    """Largest error / bound over all outputs (<= 1 passes)."""
    exact = x.astype(np.float64) @ q.dequantize().T  # the float64 product
    return float(np.max(np.abs(got - exact) / (_float32_bound(x, q) + 1e-300)))


def _wrong_block_matmul(x, w):
    """Negative control: each block scaled by its neighbour's scale (a misindexed kernel)."""
    shifted = quant.Q8Matrix(w.qs, np.roll(w.scales, 1, axis=1))
    return (x.reshape(-1, w.shape[1]) @ shifted.dequantize(np.float32).T).reshape(*x.shape[:-1], -1)


def _no_scale_matmul(x, w):
    """Negative control: the int8 codes used as if they were the weights (scale dropped)."""
    return (x.reshape(-1, w.shape[1]) @ w.qs.astype(np.float32).T).reshape(*x.shape[:-1], -1)


# --------------------------------------------------------------- 1. quantization error

@pytest.mark.parametrize("kind", ["normal", "heavy_tails", "tiny", "with_zero_blocks", "huge"])
def test_every_block_error_is_at_most_half_its_scale_step_on_random_weights(kind):
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (67, 96))
    if kind == "heavy_tails":
        w = rng.standard_t(2, (67, 96)) * 0.02
    elif kind == "tiny":  # scales in float16's subnormal range
        w = w * 1e-5
    elif kind == "with_zero_blocks":
        w[::3, 32:64] = 0.0
    elif kind == "huge":
        w = w * 1e5
    w = w.astype(np.float32)
    q = quant.quantize_q8_0(w)
    err, half_step = _block_errors(w, q)
    assert np.all(err <= half_step), f"worst block error/half-step {np.max(err / (half_step + 1e-300))}"
    assert q.qs.dtype == np.int8 and np.abs(q.qs.astype(int)).max() <= 127
    assert np.array_equal(q.scales.astype(np.float16).astype(np.float32), q.scales)  # float16 values
    if kind == "with_zero_blocks":
        assert np.all(q.scales[::3, 1] == 0) and np.all(q.qs[::3, 32:64] == 0)


def test_quantizing_refuses_widths_that_are_not_whole_blocks():
    with pytest.raises(ConfigError, match="multiple of 32"):
        quant.quantize_q8_0(np.zeros((4, 40), np.float32))
    with pytest.raises(ConfigError, match="n_embd"):
        quant.quantize_model(GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=48)))


def test_the_error_check_catches_a_quantizer_that_truncates():
    """Negative control for the bound: truncating instead of rounding breaks it."""
    w = np.random.default_rng(1).normal(0, 0.02, (8, 64)).astype(np.float32)
    q = quant.quantize_q8_0(w)
    d = np.repeat(q.scales, 32, axis=1).astype(np.float64)
    truncated = quant.Q8Matrix(np.trunc(w / np.where(d > 0, d, 1)).astype(np.int8), q.scales)
    err, half_step = _block_errors(w, truncated)
    assert np.any(err > half_step)


# ------------------------------------------------------------------------ 2. kernels

@pytest.mark.parametrize("M", [1, 2, 5, 16, 17, 70])  # direct kernel up to 16 rows, tiles above
@pytest.mark.parametrize("N", [64, 67, 1030])  # 67, 1030: a tail of 3 and 2 rows after the groups of 4
def test_quantized_matmul_equals_the_float64_product_to_float32_rounding(M, N, monkeypatch):
    rng = np.random.default_rng(M * 1000 + N)
    K = 96 if N != 1030 else 1024
    q = quant.quantize_q8_0(rng.normal(0, 0.02, (N, K)).astype(np.float32))
    monkeypatch.setattr(quant, "TILE_ELEMENTS", 40 * K)  # several tiles and a partial one
    x = rng.standard_normal((M, K)).astype(np.float32)
    ratio = _check_matmul(x, q, quant.matmul(x, q))
    assert ratio <= 1.0, f"error is {ratio:.3g} x the float32 bound"


def test_matmul_keeps_leading_axes_and_adds_the_bias():
    rng = np.random.default_rng(3)
    q = quant.quantize_q8_0(rng.normal(0, 0.02, (40, 64)).astype(np.float32))
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    b = rng.standard_normal(40).astype(np.float32)
    y = quant.linear(x, q, b)
    assert y.shape == (2, 3, 40) and y.dtype == np.float32
    np.testing.assert_allclose(y, (x @ q.dequantize(np.float32).T) + b, rtol=1e-5, atol=1e-6)


def test_the_matmul_check_fails_a_kernel_that_uses_the_wrong_block():
    rng = np.random.default_rng(4)
    q = quant.quantize_q8_0(rng.normal(0, 0.02, (64, 128)).astype(np.float32))
    x = rng.standard_normal((1, 128)).astype(np.float32)
    assert _check_matmul(x, q, _wrong_block_matmul(x, q)) > 1.0
    assert _check_matmul(x, q, _no_scale_matmul(x, q)) > 1.0


def test_embedding_rows_are_exactly_the_dequantized_rows():
    rng = np.random.default_rng(5)
    q = quant.quantize_q8_0(rng.normal(0, 0.02, (50, 64)).astype(np.float32))
    ids = np.array([[3, 3, 49], [0, 7, 1]])
    rows = quant.embedding(q, ids)
    assert rows.shape == (2, 3, 64) and rows.dtype == np.float32
    assert np.array_equal(rows, q.dequantize(np.float32)[ids])


# ------------------------------------------------------------- 3. a trained model

TINY = dict(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=64, activation="gelu_tanh")


@pytest.fixture(scope="session")
def shakespeare_model(shakespeare_path):
    """A byte-level GPT trained for ~300 AdamW steps on the first 90% of tinyshakespeare
    (a few seconds), and the last 10% as held-out bytes."""
    from numgpt.io.tokenizer import ByteTokenizer
    from numgpt.train.optim import AdamW

    data = np.frombuffer(shakespeare_path.read_bytes(), dtype=np.uint8).astype(np.int64)
    split = int(0.9 * len(data))
    train, held_out = data[:split], data[split:]
    model = GPT(GPTConfig(**TINY), seed=0)
    model.tokenizer = ByteTokenizer()
    opt = AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.99), weight_decay=0.0)
    rng = np.random.default_rng(0)
    T, B = TINY["block_size"], 16
    started = time.perf_counter()
    for _ in range(300):
        starts = rng.integers(0, len(train) - T - 1, B)
        x = np.stack([train[s:s + T] for s in starts])  # (B, T)
        y = np.stack([train[s + 1:s + T + 1] for s in starts])
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        opt.step(lr=3e-3)
    return model, held_out, float(loss.data), time.perf_counter() - started


def _quantized_copy(model):
    from numgpt.io import checkpoint  # noqa: F401  (imported for its side effects: none)

    clone = GPT(model.config.__class__.from_dict(model.config.to_dict()), seed=None)
    for name, p in model.parameters().items():
        clone.parameters()[name].data[...] = p.data
    clone.tokenizer = model.tokenizer
    return quant.quantize_model(clone)


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    cache = model.new_cache(1, len(prompt) + n)
    logits = model.forward_cached(np.array([prompt]), cache)
    out = []
    for _ in range(n):
        tok = int(np.argmax(logits[0]))
        out.append(tok)
        logits = model.forward_cached(np.array([[tok]]), cache)
    return out


PROMPTS = ["ROMEO:", "First Citizen:\n", "KING HENRY", "What is ", "O, ", "JULIET:\nMy ",
           "The king ", "I will ", "Thou art ", "And so ", "MENENIUS:\n", "Good morrow",
           "He that ", "Come, ", "My lord, ", "Why, ", "Here is ", "Now ", "Let me ", "Sir, "]
N_NEW = 32
HELD_OUT_BYTES = 4096


def _held_out_ppl(model, held_out) -> float:
    return perplexity(model, held_out[:HELD_OUT_BYTES], progress=False)["perplexity"]


@pytest.fixture(scope="session")
def quality(shakespeare_model):
    """Perplexity and greedy agreement of q8_0 vs float32 (the figures of the gate)."""
    model, held_out, loss, seconds = shakespeare_model
    q8 = _quantized_copy(model)
    tok = model.tokenizer
    agree = total = 0
    prompts_identical = 0
    for p in PROMPTS:
        ids = tok.encode(p)
        a, b = _greedy(model, ids, N_NEW), _greedy(q8, ids, N_NEW)
        agree += sum(x == y for x, y in zip(a, b))
        total += N_NEW
        prompts_identical += a == b
    return dict(model=model, q8=q8, held_out=held_out, train_loss=loss, train_seconds=seconds,
                ppl_f32=_held_out_ppl(model, held_out), ppl_q8=_held_out_ppl(q8, held_out),
                agree=agree, total=total, prompts_identical=prompts_identical)


def test_trained_weights_meet_the_error_bound(shakespeare_model):
    model = shakespeare_model[0]
    for name, p in model.parameters().items():
        if p.data.ndim == 2 and not name.startswith("wpe"):
            w = p.data if name.startswith("wte") else p.data.T  # (out, in)
            err, half_step = _block_errors(w, quant.quantize_q8_0(w))
            assert np.all(err <= half_step), name


def test_q8_0_perplexity_is_within_one_percent_of_float32(quality):
    rel = quality["ppl_q8"] / quality["ppl_f32"] - 1
    assert quality["ppl_f32"] < 8.0, "the model did not learn; the gate would mean nothing"
    assert abs(rel) <= 0.01, f"q8_0 {quality['ppl_q8']:.4f} vs float32 {quality['ppl_f32']:.4f}"


def test_q8_0_greedy_tokens_agree_with_float32_on_95_percent(quality):
    assert quality["agree"] / quality["total"] >= 0.95, f"{quality['agree']}/{quality['total']}"


@pytest.mark.parametrize("broken", [_no_scale_matmul, _wrong_block_matmul])
def test_a_broken_kernel_fails_the_perplexity_gate(quality, broken, monkeypatch):
    monkeypatch.setattr(quant, "matmul", broken)
    ppl = _held_out_ppl(quality["q8"], quality["held_out"])
    assert not abs(ppl / quality["ppl_f32"] - 1) <= 0.01, f"broken kernel passed: {ppl:.4f}"
    quality.setdefault("controls", {})[broken.__name__] = ppl


def test_write_the_quality_table(quality):
    """docs/results/quant_quality.md, from the figures this run measured."""
    q = quality
    rel = q["ppl_q8"] / q["ppl_f32"] - 1
    controls = q.get("controls", {})
    wb = quant.weight_bytes(q["q8"])
    f32_bytes = sum(p.data.nbytes for p in q["model"].parameters().values())
    lines = [
        "# q8_0 quality: quantized vs float32 on a model trained here",
        "",
        "Written by `tests/test_quant.py` (do not edit by hand). Byte-level GPT "
        f"(n_layer={TINY['n_layer']}, n_head={TINY['n_head']}, n_embd={TINY['n_embd']}, "
        f"block_size={TINY['block_size']}) trained for 300 AdamW steps (batch 16) on the first 90% "
        f"of tinyshakespeare ({q['train_seconds']:.1f} s, last batch loss {q['train_loss']:.3f}); "
        f"held-out text: the first {HELD_OUT_BYTES} bytes of the last 10%.",
        "",
        "| measure | float32 | q8_0 | gate |",
        "|---|---|---|---|",
        f"| held-out perplexity | {q['ppl_f32']:.4f} | {q['ppl_q8']:.4f} ({rel:+.3%}) | within 1% |",
        f"| greedy tokens equal to float32 (20 prompts x {N_NEW}) | - | {q['agree']}/{q['total']} "
        f"({q['agree'] / q['total']:.2%}); {q['prompts_identical']}/20 prompts identical | >= 95% |",
        f"| weight bytes in memory | {f32_bytes:,} | {wb['total']:,} "
        f"({wb['total'] / f32_bytes:.1%}) | |",
        "",
        "Negative controls (must fail the perplexity gate):",
        "",
        "| broken kernel | perplexity | vs float32 |",
        "|---|---|---|",
    ]
    for name, ppl in sorted(controls.items()):
        lines.append(f"| {name.strip('_').replace('_', ' ')} | {ppl:.4f} | {ppl / q['ppl_f32'] - 1:+.1%} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    from numgpt.io.files import atomic_write

    atomic_write(RESULTS, "\n".join(lines) + "\n")
    assert RESULTS.read_text().startswith("# q8_0 quality")
