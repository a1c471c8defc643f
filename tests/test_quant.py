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
from numgpt.infer.evaluate import token_nll
from numgpt.io import checkpoint

REPO = Path(__file__).resolve().parents[1]
import results_table  # noqa: E402  (tests/results_table.py)

RESULTS = results_table.results_dir() / "quant_quality.md"  # docs/results/ under --write-results
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
    assert q.scales.dtype == np.float16  # GGML's scale type, in memory and on disk
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
    """A byte-level GPT trained for 300 AdamW steps on the first 90% of tinyshakespeare
    (~10 s on a quiet core), the last 10% as held-out bytes, and the held-out perplexity of
    the training bytes' unigram frequencies (what a model that learned nothing scores)."""
    from numgpt.io.tokenizer import ByteTokenizer

    data = np.frombuffer(shakespeare_path.read_bytes(), dtype=np.uint8).astype(np.int64)
    split = int(0.9 * len(data))
    train, held_out = data[:split], data[split:]
    model = GPT(GPTConfig(**TINY), seed=0)
    model.tokenizer = ByteTokenizer()
    started = time.perf_counter()
    loss = _train_adamw(model, train, lr=3e-3, batch=16, steps=300)
    seconds = time.perf_counter() - started
    freq = (np.bincount(train, minlength=256) + 1) / (len(train) + 256)  # add-one unigram
    unigram = float(np.exp(-np.log(freq[held_out[:HELD_OUT_BYTES]]).mean()))
    return model, held_out, loss, seconds, unigram


def _train_adamw(model, train: np.ndarray, *, lr: float, batch: int, steps: int) -> float:
    """``steps`` AdamW steps (betas 0.9, 0.99, no decay, constant lr) on random windows of
    ``train`` (seeded: the same model every run); returns the last batch's loss."""
    from numgpt.train.optim import AdamW

    opt = AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    rng = np.random.default_rng(0)
    T = model.config.block_size
    for _ in range(steps):
        starts = rng.integers(0, len(train) - T - 1, batch)
        x = np.stack([train[s:s + T] for s in starts])  # (B, T)
        y = np.stack([train[s + 1:s + T + 1] for s in starts])
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        opt.step(lr=lr)
    return float(loss.data)


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
    """exp(mean NLL) of the held-out bytes (inf, not an OverflowError, for a broken model)."""
    nll = token_nll(model, held_out[:HELD_OUT_BYTES])
    with np.errstate(over="ignore"):
        return float(np.exp(nll.mean()))


@pytest.fixture(scope="session")
def quality(shakespeare_model):
    """Perplexity and greedy agreement of q8_0 vs float32 (the figures of the gate)."""
    model, held_out, loss, seconds, unigram = shakespeare_model
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
                ppl_unigram=unigram,
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
    assert quality["ppl_f32"] < quality["ppl_unigram"] / 2, "the model did not learn; the gate would mean nothing"
    assert abs(rel) <= 0.01, f"q8_0 {quality['ppl_q8']:.4f} vs float32 {quality['ppl_f32']:.4f}"


def test_q8_0_greedy_tokens_agree_with_float32_on_95_percent(quality):
    assert quality["agree"] / quality["total"] >= 0.95, f"{quality['agree']}/{quality['total']}"


@pytest.mark.parametrize("broken", [_no_scale_matmul, _wrong_block_matmul])
def test_a_broken_kernel_fails_the_perplexity_gate(quality, broken, monkeypatch):
    monkeypatch.setattr(quant, "matmul", broken)
    ppl = _held_out_ppl(quality["q8"], quality["held_out"])
    assert not abs(ppl / quality["ppl_f32"] - 1) <= 0.01, f"broken kernel passed: {ppl:.4f}"
    quality.setdefault("controls", {})[broken.__name__] = ppl


