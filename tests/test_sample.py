"""Sampling and generation (rung 6 of the verification ladder).

Gates:
* greedy tokens equal ``transformers`` ``generate(do_sample=False)`` for 30 new tokens on
  random-weight models of the GPT-2 124M and medium shapes, saved with ``save_pretrained``
  and loaded with ``numgpt.load`` (results in ``docs/results/generate_parity.md``);
* top-k / top-p keep exactly the tokens and renormalised probabilities that
  ``TopKLogitsWarper`` / ``TopPLogitsWarper`` keep, on many random logits with ties;
* a chi-square test shows temperature sampling draws from the filtered softmax;
* seeds reproduce, batches equal single prompts, stop strings, end-of-text, ASCII-only,
  the context slide past block_size, and the ``numgpt generate`` CLI.
Each family has a negative control that must fail the same check.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import chisquare

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

import numgpt  # noqa: E402
from numgpt.cli import main  # noqa: E402
from numgpt.errors import InputError  # noqa: E402
from numgpt.core.model import GPT, GPTConfig  # noqa: E402
from numgpt.infer.sample import (ContextSlideWarning, SamplingParams, StopMatcher,  # noqa: E402
                           apply_temperature, ascii_mask, check_prompt, filter_logits,
                           generate, generate_batch, sample_rng, select_next, stream,
                           token_logprobs, top_k_filter, top_k_ids, top_p_filter)
from numgpt.io.tokenizer import ByteTokenizer, GPT2Tokenizer  # noqa: E402

import results_table  # noqa: E402  (tests/results_table.py)

RESULTS = results_table.results_dir() / "generate_parity.md"  # docs/results/ under --write-results
GREEDY = SamplingParams(temperature=0)


# --------------------------------------------------------------------------- helpers


def tiny_model(vocab=256, block=64, layers=2, heads=2, embd=32, seed=0, scale=4.0,
               dtype="float64") -> GPT:
    """A small numgpt GPT with weights scaled up from GPT-2 init so its outputs vary."""
    model = GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=layers, n_head=heads,
                          n_embd=embd, dtype=dtype), seed=seed)
    for name, p in model.parameters().items():
        if name.endswith("weight") and ".ln_" not in name and not name.startswith("ln_f"):
            p.data *= scale
    return model


def greedy_reference(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Uncached greedy decoding with the full forward (the reference path)."""
    ids = list(prompt)
    for _ in range(n):
        logits, _ = model.forward(np.asarray([ids]))
        ids.append(int(np.argmax(logits.data[0, -1])))
    return ids[len(prompt):]


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def gpt2_tok(gpt2_tokenizer_dir) -> GPT2Tokenizer:
    return GPT2Tokenizer.from_folder(gpt2_tokenizer_dir)


# ----------------------------------------------------------- greedy vs transformers

SHAPES = {"124M": dict(n_layer=12, n_head=12, n_embd=768),
          "medium": dict(n_layer=24, n_head=16, n_embd=1024)}
SEEDS = {"124M": 1, "medium": 6}  # weights whose argmax margins stay well above float32 noise
PROMPT = [15496, 13, 314, 1101]  # "Hello. I'm"
N_NEW = 30
INIT_SCALE = 0.05  # weight std: at GPT-2's 0.02 a random model repeats one token
_parity_rows: dict[str, str] = {}


def hf_greedy(shape: dict, folder: Path, seed: int):
    """Save a random GPT2LMHeadModel to ``folder``; return its greedy tokens and min margin."""
    config = transformers.GPT2Config(**shape, bos_token_id=None, eos_token_id=None)
    with torch.device("meta"):  # no init pass: we fill the weights below (3x faster than HF's)
        hf = transformers.GPT2LMHeadModel(config)
    hf = hf.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():  # GPT-2's init, with a wider normal
            if ".ln_" in name or "ln_f" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, INIT_SCALE, generator=gen)
    hf.tie_weights()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    hf.save_pretrained(folder)
    with torch.no_grad():
        out = hf.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=N_NEW,
                          pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    scores = torch.stack(out.scores)[:, 0]  # (N_NEW, V) logits of each step
    top2 = scores.topk(2, dim=-1).values
    return out.sequences[0, len(PROMPT):].tolist(), float((top2[:, 0] - top2[:, 1]).min())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SHAPES))
