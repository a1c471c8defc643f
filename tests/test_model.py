"""``GPTConfig`` validation, presets, the KV-cache inference path and the training forward.

Rung 6 (cache part) of the verification ladder: logits through ``forward_cached``
(prefill, then one-token decode steps, batched slots at different lengths) must equal a
full recompute ``model(idx)`` of the same tokens: float64 to round-off (1e-12), float32 to
1e-5. The negative control shifts the cache one position and must fail that check.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from numgpt.errors import ConfigError, InputError, NumGPTError
from numgpt.core.model import GPT, PRESETS, GPTConfig, KVCache
from numgpt.core.tensor import no_grad

CACHE_TOL = {"float64": 1e-12, "float32": 1e-5}
TINY = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32)


def tiny_model(dtype: str = "float64", **overrides) -> GPT:
    """A small GPT with weights large enough (std 0.2) that attention is far from uniform,
    so a cache that reads the wrong positions changes the logits by O(1)."""
    model = GPT(GPTConfig(**{**TINY, **overrides}, dtype=dtype), seed=0)
    rng = np.random.default_rng(1)
    for p in model.parameters().values():
        if p.data.ndim == 2:
            p.data[...] = rng.normal(0.0, 0.2, p.data.shape)
    return model


@pytest.fixture(scope="module", params=["float64", "float32"])
def model(request) -> GPT:
    return tiny_model(request.param)


def recompute_last(model: GPT, idx: np.ndarray) -> np.ndarray:
    """Reference: full uncached forward of every position, logits of the last one (B, V)."""
    with no_grad():
        logits, _ = model(idx)
    return logits.data[:, -1]


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    return float(np.max(np.abs(a - b)))


def decode_diffs(model: GPT, seq: np.ndarray, prompt_len: int, shift: int = 0) -> list[float]:
    """Prefill ``seq[:, :prompt_len]`` then decode the rest one token at a time; the max diff
    against a full recompute after every call. ``shift`` moves ``cache.lengths`` before the
    first decode step (the negative control: keys written one position off)."""
    cache = model.new_cache(slots=seq.shape[0])
    diffs = [max_diff(model.forward_cached(seq[:, :prompt_len], cache), recompute_last(model, seq[:, :prompt_len]))]
    cache.lengths += shift
    for t in range(prompt_len, seq.shape[1]):
        got = model.forward_cached(seq[:, t:t + 1], cache)  # (B, V)
        diffs.append(max_diff(got, recompute_last(model, seq[:, :t + 1])))
    return diffs


# ---------------------------------------------------------------------------- config

@pytest.mark.parametrize("bad", ["n_layers", "dropout_p", "activation_function"])
def test_config_rejects_unknown_keys_by_name(bad):
    with pytest.raises(ConfigError, match=bad):
        GPTConfig.from_dict({"n_layer": 2, bad: 1})
    with pytest.raises(ConfigError, match=bad):
        GPTConfig.preset("gpt2", **{bad: 1})


@pytest.mark.parametrize("key, value", [
    ("n_layer", "12"), ("n_layer", True), ("n_layer", 12.0), ("n_head", None),
    ("bias", 1), ("bias", "yes"), ("dropout", "0.1"), ("activation", 3), ("dtype", np.float32),
    ("layer_norm_epsilon", True),
])
def test_config_rejects_wrong_types_naming_key_and_value(key, value):
    with pytest.raises(ConfigError, match=key) as err:
        GPTConfig(**{key: value})
    assert repr(value) in str(err.value)


@pytest.mark.parametrize("overrides, words", [
    (dict(n_embd=10, n_head=3), ["n_embd (10)", "n_head (3)"]),
    (dict(dropout=1.0), ["dropout", "1.0"]),
    (dict(dropout=-0.1), ["dropout", "-0.1"]),
    (dict(activation="relu"), ["activation", "relu"]),
    (dict(dtype="float16"), ["dtype", "float16"]),
    (dict(n_layer=0), ["n_layer", ">= 1"]),
    (dict(vocab_size=-5), ["vocab_size", "-5"]),
    (dict(layer_norm_epsilon=0.0), ["layer_norm_epsilon"]),
])
def test_config_rejects_impossible_values(overrides, words):
    with pytest.raises(ConfigError) as err:
        GPTConfig(**overrides)
    for w in words:
        assert w in str(err.value)
    assert isinstance(err.value, NumGPTError) and isinstance(err.value, ValueError)


def test_config_accepts_ints_for_floats_and_round_trips():
    c = GPTConfig(dropout=0, layer_norm_epsilon=1)
    assert isinstance(c.dropout, float) and isinstance(c.layer_norm_epsilon, float)
    assert GPTConfig.from_dict(c.to_dict()) == c


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="gpt2-medium"):
        GPTConfig.preset("gpt3")


# published GPT-2 shapes (Radford et al. 2019, table 2; the released checkpoints' hparams.json)
PUBLISHED = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024),
             "gpt2-large": (36, 20, 1280), "gpt2-xl": (48, 25, 1600)}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_presets_have_the_published_shapes(name):
    c = GPTConfig.preset(name)
    assert (c.n_layer, c.n_head, c.n_embd) == PUBLISHED[name]
    assert (c.vocab_size, c.block_size, c.head_size) == (50257, 1024, 64)
    assert (c.activation, c.layer_norm_epsilon, c.bias, c.dropout) == ("gelu_tanh", 1e-5, True, 0.0)
    assert set(PRESETS) == set(PUBLISHED)


# ------------------------------------------------------------------------- KV cache

@pytest.mark.parametrize("prompt_len", [1, 5, 17])
def test_cached_decode_equals_full_recompute(model, prompt_len):
    seq = np.random.default_rng(prompt_len).integers(0, TINY["vocab_size"], (1, prompt_len + 6))
    diffs = decode_diffs(model, seq, prompt_len)
    assert len(diffs) == 7  # the prefill and six decode steps
    assert max(diffs) < CACHE_TOL[model.config.dtype], diffs


def test_cached_decode_runs_to_the_last_position(model):
    seq = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, TINY["block_size"]))
    assert max(decode_diffs(model, seq, TINY["block_size"] - 3)) < CACHE_TOL[model.config.dtype]


@pytest.mark.parametrize("shift", [-1, 1])
def test_negative_control_cache_one_position_off_fails(model, shift):
    seq = np.random.default_rng(5).integers(0, TINY["vocab_size"], (1, 11))
    diffs = decode_diffs(model, seq, 5, shift=shift)
    assert diffs[0] < CACHE_TOL[model.config.dtype]  # the prefill was right
    assert min(diffs[1:]) > 1e3 * CACHE_TOL[model.config.dtype], diffs  # every later step is wrong


def test_prefill_all_logits_equal_full_recompute(model):
    idx = np.random.default_rng(2).integers(0, TINY["vocab_size"], (3, 9))  # three equal-length rows
    cache = model.new_cache(slots=3)
    got = model.forward_cached(idx, cache, all_logits=True)  # (3, 9, V)
    with no_grad():
        want = model(idx)[0].data
    assert max_diff(got, want) < CACHE_TOL[model.config.dtype]
    assert cache.lengths.tolist() == [9, 9, 9]


def test_slots_at_different_lengths_decode_together(model):
    rng = np.random.default_rng(3)
    lengths = [1, 5, 17]
    seqs = [rng.integers(0, TINY["vocab_size"], (1, n + 4)) for n in lengths]
    cache = model.new_cache(slots=3)
    for slot, (seq, n) in enumerate(zip(seqs, lengths)):  # prefill each slot on its own
        model.forward_cached(seq[:, :n], cache, rows=[slot])
    assert cache.lengths.tolist() == lengths
    for step in range(4):  # then one batched call per step for all three slots
        new = np.array([[s[0, n + step]] for s, n in zip(seqs, lengths)])  # (3, 1)
        got = model.forward_cached(new, cache, rows=[0, 1, 2])  # (3, V)
        for slot, (seq, n) in enumerate(zip(seqs, lengths)):
            want = recompute_last(model, seq[:, :n + step + 1])[0]
            assert max_diff(got[slot], want) < CACHE_TOL[model.config.dtype], (slot, step)


def test_a_subset_of_slots_in_any_order_leaves_the_others_alone(model):
    rng = np.random.default_rng(4)
    seqs = rng.integers(0, TINY["vocab_size"], (3, 8))
    cache = model.new_cache(slots=3)
    model.forward_cached(seqs[:, :4], cache)  # all three slots at length 4
    k_slot1 = cache.k[:, 1].copy()
    got = model.forward_cached(seqs[[2, 0], 4:5], cache, rows=[2, 0])  # (2, V), rows reversed
    assert cache.lengths.tolist() == [5, 4, 5]
    np.testing.assert_array_equal(cache.k[:, 1], k_slot1)
    for a, slot in enumerate([2, 0]):
        assert max_diff(got[a], recompute_last(model, seqs[slot:slot + 1, :5])[0]) < CACHE_TOL[model.config.dtype]


def test_cache_is_preallocated_and_keeps_the_model_dtype(model):
    cache = model.new_cache(slots=2, max_len=10)
    assert isinstance(cache, KVCache)
    L, nh, hs = TINY["n_layer"], TINY["n_head"], TINY["n_embd"] // TINY["n_head"]
    assert cache.k.shape == cache.v.shape == (L, 2, nh, 10, hs)
    assert cache.k.dtype == np.dtype(model.config.dtype)
    buffer = cache.k
    model.forward_cached(np.zeros((2, 3), dtype=np.int64), cache)
    assert cache.k is buffer  # written in place, never reallocated or concatenated
    logits = model.forward_cached(np.zeros((2, 1), dtype=np.int64), cache)
    assert logits.shape == (2, TINY["vocab_size"]) and logits.dtype == np.dtype(model.config.dtype)


# ------------------------------------------------------------------------ bad input

def test_cache_overflow_beyond_block_size_names_the_lengths():
    model = tiny_model()
    cache = model.new_cache(slots=1)  # max_len = block_size = 32
    model.forward_cached(np.zeros((1, 31), dtype=np.int64), cache)
    with pytest.raises(InputError) as err:
        model.forward_cached(np.zeros((1, 2), dtype=np.int64), cache)
    assert "33" in str(err.value) and "block_size=32" in str(err.value)
    assert cache.lengths.tolist() == [31]  # the failed call changed nothing
    model.forward_cached(np.zeros((1, 1), dtype=np.int64), cache)  # exactly full is fine
    assert cache.lengths.tolist() == [32]


def test_short_cache_overflow_names_its_size():
    model = tiny_model()
    cache = model.new_cache(slots=1, max_len=8)
    model.forward_cached(np.zeros((1, 7), dtype=np.int64), cache)
    with pytest.raises(InputError) as err:
        model.forward_cached(np.zeros((1, 2), dtype=np.int64), cache)
    assert all(str(n) in str(err.value) for n in (8, 7, 2)), str(err.value)


def test_cache_longer_than_block_size_is_refused():
    with pytest.raises(ConfigError, match="33"):
        tiny_model().new_cache(slots=1, max_len=33)


def test_uncached_forward_beyond_block_size_names_the_lengths():
    with pytest.raises(InputError) as err:
        tiny_model()(np.zeros((1, 33), dtype=np.int64))
    assert "33" in str(err.value) and "block_size=32" in str(err.value)


@pytest.mark.parametrize("idx, words", [
    (np.array([[1, 64]]), ["[0, 64)", "64"]),
    (np.array([[-1, 3]]), ["[0, 64)", "-1"]),
    (np.array([1, 2, 3]), ["(B, T)", "(3,)"]),
    (np.array([[1.0, 2.0]]), ["integer", "float64"]),
])
def test_invalid_ids_raise_input_error(idx, words):
    model = tiny_model()
    cache = model.new_cache(slots=1)
    for call in (lambda: model(idx), lambda: model.forward_cached(idx, cache)):
        with pytest.raises(InputError) as err:
            call()
        assert all(w in str(err.value) for w in words), str(err.value)
    assert cache.lengths.tolist() == [0]


# --------------------------------------------------------------- graph and dropout

def test_no_grad_builds_no_graph_and_grad_mode_does():
    model = tiny_model()
    idx = np.array([[1, 2, 3]])
    with no_grad():
        logits, _ = model(idx)
    assert not logits.requires_grad and logits.parents == () and logits._backward is None
    logits, _ = model(idx)
    assert logits.requires_grad and logits.parents
    out = model.forward_cached(idx, model.new_cache(1))
    assert isinstance(out, np.ndarray)
    assert all(p.grad is None for p in model.parameters().values())


def test_dropout_only_with_rng():
    idx = np.random.default_rng(0).integers(0, 64, (2, 8))
    plain, drop = tiny_model(dropout=0.0), tiny_model(dropout=0.2)  # same weights
    with no_grad():
        ref = plain(idx)[0].data
        no_rng = drop(idx)[0].data
        seed_a = drop(idx, rng=np.random.default_rng(7))[0].data
        seed_a2 = drop(idx, rng=np.random.default_rng(7))[0].data
        seed_b = drop(idx, rng=np.random.default_rng(8))[0].data
        p0 = plain(idx, rng=np.random.default_rng(7))[0].data
    np.testing.assert_array_equal(no_rng, ref)  # evaluation: dropout is the identity
    np.testing.assert_array_equal(p0, ref)  # p == 0: the identity even with an rng
    np.testing.assert_array_equal(seed_a, seed_a2)  # same seed, same masks
    assert np.abs(seed_a - ref).max() > 1e-2  # p > 0 with an rng changes the output
    assert np.abs(seed_a - seed_b).max() > 1e-2  # and the masks follow the seed


def test_training_forward_backward_at_init():
    cfg = GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32, dtype="float64")
    model = GPT(cfg, seed=0)  # GPT-2 init: N(0, 0.02), logits near zero
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 256, (4, 16)), rng.integers(0, 256, (4, 16))
    logits, loss = model(idx, targets)
    # independent loss: log-sum-exp minus the target logit, averaged over all positions
    z = logits.data
    zmax = z.max(axis=-1, keepdims=True)
    lse = (zmax + np.log(np.exp(z - zmax).sum(axis=-1, keepdims=True)))[..., 0]  # (B, T)
    want = np.mean(lse - np.take_along_axis(z, targets[..., None], axis=-1)[..., 0])
    assert abs(loss.item() - want) < 1e-12
    assert abs(loss.item() - math.log(256)) < 0.05, loss.item()  # near uniform at init
    loss.backward()
    params = model.parameters()
    for name, p in params.items():
        assert p.grad is not None and p.grad.shape == p.data.shape, name
        assert np.all(np.isfinite(p.grad)) and np.any(p.grad != 0), name
    unseen = np.setdiff1d(np.arange(256), idx)  # wte rows never looked up still get the head's gradient
    assert np.all(np.abs(params["wte.weight"].grad[unseen]).sum(axis=-1) > 0)


def test_ignored_targets_do_not_count():
    model = tiny_model()
    idx = np.array([[1, 2, 3, 4]])
    full = np.array([[2, 3, 4, 5]])
    part = np.array([[2, -1, 4, -1]])
    with no_grad():
        logits, loss = model(idx, part)
        _, loss_full = model(idx, full)
    z = logits.data[0]
    nll = [np.log(np.exp(z[t]).sum()) - z[t, full[0, t]] for t in (0, 2)]
    assert abs(loss.item() - np.mean(nll)) < 1e-12
    assert abs(loss.item() - loss_full.item()) > 1e-6


@pytest.mark.parametrize("rows, words", [
    ([0, 3], ["[0, 3)", "[0, 3]"]),  # no slot 3
    ([1, 1], ["distinct", "[1, 1]"]),  # one slot written twice
    ([0], ["2 integer slot numbers"]),  # fewer rows than ids
])
def test_bad_rows_raise_input_error_and_change_nothing(rows, words):
    model = tiny_model()
    cache = model.new_cache(slots=3)
    with pytest.raises(InputError) as err:
        model.forward_cached(np.zeros((2, 1), dtype=np.int64), cache, rows=rows)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert cache.lengths.tolist() == [0, 0, 0]


def test_long_prompt_through_the_blocked_attention_path_equals_the_batched_one():
    block = 128  # CausalSelfAttention's default attention_block
    model = tiny_model(block_size=block + 40)
    seq = np.random.default_rng(6).integers(0, TINY["vocab_size"], (1, block + 24))
    n = block + 20  # the prefill takes two blocks (more than ``attention_block`` queries)
    cache = model.new_cache(slots=1)
    got = [model.forward_cached(seq[:, :n], cache, all_logits=True)[0]]  # (n, V)
    got += [model.forward_cached(seq[:, t:t + 1], cache)[0] for t in range(n, seq.shape[1])]
    for b in model.h:  # the reference: one batched softmax over every query
        b.attn.attention_block = 10**9
    with no_grad():
        want = model(seq)[0].data[0]  # (T, V)
    assert max_diff(got[0], want[:n]) < 1e-12
    for i, logits in enumerate(got[1:]):
        assert max_diff(logits, want[n + i]) < 1e-12


@pytest.mark.parametrize("path", ["reference", "fast"])
def test_cached_path_and_no_grad_forward_call_the_inference_entry_and_training_the_training_entry(
        monkeypatch, path):
    from numgpt.core import kernels, ops

    model = tiny_model(kernels=path)
    idx = np.random.default_rng(8).integers(0, TINY["vocab_size"], (2, 5))
    used = []
    names = ("attention_training", "attention_inference", "cached_attention") if path == "fast" else \
        ("attention_training", "attention_inference", "attention_reference")
    for name in names:
        # where the path's entry lives: the kernel when the fast path has one, else the op
        module = kernels if path == "fast" and name in kernels.FAST_OPS else ops
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=real, _n=name, **kw: used.append(_n) or _f(*a, **kw))
    model.forward_cached(idx, model.new_cache(2))
    inference = "cached_attention" if path == "fast" else "attention_inference"
    assert set(used) == {inference} and len(used) == TINY["n_layer"]
    used.clear()
    with no_grad():  # no backward will come: the inference entry, nothing (B, nh, T, T) kept
        model(idx)
    assert set(used) == {"attention_inference"} and len(used) == TINY["n_layer"]
    used.clear()
    model(idx)  # a graph: the training entry, which keeps what backward needs
    assert set(used) == {"attention_training"} and len(used) == TINY["n_layer"]


@pytest.mark.parametrize("T", [9, 150])  # one block and two blocks of queries
def test_no_grad_forward_equals_the_graph_building_one(T):
    # the inference entry (no graph) equals the training entry (graph) to round-off
    model = tiny_model(block_size=160)
    idx = np.random.default_rng(T).integers(0, TINY["vocab_size"], (2, T))
    with no_grad():
        inference = model(idx)[0].data
    training = model(idx)[0]
    assert training.requires_grad
    assert max_diff(inference, training.data) < 1e-12


def test_a_deep_copy_of_a_model_is_an_independent_equal_model():
    """copy.deepcopy(model) recursed forever in the op namespace's __getattr__ (it had no
    ``path`` before __init__ ran); the copy must give the same logits and own its weights."""
    import copy
    from numgpt.core.kernels import OpPath
    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=8), seed=0)
    twin = copy.deepcopy(model)
    ids = np.array([[1, 2, 3]])
    assert np.array_equal(model(ids)[0].data, twin(ids)[0].data)
    twin.wte.weight.data[...] = 0
    assert not np.array_equal(model(ids)[0].data, twin(ids)[0].data)
    assert copy.copy(OpPath("fast")).path == "fast"


def _randomized(config: GPTConfig, seed: int) -> GPT:
    """A model whose every parameter (biases and LayerNorm gains too) is random, so a fused
    op that dropped a bias or a gain would show."""
    m = GPT(config, seed=None)
    rng = np.random.default_rng(seed)
    for p in m.parameters().values():
        p.data[...] = rng.normal(0.0, 0.3, p.data.shape)
    return m


def _fused_and_layered(model, monkeypatch=None):
    """A 5-token prompt then 3 decode steps, through the fused pass and through the layers'
    own forwards (``_hooked_layers`` with no hook, the module-by-module definition) on two
    caches of 2 slots at different lengths -> the two lists of logits."""
    ids = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    out = {}
    for name, hooks in (("fused", None), ("layered", [])):
        cache = model.new_cache(2)
        got = [model.forward_cached(ids, cache, all_logits=True, hooks=hooks),
               model.forward_cached(ids[:1, :2], cache, rows=[1], hooks=hooks)]  # slot 1 ahead
        for t in range(3):
            got.append(model.forward_cached(np.array([[t + 7], [t + 11]]), cache, hooks=hooks))
        out[name] = got
    return out["fused"], out["layered"]


@pytest.mark.parametrize("variant", ["fast float32", "reference float32", "fast float64", "q8_0"])
def test_fused_pass_is_bit_identical_to_the_layers_own_forwards(variant):
    from numgpt.core.quant import quantize_model

    kernels, dtype = ("reference", "float32") if variant.startswith("reference") else \
        ("fast", "float64" if variant.endswith("float64") else "float32")
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=40, block_size=16, dtype=dtype,
                       kernels=kernels)
    model = _randomized(config, 7)
    if variant == "q8_0":
        model = quantize_model(model)
    fused, layered = _fused_and_layered(model)
    for f, g in zip(fused, layered):
        assert f.dtype == g.dtype and np.array_equal(f, g)


def test_fused_pass_check_catches_a_fused_op_that_drops_a_bias(monkeypatch):
    """Negative control of the bit-identity check: a fused projection without its bias."""
    import numgpt.core.model as model_module

    model = _randomized(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=40, block_size=16), 7)
    real = model_module._project
    monkeypatch.setattr(model_module, "_project",
                        lambda layer, x: real(layer, x) - (0 if layer.bias is None else layer.bias.data))
    fused, layered = _fused_and_layered(model)
    assert not np.array_equal(fused[-1], layered[-1])