# The 12-point trace, quantized vs float32, with tolerances derived from the q8_0 error model.
#
# One q8_0 weight's error is uniform in [-d/2, d/2] with d = max|w| / 127 over its block:
# RMS d / sqrt(12). For Gaussian-like blocks of 32, max|w| ~ 2.5 sigma_w, so the RMS error
# is EPS_Q = 2.5 / (127 sqrt(12)) = 0.57% of sigma_w. A dot product of K terms with independent
# errors has an error of EPS_Q relative to its own RMS size (both grow as sqrt(K)), and the
# errors of n quantized matrices upstream add in quadrature: sqrt(n) EPS_Q. The tolerance of
# a checkpoint is SIGMAS (6) times that, times the RMS of the float32 values there: the max
# over thousands of near-Gaussian errors stays below ~5 sigma. Upstream matrices (block 0,
# the embedding counts as one): ln_1 1, q/k/v and cache 2, scores 2 (q and k), attention
# output 3, MLP and block output 5, logits 4 L + 2 (every block and the head). Probabilities
# move by at most half the largest logit change (softmax is 1/2-Lipschitz in the max norm
# for each output: |dp_i| <= p_i (1 - p_i) |dz|_inf * 2 <= |dz|_inf / 2).
EPS_Q = 2.5 / (127 * math.sqrt(12))
SIGMAS = 6.0


def _upstream(n_layer: int) -> dict[str, int]:
    logits = 4 * n_layer + 2
    return {"01_ln1": 1, "02_q": 2, "02_k": 2, "02_v": 2, "03_cache_k": 2, "03_cache_v": 2,
            "04_scores": 2, "05_attn_out": 3, "06_mlp_out": 5, "07_block_out": 5,
            "08_logits": logits, "09_last_logits": logits}


# The sub-layer outputs (5 attention, 6 MLP) are added to the residual stream, and their
# own RMS can be far below the errors they carry from their inputs (attention averages
# values that cancel); their errors are measured against the stream they perturb, the RMS
# of the block output (7).
_SCALE_OF = {"05_attn_out": "07_block_out", "06_mlp_out": "07_block_out"}


def _rms(a: dict, name: str, steps: int) -> float:
    from numgpt.verify.trace import step_key

    finite = [np.where(np.isfinite(a[step_key(s, name)]), a[step_key(s, name)], 0.0).astype(np.float64)
              for s in range(steps)]
    return math.sqrt(sum(float((f ** 2).sum()) for f in finite) / sum(f.size for f in finite))


def _trace_rows(a: dict, b: dict, n_layer: int, steps: int) -> list[tuple]:
    """(array, max abs diff, tolerance) per checkpoint array over the first ``steps`` steps."""
    from numgpt.verify.trace import step_key

    rows = []
    for name, n in _upstream(n_layer).items():
        keys = [step_key(s, name) for s in range(steps)]
        tol = SIGMAS * math.sqrt(n) * EPS_Q * _rms(a, _SCALE_OF.get(name, name), steps)
        with np.errstate(invalid="ignore"):  # masked scores: -inf on both sides
            diff = max(float(np.abs(np.where(np.isfinite(a[k]), a[k] - b[k], 0.0)).max()) for k in keys)
        rows.append((name, diff, tol))
    logit_row = rows[-1]
    diff = max(float(np.abs(a[step_key(s, "11_probs")] - b[step_key(s, "11_probs")]).max())
               for s in range(steps))
    rows.append(("11_probs", diff, logit_row[2] / 2))
    return rows


def _agreeing_steps(a: dict, b: dict) -> int:
    """Steps compared: up to and including the first differing argmax (after it the two
    runs feed different tokens, so differences say nothing about the arithmetic)."""
    ids_a, ids_b = a["gen/12_ids"], b["gen/12_ids"]
    differ = np.nonzero(ids_a != ids_b)[0]
    return int(differ[0]) + 1 if len(differ) else len(ids_a)


def test_trace_of_q8_0_against_float32_within_derived_tolerances(quality, monkeypatch):
    from numgpt.verify import trace

    model, q8 = quality["model"], quality["q8"]
    prompt = model.tokenizer.encode("ROMEO:\nWhat say")
    a, b = trace.record(model, prompt, 8), trace.record(q8, prompt, 8)
    steps = _agreeing_steps(a, b)
    rows = _trace_rows(a, b, model.config.n_layer, steps)
    bad = [(n, d, t) for n, d, t in rows if not d <= t]
    assert not bad, f"beyond the derived tolerance: {bad}"
    first = trace.first_failure(trace.compare(a, b))  # float32 tolerances: where q8_0 shows
    assert first is not None and first.checkpoint == 1  # the quantized wte rows enter at ln_1
    monkeypatch.setattr(quant, "matmul", _wrong_block_matmul)  # negative control
    broken = _trace_rows(a, trace.record(q8, prompt, 8), model.config.n_layer, 1)
    assert any(not d <= t for n, d, t in broken if n.startswith("02_")), broken
    quality["trace"] = dict(rows=rows, steps=steps, first=first.checkpoint, broken=broken)