def test_greedy_tokens_equal_transformers_generate(name, tmp_path):
    expected, margin = hf_greedy(SHAPES[name], tmp_path, seed=SEEDS[name])
    model = numgpt.load(tmp_path)  # float32, as saved
    got, rows = {}, []
    for path in ("reference", "fast"):  # both op paths (GPTConfig.kernels); the control on fast
        model.set_kernels(path)
        got[path] = tokens = generate(model, PROMPT, N_NEW, GREEDY)
        rows.append(f"| {name} [{path}] | float32 | {N_NEW} | {len(set(expected))} | {margin:.2e} | "
                    f"{sum(a == b for a, b in zip(tokens, expected))}/{N_NEW} | "
                    f"{'PASS' if tokens == expected else 'FAIL'} |")
    if name == "124M":  # negative control: a slightly perturbed model must not match
        p = model.parameters()["h.0.mlp.c_fc.weight"]
        p.data += np.random.default_rng(0).normal(0, INIT_SCALE, p.data.shape).astype(p.data.dtype)
        bad = generate(model, PROMPT, 10, GREEDY)
        rows.append(f"| {name}, h.0.mlp.c_fc perturbed (control) | float32 | 10 | - | - | "
                    f"{sum(a == b for a, b in zip(bad, expected))}/10 | "
                    f"{'FAIL as required' if bad != expected[:10] else 'PASSED: check is blind'} |")
        assert bad != expected[:10]
    _parity_rows[name] = "\n".join(rows)
    write_atomic(RESULTS, "# Greedy generation vs transformers `generate(do_sample=False)`\n\n"
                 "Written by `tests/test_sample.py`. Random GPT-2 weights "
                 f"(normal std {INIT_SCALE}, unit LayerNorm, zero biases) saved with `save_pretrained`, loaded with "
                 f"`numgpt.load`; prompt {PROMPT}; min top-2 margin is over HF's step logits.\n\n"
                 "| shape | dtype | new tokens | distinct tokens | min top-2 margin | equal | result |\n"
                 "|---|---|---|---|---|---|---|\n" + "\n".join(_parity_rows[k] for k in sorted(_parity_rows)) + "\n")
    assert margin > 1e-3, "argmax margins too thin for a float32 comparison; use float64"
    assert len(set(expected)) > 1, "degenerate output: raise the init scale"
    assert got == {"reference": expected, "fast": expected}


def test_cached_greedy_equals_uncached_reference_and_stream():
    model = tiny_model()
    prompt = [5, 80, 13, 200]
    ref = greedy_reference(model, prompt, 20)
    assert len(set(ref)) > 3
    assert generate(model, prompt, 20, GREEDY) == ref
    assert list(stream(model, prompt, 20, GREEDY)) == ref
    assert generate(model, prompt, 0, GREEDY) == []


# --------------------------------------------------------------------- filters vs HF


def random_logits(rng: np.random.Generator, trial: int) -> np.ndarray:
    """(A, V) float32 logits; every other trial has heavy ties (values on a coarse grid)."""
    A, V = int(rng.integers(1, 4)), int(rng.integers(2, 70))
    x = rng.normal(0, 2, (A, V))
    if trial % 3 == 1:
        x = np.round(x)  # many ties
    elif trial % 3 == 2:
        x = rng.integers(0, 3, (A, V)).astype(float)  # only three distinct values
    return x.astype(np.float32)


def hf_warp(warper, logits: np.ndarray) -> np.ndarray:
    return warper(None, torch.tensor(logits)).numpy()


