"""``GPT.forward_packed``: decode rows and prompt chunks of several cache slots in one pass.

The oracle is ``forward_cached`` run on each segment alone (itself proven equal to the
uncached reference forward in tests/test_model.py). Packing changes only the number of
rows each linear layer multiplies at once, so logits and cached keys/values agree to
float32 rounding (float64: 1e-12), on both op paths and for a q8_0 model.
"""

import numpy as np
import pytest

from numgpt.core.model import GPT, GPTConfig
from numgpt.core.quant import quantize_model
from numgpt.errors import InputError

TOL = {"float32": 2e-6, "float64": 1e-12}  # measured worst: 6e-8 and 2e-16


def _model(dtype="float64", kernels="fast", seed=3):
    return GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=32,
                         dtype=dtype, kernels=kernels), seed=seed)


def _mixed(model, rng):
    """Two caches in one state (slots 0, 1 hold contexts of 10 and 7 tokens) and segments
    mixing decode rows, a chunk continuing a context and a fresh prompt."""
    caches = [model.new_cache(5), model.new_cache(5)]
    p0, p1, p4 = rng.integers(0, 256, 10), rng.integers(0, 256, 7), rng.integers(0, 256, 4)
    for c in caches:
        model.forward_cached(p0[None], c, rows=[0])
        model.forward_cached(p1[None], c, rows=[1])
        model.forward_cached(p4[None], c, rows=[4])
    segments = [(0, rng.integers(0, 256, 1)), (2, rng.integers(0, 256, 13)),
                (1, rng.integers(0, 256, 1)), (4, rng.integers(0, 256, 6)),
                (3, rng.integers(0, 256, 1))]
    return caches, segments


def _alone(model, cache, segments):
    """forward_cached on each segment alone: logits of every new token (n, V)."""
    return [model.forward_cached(np.asarray(t)[None], cache, rows=[s], all_logits=True)[0]
            for s, t in segments]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kernels", ["fast", "reference"])
def test_packed_equals_each_segment_alone(dtype, kernels):
    model = _model(dtype, kernels)
    (packed, alone), segments = _mixed(model, np.random.default_rng(0))
    want = ["last", "all", None, "last", "all"]
    out = model.forward_packed(segments, packed, logits=want)
    ref = _alone(model, alone, segments)
    tol = TOL[dtype]
    for w, got, r in zip(want, out, ref):
        if w is None:
            assert got is None
        else:
            np.testing.assert_allclose(got, r if w == "all" else r[-1], rtol=0, atol=tol)
    np.testing.assert_array_equal(packed.lengths, alone.lengths)
    np.testing.assert_array_equal(packed.lengths, [11, 8, 13, 1, 10])
    n = packed.lengths.max()
    np.testing.assert_allclose(packed.k[:, :, :, :n], alone.k[:, :, :, :n], rtol=0, atol=tol)
    np.testing.assert_allclose(packed.v[:, :, :, :n], alone.v[:, :, :, :n], rtol=0, atol=tol)


def test_packed_q8_0_model_equals_each_segment_alone():
    model = quantize_model(_model("float32"))
    (packed, alone), segments = _mixed(model, np.random.default_rng(1))
    out = model.forward_packed(segments, packed, logits=["all"] * len(segments))
    for got, r in zip(out, _alone(model, alone, segments)):
        np.testing.assert_allclose(got, r, rtol=0, atol=TOL["float32"])


def test_the_comparison_catches_a_row_given_another_slots_position():
    """Negative control: the same segments with two decode rows' slots swapped (each token
    read at the other's position and context) must fail the gate above."""
    model = _model()
    (packed, alone), segments = _mixed(model, np.random.default_rng(0))
    swapped = [(1, segments[0][1]), segments[1], (0, segments[2][1]), *segments[3:]]
    out = model.forward_packed(swapped, packed, logits=["last"] * 5)
    ref = _alone(model, alone, segments)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(out[0], ref[0][-1], rtol=0, atol=TOL["float64"])
    np.testing.assert_allclose(out[1], ref[1][-1], rtol=0, atol=TOL["float64"])  # untouched


def test_one_segment_equals_forward_cached_bitwise():
    """A single segment runs the same ops on the same rows as forward_cached: no rounding."""
    model = _model("float32")
    a, b = model.new_cache(2), model.new_cache(2)
    ids = np.random.default_rng(2).integers(0, 256, 9)
    got = model.forward_packed([(1, ids)], a, logits=["all"])[0]
    np.testing.assert_array_equal(got, model.forward_cached(ids[None], b, rows=[1], all_logits=True)[0])


def test_packed_refuses_bad_segments_in_one_line():
    model = _model()
    cache = model.new_cache(2, 16)
    with pytest.raises(InputError, match="distinct slots"):
        model.forward_packed([(0, [1]), (0, [2])], cache)
    with pytest.raises(InputError, match="non-empty 1-D"):
        model.forward_packed([(0, [])], cache)
    with pytest.raises(InputError, match="would end at 17"):
        model.forward_packed([(1, list(range(17)))], cache)
    with pytest.raises(InputError, match="outside"):
        model.forward_packed([(1, [256])], cache)
    with pytest.raises(InputError, match="'last', 'all' or None"):
        model.forward_packed([(1, [3])], cache, logits=["first"])
    assert cache.lengths.tolist() == [0, 0], "a refused call changes no cache row"
    assert model.forward_packed([], cache) == []