# ------------------------------------------- 3b. 8-bit activations (q8_0 x q8_0), both vocabularies
#
# With ``quant.set_activations(model, "q8_0")`` every decode-sized matmul (<= STRIPS_MAX_M rows)
# quantizes its activations per 32-block too. Measured on the byte-level model above and on a
# GPT-2-vocabulary model trained here, against float32 and beside weights-only q8_0, over
# windows of block_size tokens (so every matmul of the pass takes the 8-bit path): held-out
# perplexity, the mean KL divergence KL(float32 || quantized) per position, greedy agreement.
# Gates: perplexity within 1% of float32 (as weights-only), mean KL <= ACT_KL_GATE nats, greedy
# decisions >= 95% equal; a broken activation scale (doubled, or the previous row's) fails.

GPT2_TINY = dict(vocab_size=50257, block_size=32, n_layer=2, n_head=4, n_embd=32, activation="gelu_tanh")
GPT2_TEXT_CHARS = 200_000  # tinyshakespeare's first characters, GPT-2 BPE: ~61k tokens
GPT2_STEPS = 100
EVAL_TOKENS = 1024  # held-out tokens of the perplexity and KL measures (512 for the controls)
ACT_KL_GATE = 1e-3  # nats per position; measured ~1e-5 to 1e-4 (docs/results/quant_quality.md)
GPT2_PROMPTS = ["ROMEO:", "First Citizen:\n", "KING HENRY", "What is ", "O, my lord,",
                "JULIET:\nMy ", "The king ", "I will ", "Thou art ", "Good morrow"]


@pytest.fixture(scope="session")
def gpt2_vocab_model(shakespeare_path, gpt2_tokenizer_dir):
    """A GPT-2-vocabulary GPT (GPT2_TINY) trained GPT2_STEPS AdamW steps on the first 90% of
    tinyshakespeare's first GPT2_TEXT_CHARS characters (GPT-2 BPE); the rest held out; and
    the held-out perplexity of the training tokens' unigram frequencies."""
    from numgpt.io.tokenizer import load_tokenizer

    tok = load_tokenizer(str(gpt2_tokenizer_dir))
    ids = np.array(tok.encode(shakespeare_path.read_text()[:GPT2_TEXT_CHARS]), dtype=np.int64)
    split = int(0.9 * len(ids))
    train, held_out = ids[:split], ids[split:]
    model = GPT(GPTConfig(**GPT2_TINY), seed=0)
    model.tokenizer = tok
    _train_adamw(model, train, lr=1e-2, batch=8, steps=GPT2_STEPS)
    V = GPT2_TINY["vocab_size"]
    freq = (np.bincount(train, minlength=V) + 1) / (len(train) + V)
    unigram = float(np.exp(-np.log(freq[held_out[:EVAL_TOKENS]]).mean()))
    return model, held_out, unigram


def _log_probs(model, ids: np.ndarray) -> np.ndarray:
    """log softmax of the logits for ids (T,) -> (T, V) float64."""
    with no_grad():
        z = model(ids[None])[0].data[0].astype(np.float64)  # (T, V)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _versus_float(f32, models: dict, held_out: np.ndarray, tokens: int = EVAL_TOKENS) -> dict:
    """Held-out perplexity of f32 and each model, and each one's mean and max
    KL(f32 || model) per position, over consecutive windows of block_size tokens."""
    T = f32.config.block_size
    nll = {name: [] for name in ["float32", *models]}
    kl = {name: [] for name in models}
    for s in range(0, tokens - T, T):
        window, targets = held_out[s:s + T], held_out[s + 1:s + T + 1]
        ref = _log_probs(f32, window)  # (T, V)
        nll["float32"].append(-ref[np.arange(T), targets])
        for name, m in models.items():
            lp = _log_probs(m, window)
            nll[name].append(-lp[np.arange(T), targets])
            kl[name].append((np.exp(ref) * (ref - lp)).sum(axis=-1))  # (T,)
    with np.errstate(over="ignore"):
        out = {f"ppl_{k}": float(np.exp(np.concatenate(v).mean())) for k, v in nll.items()}
    for k, v in kl.items():
        out[f"kl_{k}"], out[f"kl_max_{k}"] = float(np.concatenate(v).mean()), float(np.concatenate(v).max())
    return out