def assert_same_filter(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Same kept set, same kept values, same renormalised probabilities."""
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    kept = ~np.isneginf(theirs)
    np.testing.assert_array_equal(ours[kept], theirs[kept])
    p_ours = torch.softmax(torch.tensor(ours, dtype=torch.float64), -1).numpy()
    p_theirs = torch.softmax(torch.tensor(theirs, dtype=torch.float64), -1).numpy()
    np.testing.assert_allclose(p_ours, p_theirs, rtol=0, atol=1e-15)


def test_top_k_keeps_exactly_what_transformers_keeps():
    rng = np.random.default_rng(1)
    for trial in range(150):
        x = random_logits(rng, trial)
        k = int(rng.integers(1, x.shape[-1] + 3))
        assert_same_filter(top_k_filter(x, k), hf_warp(TopKLogitsWarper(k), x))
        np.testing.assert_array_equal(top_k_filter(x[0], k), top_k_filter(x, k)[0])  # (V,) too


def _stable_sort(original):
    def sort(x, *args, **kwargs):
        kwargs.pop("stable", None)
        return original(x, *args, stable=True, **kwargs)
    return sort


def test_top_p_keeps_exactly_what_transformers_keeps_including_ties(monkeypatch):
    """HF sorts with torch's default, unstable sort, so which of several tied tokens at the
    boundary it keeps is arbitrary. The count and the kept values never depend on that
    order; we check them against HF as is. With torch's sort made stable, HF keeps exactly
    numgpt's set (ties at the boundary: the higher ids survive)."""
    rng = np.random.default_rng(2)
    ps = [0.05, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0]
    cases = []
    for trial in range(150):
        x = random_logits(rng, trial)
        p = ps[trial % len(ps)] if trial % 2 else float(rng.uniform(0.01, 1.0))
        cases.append((x, p))
    for x, p in cases:  # order-free properties against HF as shipped
        ours, theirs = top_p_filter(x, p), hf_warp(TopPLogitsWarper(p), x)
        np.testing.assert_array_equal(np.isneginf(ours).sum(-1), np.isneginf(theirs).sum(-1))
        np.testing.assert_array_equal(np.sort(np.where(np.isneginf(ours), np.inf, ours), -1),
                                      np.sort(np.where(np.isneginf(theirs), np.inf, theirs), -1))
    monkeypatch.setattr(torch, "sort", _stable_sort(torch.sort))
    for x, p in cases:  # the exact set once the tie order is defined
        assert_same_filter(top_p_filter(x, p), hf_warp(TopPLogitsWarper(p), x))
    uniform = np.zeros((1, 4), np.float32)  # exact boundary: 0.25 + 0.25 == 1 - 0.5
    assert_same_filter(top_p_filter(uniform, 0.5), hf_warp(TopPLogitsWarper(0.5), uniform))


def test_top_p_without_ties_equals_transformers_as_shipped():
    rng = np.random.default_rng(12)
    for trial in range(100):
        x = rng.normal(0, 2, (2, int(rng.integers(2, 200)))).astype(np.float32)
        p = float(rng.uniform(0.01, 1.0))
        assert_same_filter(top_p_filter(x, p), hf_warp(TopPLogitsWarper(p), x))


def test_negative_controls_naive_top_k_and_top_p_disagree_with_transformers():
    rng = np.random.default_rng(3)
    naive_k_differs = naive_p_differs = False
    for trial in range(100):
        x = random_logits(rng, trial)
        k = max(1, x.shape[-1] // 2)
        # exactly k survivors (argsort), ignoring ties with the k-th value
        naive = np.full_like(x, -np.inf)
        top = np.argsort(-x, axis=-1, kind="stable")[:, :k]
        np.put_along_axis(naive, top, np.take_along_axis(x, top, -1), -1)
        naive_k_differs |= not np.array_equal(np.isneginf(naive), np.isneginf(hf_warp(TopKLogitsWarper(k), x)))
        # keep while the cumulative probability (descending) is < p: drops the token that crosses p
        p = 0.6
        order = np.argsort(-x, axis=-1, kind="stable")
        probs = np.take_along_axis(torch.softmax(torch.tensor(x), -1).numpy(), order, -1)
        keep_sorted = np.cumsum(probs, -1) < p
        keep_sorted[:, 0] = True
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        naive_p_differs |= not np.array_equal(~keep, np.isneginf(hf_warp(TopPLogitsWarper(p), x)))
    assert naive_k_differs and naive_p_differs


def test_filters_are_pure_and_temperature_matches_transformers():
    x = np.random.default_rng(4).normal(size=(2, 30)).astype(np.float32)
    before = x.copy()
    for f in (lambda a: top_k_filter(a, 3), lambda a: top_p_filter(a, 0.5),
              lambda a: apply_temperature(a, 0.7)):
        out = f(x)
        assert out is not x and out.dtype == x.dtype
    np.testing.assert_array_equal(x, before)
    np.testing.assert_allclose(apply_temperature(x, 0.7), hf_warp(TemperatureLogitsWarper(0.7), x),
                               rtol=1e-7)
    with pytest.raises(InputError, match="temperature"):
        apply_temperature(x, 0.0)


def test_filter_order_is_transformers_order():
    rng = np.random.default_rng(5)
    for _ in range(50):
        x = rng.normal(0, 2, (2, 40)).astype(np.float32)
        params = SamplingParams(temperature=0.6, top_k=12, top_p=0.8)
        theirs = hf_warp(TopPLogitsWarper(0.8), hf_warp(TopKLogitsWarper(12),
                                                        hf_warp(TemperatureLogitsWarper(0.6), x)))
        ours = filter_logits(x, params)
        np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
        np.testing.assert_allclose(ours[~np.isneginf(ours)], theirs[~np.isneginf(theirs)], rtol=1e-6)


# ----------------------------------------------------------------- sampling and seeds


def test_chi_square_sampling_draws_from_the_filtered_softmax():
    V, N = 14, 40000
    logits = np.random.default_rng(6).normal(0, 1.5, V).astype(np.float32)
    params = SamplingParams(temperature=0.7, top_k=10, top_p=0.9, seed=0)
    warped = hf_warp(TopPLogitsWarper(0.9), hf_warp(TopKLogitsWarper(10),
                                                    hf_warp(TemperatureLogitsWarper(0.7), logits[None])))
    expected = torch.softmax(torch.tensor(warped, dtype=torch.float64), -1).numpy()[0]
    kept = expected > 0
    assert 2 < kept.sum() < V  # the filters remove some tokens and keep several
    draws = select_next(np.tile(logits, (N, 1)), params, sample_rng(0))
    counts = np.bincount(draws, minlength=V)
    assert counts[~kept].sum() == 0, "a filtered-out token was drawn"
    p_ok = chisquare(counts[kept], N * expected[kept]).pvalue
    # negative controls: the same counts tested against the wrong distributions
    unfiltered = torch.softmax(torch.tensor(logits, dtype=torch.float64), -1).numpy()
    p_unfiltered = chisquare(counts, N * unfiltered).pvalue
    wrong_t = hf_warp(TopPLogitsWarper(0.9), hf_warp(TopKLogitsWarper(10), logits[None]))
    wrong_t = torch.softmax(torch.tensor(wrong_t, dtype=torch.float64), -1).numpy()[0]
    p_wrong_t = chisquare(counts[kept], N * wrong_t[kept] / wrong_t[kept].sum()).pvalue
    assert p_ok > 1e-3, p_ok
    assert p_unfiltered < 1e-6 and p_wrong_t < 1e-6, (p_unfiltered, p_wrong_t)
    # one row at a time gives the same draws as the batch (same generator stream)
    rng = sample_rng(0)
    singles = [select_next(logits, params, rng) for _ in range(200)]
    assert singles == draws[:200].tolist()


def test_same_seed_same_tokens_and_different_seeds_differ():
    model = tiny_model(scale=1.0)
    prompt = [1, 2, 3]
    p = SamplingParams(temperature=1.0, top_k=50, seed=11)
    a = generate(model, prompt, 40, p)
    assert a == generate(model, prompt, 40, p)
    assert a == list(stream(model, prompt, 40, p))
    assert a == generate_batch(model, [prompt, [9, 9]], 40, p)[0]
    assert a == generate(model, prompt, 40, SamplingParams(temperature=1.0, top_k=50), rng=sample_rng(11))
    b = generate(model, prompt, 40, SamplingParams(temperature=1.0, top_k=50, seed=12))
    assert a != b  # negative control: another seed gives other tokens


def test_greedy_ignores_the_generator_and_respects_the_allowed_mask():
    x = np.array([[0.0, 3.0, 1.0, 3.0], [5.0, 0.0, 0.0, 1.0]])
    np.testing.assert_array_equal(select_next(x, GREEDY), [1, 0])  # lowest id on ties
    allowed = np.array([False, False, True, True])
    np.testing.assert_array_equal(select_next(x, GREEDY, allowed=allowed), [3, 3])
    with pytest.raises(InputError, match="Generator"):
        select_next(x, SamplingParams(temperature=1.0))
    with pytest.raises(InputError, match="excludes every token"):
        select_next(x, GREEDY, allowed=np.zeros(4, bool))


def test_token_logprobs_equal_torch_log_softmax():
    x = np.random.default_rng(7).normal(size=(3, 50))
    chosen = np.array([4, 17, 49])
    res = token_logprobs(x, chosen, k=5)
    ref = torch.log_softmax(torch.tensor(x), -1)
    np.testing.assert_allclose(res.logprob, ref[np.arange(3), chosen].numpy(), rtol=1e-12)
    top = ref.topk(5, dim=-1)
    np.testing.assert_array_equal(res.top_ids, top.indices.numpy())
    np.testing.assert_allclose(res.top_logprobs, top.values.numpy(), rtol=1e-12)
    one = token_logprobs(x[1], 17, k=2)
    assert one.logprob == pytest.approx(float(ref[1, 17]), rel=1e-12) and one.top_ids.shape == (2,)


def test_top_k_ids_is_a_stable_argsort_prefix_including_ties_nan_and_inf():
    """The partial selection token_logprobs uses gives argsort(-x, stable)[:, :k] exactly:
    ties in ascending id order, also at the k-th place; rows with -inf and NaN too."""
    rng = np.random.default_rng(3)
    V = 1000
    for trial in range(40):
        x = rng.normal(size=(6, V))
        if trial % 2:
            x = np.round(x * 2) / 2  # heavy ties, including at the boundary
        x[0, rng.choice(V, 50)] = -np.inf
        x[1, :] = 0.0  # every entry tied
        if trial % 5 == 0:
            x[2, rng.choice(V, 3)] = np.nan
        for k in (0, 1, 2, 5, 300):
            np.testing.assert_array_equal(top_k_ids(x, k),
                                          np.argsort(-x, axis=-1, kind="stable")[:, :k])
    # negative control: argpartition alone (then sorting the k it picked) breaks ties
    # by whatever introselect left at the boundary, not by ascending id
    x = np.zeros((1, V))
    x[0, ::7] = 1.0
    naive = np.argpartition(-x, 4, axis=-1)[:, :5]
    naive = np.take_along_axis(naive, np.argsort(-np.take_along_axis(x, naive, -1), kind="stable"), -1)
    assert not np.array_equal(naive, np.argsort(-x, axis=-1, kind="stable")[:, :5])


@pytest.mark.parametrize("kwargs, words", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(seed=-1), "seed"), (dict(ascii_only="yes"), "ascii_only")])
def test_sampling_params_are_validated(kwargs, words):
    with pytest.raises(InputError, match=words):
        SamplingParams(**kwargs)