def _agreement(f32, q, prompts: list[str], n: int) -> tuple[int, int, int]:
    """Greedy agreement with float32 over ``n`` new tokens per prompt, two ways: free-running
    (each model continues its own text, so one flipped near-tie changes every later token)
    and teacher-forced (q's argmax at each position of float32's own continuation: each
    decision counted once). Returns (free-running equal, teacher-forced equal, total)."""
    free = forced = total = 0
    for p in prompts:
        ids = f32.tokenizer.encode(p)
        a, b = _greedy(f32, ids, n), _greedy(q, ids, n)
        free += sum(x == y for x, y in zip(a, b))
        with no_grad():
            logits = q(np.array([ids + a[:-1]]))[0].data[0]  # (len(ids) + n - 1, V)
        forced += int((logits[len(ids) - 1:].argmax(axis=-1) == np.array(a)).sum())
        total += n
    return free, forced, total


def _doubled_activation_scale(x, w):
    """Negative control: every activation block's scale doubled (a kernel that drops a /2)."""
    return 2 * quant.matmul_q8_activations_reference(x.reshape(-1, w.shape[1]), w).reshape(*x.shape[:-1], -1)


def _wrong_activation_row(x, w):
    """Negative control: each row's activation blocks scaled by the previous row's scales
    (a kernel that indexes the scales of the wrong token). The wrong *block* is no control
    here: the GPT-2-vocabulary model's n_embd is one block."""
    xq, xd = quant.quantize_activations_reference(x.reshape(-1, w.shape[1]))
    return quant.q8_dot_reference(xq, np.roll(xd, 1, axis=0), w).reshape(*x.shape[:-1], -1)


@pytest.fixture(scope="session")
def activation_quality(quality, gpt2_vocab_model):
    """The figures of the 8-bit activation gates, for both models."""
    byte_f32 = quality["model"]
    gpt2_f32, gpt2_held, gpt2_unigram = gpt2_vocab_model
    rows = {}
    for name, f32, held, prompts, n in (
            ("byte-level", byte_f32, quality["held_out"], PROMPTS, N_NEW),
            ("GPT-2 vocabulary", gpt2_f32, gpt2_held, GPT2_PROMPTS, 16)):
        weights_only = _quantized_copy(f32)
        both = quant.set_activations(_quantized_copy(f32), "q8_0")
        r = _versus_float(f32, {"q8w": weights_only, "q8a": both}, held)
        r["agree_q8w"], r["forced_q8w"], r["total"] = _agreement(f32, weights_only, prompts, n)
        r["agree_q8a"], r["forced_q8a"], _ = _agreement(f32, both, prompts, n)
        r.update(f32=f32, both=both, held=held, prompts=len(prompts), n=n)
        rows[name] = r
    rows["byte-level"]["unigram"] = quality["ppl_unigram"]
    rows["GPT-2 vocabulary"]["unigram"] = gpt2_unigram
    quality["activations"] = rows
    return rows


@pytest.mark.parametrize("name", ["byte-level", "GPT-2 vocabulary"])
def test_8_bit_activations_keep_perplexity_within_one_percent_and_kl_small(activation_quality, name):
    r = activation_quality[name]
    assert r["ppl_float32"] < 0.75 * r["unigram"], "the model did not learn; the gate would mean nothing"
    assert abs(r["ppl_q8a"] / r["ppl_float32"] - 1) <= 0.01, r
    assert r["kl_q8a"] <= ACT_KL_GATE, r


@pytest.mark.parametrize("name", ["byte-level", "GPT-2 vocabulary"])
def test_8_bit_activations_agree_with_float32_greedy_decisions_on_95_percent(activation_quality, name):
    """Teacher-forced: along float32's greedy text, the 8-bit model picks the same next token
    at >= 95% of the positions (free-running agreement is in the table, not gated: one
    flipped near-tie early in a prompt changes all its later tokens)."""
    r = activation_quality[name]
    assert r["forced_q8a"] / r["total"] >= 0.95, f"{r['forced_q8a']}/{r['total']}"


@pytest.mark.parametrize("broken", [_doubled_activation_scale, _wrong_activation_row])
@pytest.mark.parametrize("name", ["byte-level", "GPT-2 vocabulary"])
def test_a_broken_activation_scale_fails_the_gates(activation_quality, name, broken, monkeypatch):
    r = activation_quality[name]
    monkeypatch.setattr(quant, "matmul_q8_activations", broken)
    got = _versus_float(r["f32"], {"broken": r["both"]}, r["held"], EVAL_TOKENS // 2)
    fails = (not abs(got["ppl_broken"] / got["ppl_float32"] - 1) <= 0.01) or not got["kl_broken"] <= ACT_KL_GATE
    assert fails, got
    r.setdefault("controls", {})[broken.__name__] = got


def _activation_lines(rows: dict) -> list[str]:
    """The 8-bit activations section of quant_quality.md."""
    g = GPT2_TINY
    lines = ["", "## 8-bit activations (q8_0 x q8_0)", "",
             "`numgpt quantize --activations q8_0` (or `quant.set_activations(model, \"q8_0\")`): "
             "each activation row is quantized per 32-block too and every block is an integer dot "
             "product (llama.cpp's q8_0 arithmetic), beside weights-only q8_0, both against float32. "
             f"Windows of block_size tokens, so every matmul of a pass takes the 8-bit path (it "
             f"applies up to {quant.STRIPS_MAX_M} rows); the first {EVAL_TOKENS} held-out tokens. "
             f"The byte-level model is the one above; the GPT-2-vocabulary model (n_layer="
             f"{g['n_layer']}, n_head={g['n_head']}, n_embd={g['n_embd']}, block_size="
             f"{g['block_size']}, vocab {g['vocab_size']}) is trained for {GPT2_STEPS} AdamW steps "
             f"(batch 8) on the first 90% of tinyshakespeare's first {GPT2_TEXT_CHARS:,} characters "
             "in GPT-2 BPE, the rest held out. KL is KL(float32 || quantized) per position, in nats.",
             "", "| model | measure | float32 | q8_0 weights | q8_0 weights + activations | gate |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        f = r["ppl_float32"]
        lines += [
            f"| {name} | held-out perplexity (unigram {r['unigram']:.2f}) | {f:.4f} | "
            f"{r['ppl_q8w']:.4f} ({r['ppl_q8w'] / f - 1:+.3%}) | {r['ppl_q8a']:.4f} "
            f"({r['ppl_q8a'] / f - 1:+.3%}) | within 1% |",
            f"| {name} | mean KL (max) | - | {r['kl_q8w']:.2e} ({r['kl_max_q8w']:.2e}) | "
            f"{r['kl_q8a']:.2e} ({r['kl_max_q8a']:.2e}) | mean <= {ACT_KL_GATE:g} |",
            f"| {name} | greedy decisions equal to float32's, teacher-forced ({r['prompts']} prompts "
            f"x {r['n']}) | - | {r['forced_q8w']}/{r['total']} | {r['forced_q8a']}/{r['total']} "
            f"({r['forced_q8a'] / r['total']:.2%}) | >= 95% |",
            f"| {name} | greedy tokens equal to float32, free-running | - | {r['agree_q8w']}/{r['total']} "
            f"| {r['agree_q8a']}/{r['total']} ({r['agree_q8a'] / r['total']:.2%}) | |"]
    lines += ["", f"Negative controls (must fail the perplexity or the KL gate; first "
              f"{EVAL_TOKENS // 2} held-out tokens):", "",
              "| model | broken activation kernel | perplexity | vs float32 | mean KL |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        for control, got in sorted(r.get("controls", {}).items()):
            lines.append(f"| {name} | {control.strip('_').replace('_', ' ')} | {got['ppl_broken']:.4f} | "
                         f"{got['ppl_broken'] / got['ppl_float32'] - 1:+.2%} | {got['kl_broken']:.3g} |")
    return lines


def test_write_the_quality_table(quality, activation_quality):
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
        f"held-out text: the first {HELD_OUT_BYTES} bytes of the last 10% (unigram byte "
        f"perplexity {q['ppl_unigram']:.2f}).",
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
    t = q.get("trace")
    if t:
        lines += ["", f"12-point trace, q8_0 vs float32 (prompt \"ROMEO:\\nWhat say\", {t['steps']} steps "
                  f"compared): with the float32-vs-float32 tolerances the first failure is checkpoint "
                  f"{t['first']} (the dequantized wte rows). Tolerance = {SIGMAS:g} x sqrt(quantized "
                  f"matrices upstream) x {EPS_Q:.4f} (RMS error of one q8_0 weight relative to its "
                  f"block's spread) x RMS of the float32 values (for the attention and MLP outputs: of "
                  f"the residual stream they are added to, checkpoint 7); probabilities: half the "
                  f"logits' tolerance (see tests/test_quant.py).", "",
                  "| array | max abs diff | derived tolerance | wrong-block kernel (step 0) |",
                  "|---|---|---|---|"]
        broken = {n: d for n, d, _ in t["broken"]}
        for name, d, tol in t["rows"]:
            lines.append(f"| {name} | {d:.3g} | {tol:.3g} | {broken.get(name, float('nan')):.3g} |")
    lines += _activation_lines(activation_quality)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    from numgpt.io.files import atomic_write

    atomic_write(RESULTS, "\n".join(lines) + "\n")
    assert RESULTS.read_text().startswith("# q8_0 quality")


# ----------------------------------------------------- 4. checkpoints, CLI, training, memory

SMALL = dict(vocab_size=256, block_size=32, n_layer=2, n_head=4, n_embd=64)


def _small_quantized():
    from numgpt.io.tokenizer import ByteTokenizer

    m = GPT(GPTConfig(**SMALL), seed=3)
    m.tokenizer = ByteTokenizer()
    return quant.quantize_model(m)


def _logits(model, ids=np.array([[1, 2, 3, 4, 200]])):
    with no_grad():
        return model(ids)[0].data


def test_a_quantized_checkpoint_round_trips_and_records_its_scheme(tmp_path):
    from safetensors import safe_open

    q = _small_quantized()
    prefix = checkpoint.save(q, tmp_path / "q8")
    doc = json.loads((tmp_path / "q8.json").read_text())
    assert doc["quantization"]["scheme"] == "q8_0"
    with safe_open(str(tmp_path / "q8.safetensors"), framework="numpy") as f:
        kinds = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert kinds["h.0.attn.c_attn.weight.qs"] == np.int8 and kinds["wte.weight.scales"] == np.float16
    assert "wte.weight" not in kinds and "h.0.mlp.c_fc.weight" not in kinds  # no float matrices
    back = numgpt.load(prefix)
    assert quant.scheme_of(back) == "q8_0"
    assert np.array_equal(back.h[1].mlp.c_proj.weight.qs, q.h[1].mlp.c_proj.weight.qs)
    assert np.array_equal(_logits(back), _logits(q))
    assert back.tokenizer is not None


def test_cli_quantize_then_info_and_generate(tmp_path, capsys):
    from numgpt import cli
    from numgpt.io.tokenizer import ByteTokenizer

    m = GPT(GPTConfig(**SMALL), seed=3)
    m.tokenizer = ByteTokenizer()
    checkpoint.save(m, tmp_path / "f32")
    assert cli.main(["quantize", str(tmp_path / "f32"), str(tmp_path / "q8")]) == 0
    capsys.readouterr()
    assert cli.main(["info", str(tmp_path / "q8")]) == 0
    out = capsys.readouterr().out
    assert "q8_0" in out and "bytes" in out
    assert cli.main(["generate", "--model", str(tmp_path / "q8"), "--prompt", "ab",
                     "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert cli.main(["quantize", str(tmp_path / "f32"), str(tmp_path / "x"), "--scheme", "q2"]) != 0


def test_training_refuses_a_quantized_model(tmp_path):
    from numgpt.train.config import TrainConfig

    prefix = checkpoint.save(_small_quantized(), tmp_path / "q8")
    with pytest.raises(ConfigError, match="quantized"):
        numgpt.train(TrainConfig(init=str(prefix), out=str(tmp_path / "run"), max_iters=1,
                                 plot=False, sample_tokens=0), progress=False)


_PEAK_CHILD = r"""
import json, sys
import numpy as np
import numgpt
def peak_kb():  # VmHWM: this process's peak RSS (ru_maxrss keeps the parent's across exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
from numgpt.core import quant
from numgpt.infer.sample import SamplingParams, generate
from numgpt.core.model import GPT, GPTConfig
tiny = quant.quantize_model(GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=32)))
generate(tiny, [1, 2], 2, SamplingParams(temperature=0))  # numba and every kernel (prefill too) loaded first
before = peak_kb()
model = numgpt.load(sys.argv[1])
generate(model, [1, 2, 3], 4, SamplingParams(temperature=0))
print(json.dumps((peak_kb() - before) * 1024))
"""


def test_a_q8_0_process_never_holds_the_float32_weights(tmp_path):
    """Peak RSS (VmHWM) a model adds to a process that already loaded NumPy, numba and the
    kernels: a q8_0 checkpoint's is at most 45% of the float32 weights' bytes (it holds 1.125
    bytes per weight); the float32 checkpoint's (the negative control: the measurement sees
    float32 weights) is at least their bytes."""
    m = GPT(GPTConfig(vocab_size=4096, block_size=64, n_layer=6, n_head=8, n_embd=256), seed=0)
    f32_bytes = sum(p.data.nbytes for p in m.parameters().values())
    checkpoint.save(m, tmp_path / "f32")
    checkpoint.save(quant.quantize_model(m), tmp_path / "q8")
    added = {}
    for kind in ("f32", "q8"):
        done = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(tmp_path / kind)],
                              capture_output=True, text=True, cwd=REPO, check=True)
        added[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    assert added["f32"] >= f32_bytes, added  # the measurement sees float32 weights
    assert added["q8"] <= 0.45 * f32_bytes, (added, f32_bytes)


def test_batched_decode_of_a_quantized_model_equals_one_sequence_at_a_time():
    """generate_batch (one forward_cached over several cache rows per step, as the server
    runs) gives each prompt the tokens generate gives it alone: the kernel's M > 1 path."""
    from numgpt.infer.sample import SamplingParams, generate, generate_batch

    q = _small_quantized()
    prompts = [[1, 2, 3], [200, 7], [9, 9, 9, 9, 9], [42]]
    greedy = SamplingParams(temperature=0)
    batched = generate_batch(q, prompts, 6, greedy, stop_at_eot=False)
    assert batched == [generate(q, p, 6, greedy, stop_at_eot=False) for p in prompts]


def test_bytes_per_parameter_matches_a_quantized_model_in_memory():
    """The arithmetic the loader's memory check uses equals what a quantized model holds."""
    q = _small_quantized()
    sizes = quant.weight_bytes(q)
    assert quant.bytes_per_parameter(q.config) * quant.parameter_count(q) == pytest.approx(
        sizes["total"], rel=1e-12)


def test_a_quantized_checkpoint_with_non_finite_scales_is_refused_unless_asked(tmp_path):
    """The float parts of a q8_0 file (block scales, biases, LayerNorms, wpe) get the same
    finite check as a float checkpoint; --skip-finite-check loads it anyway."""
    from safetensors.numpy import load_file, save_file

    prefix = checkpoint.save(_small_quantized(), tmp_path / "q8")
    weights = tmp_path / "q8.safetensors"
    from safetensors import safe_open

    with safe_open(str(weights), framework="numpy") as f:
        metadata = f.metadata()
    tensors = load_file(str(weights))
    tensors["h.0.mlp.c_fc.weight.scales"][0, 0] = np.float16(np.nan)
    save_file(tensors, str(weights), metadata=metadata)
    with pytest.raises(checkpoint.CheckpointError, match=r"'h\.0\.mlp\.c_fc\.weight\.scales'.*NaN"):
        numgpt.load(prefix)
    back = numgpt.load(prefix, check_finite=False)
    assert quant.is_quantized(back) and np.isnan(back.h[0].mlp.c_fc.weight.scales).sum() == 1


def test_a_quantized_checkpoint_too_big_for_memory_is_refused_before_allocation(tmp_path, monkeypatch):
    prefix = checkpoint.save(_small_quantized(), tmp_path / "q8")
    monkeypatch.setattr(checkpoint, "available_memory", lambda: 1000)
    with pytest.raises(checkpoint.CheckpointError, match="available"):
        numgpt.load(prefix)