def test_valid_sampling_params_are_accepted():
    SamplingParams(temperature=0, top_k=1, top_p=1.0, ascii_only=True, seed=0)


# -------------------------------------------------------------------- batch, prompts


def test_batch_of_different_lengths_equals_each_prompt_alone():
    model = tiny_model()
    tok = ByteTokenizer()
    prompts = [tok.encode(s) for s in ("Hi", "a longer prompt here", "x", "mid size")]
    for params in (GREEDY, SamplingParams(temperature=1.3, top_p=0.95, seed=5)):
        # stop strings make rows leave the batch at different steps
        opts = dict(stop=["q", "z", "!"], tokenizer=tok)
        batch = generate_batch(model, prompts, 25, params, **opts)
        alone = [generate(model, p, 25, params, rng=sample_rng(params.seed, i), **opts)
                 for i, p in enumerate(prompts)]
        assert batch == alone
        assert len({tuple(b) for b in batch}) == len(prompts)  # control: rows really differ
    assert len({len(b) for b in batch}) > 1  # and finished at different steps


@pytest.mark.parametrize("prompt, words", [
    ([], "empty"), (list(range(65)), "65 tokens.*block_size=64"), ([3, 300, 4], "300 at position 1"),
    ([-1], "-1 at position 0")])
def test_bad_prompts_raise_input_error_with_the_numbers(prompt, words):
    model = tiny_model()
    with pytest.raises(InputError, match=words):
        generate(model, prompt, 5, GREEDY)
    with pytest.raises(InputError, match=words):
        generate_batch(model, [[1, 2], prompt], 5, GREEDY)


def test_a_full_length_prompt_is_accepted():
    model = tiny_model(block=16)
    assert check_prompt(model, list(range(16))) == list(range(16))


# ------------------------------------------------------------------ stop and eot


def test_stop_string_ends_generation_and_is_not_returned():
    model, tok = tiny_model(), ByteTokenizer()
    p = SamplingParams(temperature=1.0, seed=3, ascii_only=True)  # ASCII: any slice is text
    full = generate(model, [10, 20], 60, p, tokenizer=tok)
    text = tok.decode(full)
    stop = text[30:32]
    first = text.find(stop)
    got = generate(model, [10, 20], 60, p, tokenizer=tok, stop=[stop, "never there \x00"])
    assert got == full[:first]
    assert stop in text and stop not in tok.decode(got)  # control: without the stop it is there


def test_stop_matcher_holds_back_and_drops_tokens_overlapping_the_stop(gpt2_tok):
    text = "Hello, world!\n\nNext paragraph"
    ids = gpt2_tok.encode(text)
    m = StopMatcher(["\n\nNext", "zzz"], gpt2_tok)
    released = []
    for t in ids:
        released += m.push(t)
    released += m.flush()
    assert m.stopped
    assert gpt2_tok.decode(released) == "Hello, world!"
    m2 = StopMatcher(["\n\nNext"], gpt2_tok)  # control: a stop that never completes
    out = [t for tok_id in gpt2_tok.encode("Hello\n\nNex") for t in m2.push(tok_id)]
    assert gpt2_tok.decode(out) == "Hello"  # "\n\nNex" held back
    assert gpt2_tok.decode(out + m2.flush()) == "Hello\n\nNex" and not m2.stopped


class _EotBytes(ByteTokenizer):
    """ByteTokenizer whose end-of-text id is chosen by the test."""

    def __init__(self, eot_id: int):
        self.eot_id = eot_id


def test_end_of_text_ends_generation_and_is_not_returned():
    model = tiny_model()
    full = generate(model, [7, 7, 7], 30, SamplingParams(temperature=1.0, seed=1), tokenizer=ByteTokenizer())
    eot = full[12]
    first = full.index(eot)
    tok = _EotBytes(eot)
    got = generate(model, [7, 7, 7], 30, SamplingParams(temperature=1.0, seed=1), tokenizer=tok)
    assert got == full[:first]
    # control: with stop_at_eot off the token is generated and returned
    assert generate(model, [7, 7, 7], 30, SamplingParams(temperature=1.0, seed=1), tokenizer=tok,
                    stop_at_eot=False) == full


# ------------------------------------------------------------------------ ASCII-only


def test_ascii_only_never_draws_a_non_ascii_token(gpt2_tok):
    model = tiny_model(vocab=gpt2_tok.vocab_size, block=256, embd=16, layers=1, scale=1.0,
                       dtype="float32")
    model.tokenizer = gpt2_tok
    mask = ascii_mask(gpt2_tok)
    assert mask is ascii_mask(gpt2_tok)  # cached per tokenizer
    for s, allowed in ((" the", True), ("\n", True), ("Hello", True), ("\t", False), (" é", False)):
        (tid,) = gpt2_tok.encode(s)
        assert mask[tid] == allowed, s
    hot = SamplingParams(temperature=3.0, seed=2)
    plain = generate(model, [464], 200, hot, stop_at_eot=False)
    asc = generate(model, [464], 200, SamplingParams(temperature=3.0, seed=2, ascii_only=True),
                   stop_at_eot=False)

    def printable(ids):
        data = gpt2_tok.decode_bytes(ids)
        return all(b == 10 or 32 <= b < 127 for b in data)
    assert len(asc) == 200 and printable(asc)
    assert not printable(plain)  # control: without the filter, non-ASCII tokens appear


# --------------------------------------------------------------------- context slide


def slide_reference(model: GPT, prompt: list[int], n: int, keep: int) -> list[int]:
    """The documented policy with the uncached forward: the visible context grows to
    block_size; feeding one more token keeps only the last ``keep`` tokens."""
    T, visible, out = model.config.block_size, list(prompt), []
    for _ in range(n):
        logits, _ = model.forward(np.asarray([visible]))
        t = int(np.argmax(logits.data[0, -1]))
        out.append(t)
        visible = (visible + [t])[-keep:] if len(visible) == T else visible + [t]
    return out


def crop_reference(model: GPT, prompt: list[int], n: int) -> list[int]:
    """nanoGPT: every step sees the last block_size tokens."""
    ids = list(prompt)
    for _ in range(n):
        logits, _ = model.forward(np.asarray([ids[-model.config.block_size:]]))
        ids.append(int(np.argmax(logits.data[0, -1])))
    return ids[len(prompt):]


def test_window_slides_past_block_size_and_warns_once():
    model = tiny_model(block=16)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = generate(model, prompt, 40, GREEDY)  # passes block_size 16 several times
        crop = generate(model, prompt, 40, GREEDY, window=16)
    slides = [w for w in caught if issubclass(w.category, ContextSlideWarning)]
    assert len(slides) == 2 and "block_size=16" in str(slides[0].message)  # once per call
    assert got == slide_reference(model, prompt, 40, keep=8)
    assert crop == crop_reference(model, prompt, 40)
    assert got != crop  # control: the two policies are told apart
    with warnings.catch_warnings():
        warnings.simplefilter("error", ContextSlideWarning)
        generate(model, prompt, 6, GREEDY)  # stays inside the context: no warning


def test_batch_rows_slide_independently():
    model = tiny_model(block=16)
    prompts = [[1, 2, 3], list(range(20, 34))]
    with pytest.warns(ContextSlideWarning):
        batch = generate_batch(model, prompts, 25, GREEDY)
    assert batch == [slide_reference(model, p, 25, keep=8) for p in prompts]


# ------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, gpt2_tokenizer_dir) -> Path:
    """A small random GPT2LMHeadModel with the GPT-2 tokenizer files beside it."""
    folder = tmp_path_factory.mktemp("hf_tiny")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=48,
                                     initializer_range=0.2, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_tokenizer_dir / name, folder / name)
    return folder


def test_cli_generate_json_equals_library_generation(hf_folder, capsys):
    rc = main(["generate", "--model", str(hf_folder), "--prompt", "Hello.", "-n", "12",
               "--temperature", "0.9", "--top-k", "40", "--seed", "4", "--num-samples", "3", "--json"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    model = numgpt.load(hf_folder)
    params = SamplingParams(temperature=0.9, top_k=40, seed=4)
    for j, line in enumerate(lines):
        obj = json.loads(line)
        assert obj["prompt_ids"] == [15496, 13]
        assert obj["generated_ids"] == generate(model, [15496, 13], 12, params, rng=sample_rng(4, j))
        assert obj["text"] == model.tokenizer.decode(obj["generated_ids"])
    assert len({line for line in lines}) == 3  # the samples differ


def test_cli_generate_streams_text_with_split_utf8(tmp_path, capsys):
    folder = tmp_path / "bytes_model"
    config = transformers.GPT2Config(vocab_size=256, n_layer=1, n_head=2, n_embd=16, n_positions=512,
                                     initializer_range=0.3, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(1)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    args = ["generate", "--model", str(folder), "--tokenizer", "bytes", "--prompt", "é:",
            "-n", "400", "--seed", "0", "--temperature", "1.0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    model = numgpt.load(folder)
    ids = generate(model, list("é:".encode()), 400, SamplingParams(temperature=1.0, seed=0),
                   tokenizer=ByteTokenizer())
    tok = ByteTokenizer()
    assert out == "é:" + tok.decode(ids) + "\n"
    per_token = "".join(tok.decode([t]) for t in ids)
    assert per_token != tok.decode(ids)  # control: decoding token by token breaks characters


@pytest.mark.parametrize("extra, words", [
    (["--prompt", ""], "empty"), (["--prompt", "a " * 60], "block_size=48"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature"),
    (["--prompt", "hi", "--top-p", "2"], "top_p")])
def test_cli_generate_reports_bad_input_in_one_line(hf_folder, capsys, extra, words):
    assert main(["generate", "--model", str(hf_folder), "-n", "3", *extra]) == 2
    err = capsys.readouterr().err
    assert "numgpt: error:" in err and words in err and "Traceback" not in err


def test_cli_generate_threads_flag_in_a_fresh_process_gives_the_same_tokens(hf_folder):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "numgpt", "generate", "--model", str(hf_folder),
                          "--prompt", "Hello.", "-n", "6", "--temperature", "0", "--json",
                          "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "no effect" not in out.stderr  # NumPy was not loaded before the flag took effect
    got = json.loads(out.stdout)["generated_ids"]
    assert got == generate(numgpt.load(hf_folder), [15496, 13], 6, GREEDY)
